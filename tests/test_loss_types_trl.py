"""The trainer's micro-batch loss against TRL's own `_compute_loss` on identical tensors: the same tiny model (fp32),
the same completions, advantages and reference logprobs, every loss type (luspo included) at both importance
sampling levels, with beta > 0 and gradient accumulation. Prompts share one length, so neither side pads them."""
import pytest
import torch
from datasets import Dataset

import helpers_tiny as tiny
from fastrl import GRPOConfig, GRPOTrainer
from fastrl.kernels.loss_spec import LOSS_TYPES

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def fields(loss_type, level, out):
    return dict(output_dir=str(out), loss_type=loss_type, importance_sampling_level=level, beta=0.04,
                per_device_train_batch_size=4, gradient_accumulation_steps=2, num_generations=4,
                max_completion_length=5, bf16=False, use_cpu=True, report_to="none", save_strategy="no",
                disable_tqdm=True, max_steps=1)


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_loss_equals_trls_compute_loss(model_dir, tmp_path, loss_type, level):
    trl = pytest.importorskip("trl")
    ds = Dataset.from_list(tiny.addition_rows(8))  # "a+b=": every prompt 4 tokens
    ours = GRPOTrainer(model_dir, tiny.short_reward, GRPOConfig(**fields(loss_type, level, tmp_path / "o")),
                       train_dataset=ds)
    batch, info = ours._generate_and_score()  # 8 completions, their advantages and reference logprobs
    assert batch.advantages.abs().sum() > 0 and batch.completion_mask.sum() > 8
    # off-policy and away from the reference, so that ratios, clipping and the KL term all count (on policy at
    # step 0 the loss is a near-zero sum of advantages)
    g = torch.Generator().manual_seed(LOSS_TYPES.index(loss_type))
    current = batch.ref_logprobs  # the reference is the initial policy: these are the current logprobs
    batch.old_logprobs = current + 0.3 * torch.randn(current.shape, generator=g)
    batch.ref_logprobs = current + 0.2 * torch.randn(current.shape, generator=g)
    loss, _ = ours._micro_batch_loss(batch, loss_tokens=info["loss_tokens"])
    assert loss.abs() > 1e-4

    theirs = trl.GRPOTrainer(model_dir, tiny.short_reward, trl.GRPOConfig(**fields(loss_type, level, tmp_path / "t")),
                             train_dataset=ds)
    theirs.model.train()
    theirs.current_gradient_accumulation_steps = 2  # set by transformers' training loop
    inputs = {"prompt_ids": batch.prompt_ids, "prompt_mask": batch.prompt_mask, "completion_ids": batch.completion_ids,
              "completion_mask": batch.completion_mask, "advantages": batch.advantages,
              "ref_per_token_logps": batch.ref_logprobs, "old_per_token_logps": batch.old_logprobs,
              "num_items_in_batch": torch.tensor(info["loss_tokens"])}
    expected = theirs._compute_loss(theirs.model, inputs)
    torch.testing.assert_close(loss.detach().double(), expected.detach().double(), rtol=1e-4, atol=1e-7)
