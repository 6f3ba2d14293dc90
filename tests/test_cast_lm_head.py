"""cast_lm_head_to_fp32 (TRL 1.16): a bf16 model's vocabulary sweep reads an fp32 head and fp32 hidden states (TRL
casts both before its lm_head), for the policy's loss and for the logprob passes; without it, bf16 both. The loss
is then the float64 reference's on those fp32 inputs."""
import pytest
import torch
from datasets import Dataset

import helpers_tiny as tiny
from fastrl import GRPOConfig, GRPOTrainer
from fastrl.kernels.reference import reference_grpo_loss

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.mark.parametrize("cast", [True, False])
def test_the_sweep_reads_the_dtype_asked_for(tmp_path, cast):
    tok = tiny.build_tokenizer()
    model = tiny.build_model(tok, dtype=torch.bfloat16)  # bf16 weights: bf16 hidden states and head
    args = GRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=2,
                      max_completion_length=4, bf16=False, use_cpu=True, report_to="none", save_strategy="no",
                      disable_tqdm=True, max_steps=1, beta=0.04, cast_lm_head_to_fp32=cast)
    trainer = GRPOTrainer(model, tiny.short_reward, args, train_dataset=Dataset.from_list(tiny.addition_rows(4)),
                          processing_class=tok)
    seen, loss_fn, logprob_fn = [], trainer._loss_fn, trainer._logprob_fn

    def recording(fn):
        def wrapped(hidden, weight, *a, **kw):
            seen.append((hidden.detach(), weight.detach(), a, kw))
            return fn(hidden, weight, *a, **kw)
        return wrapped

    trainer._loss_fn, trainer._logprob_fn = recording(loss_fn), recording(logprob_fn)
    batch, info = trainer._generate_and_score()  # the reference logprob pass (beta > 0)
    loss, _ = trainer._micro_batch_loss(batch, loss_tokens=info["loss_tokens"])
    expected = torch.float32 if cast else torch.bfloat16
    assert len(seen) >= 2 and all(h.dtype == w.dtype == expected for h, w, _, _ in seen)
    hidden, weight, a, kw = seen[-1]
    if cast:  # fp32 arithmetic on those inputs: the float64 reference's value to fp32 accuracy
        ref = reference_grpo_loss(hidden.double(), weight.double(), *a, **{**kw, "bias": None})[0]
        torch.testing.assert_close(loss.detach().double(), ref * trainer.loss_spec.micro_batch_scale,
                                   rtol=1e-5, atol=1e-6)
