"""The trainer's micro-batch loss against TRL's own `_compute_loss` on identical tensors: the same tiny model (fp32),
the same completions, advantages and reference logprobs, every loss type (luspo included) at both importance
sampling levels, with beta > 0 and gradient accumulation, and dapo's normaliser across gradient accumulation and
steps_per_generation. Prompts share one length, so neither side pads them."""
import pytest
import torch
from datasets import Dataset

import helpers_tiny as tiny
import trl
from fastrl import GRPOConfig, GRPOTrainer
from fastrl.kernels.loss_spec import LOSS_TYPES

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def fields(loss_type, level, out, **kw):
    return {**dict(output_dir=str(out), loss_type=loss_type, importance_sampling_level=level, beta=0.04,
                   per_device_train_batch_size=4, gradient_accumulation_steps=2, num_generations=4,
                   max_completion_length=5, bf16=False, use_cpu=True, report_to="none", save_strategy="no",
                   disable_tqdm=True, max_steps=1), **kw}


def move_off_policy(batch, seed):
    """Old and reference logprobs moved away from the current ones, so that ratios, clipping and the KL term all
    count (on policy at step 0 the loss is a near-zero sum of advantages). The reference is the initial policy:
    its logprobs are the current ones."""
    g = torch.Generator().manual_seed(seed)
    current = batch.ref_logprobs
    batch.old_logprobs = current + 0.3 * torch.randn(current.shape, generator=g)
    batch.ref_logprobs = current + 0.2 * torch.randn(current.shape, generator=g)


def trls_loss(model_dir, config, ds, batch, loss_tokens, accum):
    """TRL's own GRPOTrainer._compute_loss (config: GRPOConfig fields) on our micro-batch's tensors, with the
    generation batch's loss-token count and `accum` as transformers' training loop would set it."""
    theirs = trl.GRPOTrainer(model_dir, tiny.short_reward, trl.GRPOConfig(**config), train_dataset=ds)
    theirs.model.train()
    theirs.current_gradient_accumulation_steps = accum  # set by transformers' training loop
    inputs = {"prompt_ids": batch.prompt_ids, "prompt_mask": batch.prompt_mask, "completion_ids": batch.completion_ids,
              "completion_mask": batch.completion_mask, "advantages": batch.advantages,
              "ref_per_token_logps": batch.ref_logprobs, "old_per_token_logps": batch.old_logprobs,
              "num_items_in_batch": torch.tensor(loss_tokens)}
    return theirs._compute_loss(theirs.model, inputs)


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_loss_equals_trls_compute_loss(model_dir, tmp_path, loss_type, level):
    ds = Dataset.from_list(tiny.addition_rows(8))  # "a+b=": every prompt 4 tokens
    ours = GRPOTrainer(model_dir, tiny.short_reward, GRPOConfig(**fields(loss_type, level, tmp_path / "o")),
                       train_dataset=ds)
    batch, info = ours._generate_and_score()  # 8 completions, their advantages and reference logprobs
    assert batch.advantages.abs().sum() > 0 and batch.completion_mask.sum() > 8
    move_off_policy(batch, LOSS_TYPES.index(loss_type))
    loss, _ = ours._micro_batch_loss(batch, loss_tokens=info["loss_tokens"])
    assert loss.abs() > 1e-4
    expected = trls_loss(model_dir, fields(loss_type, level, tmp_path / "t"), ds, batch, info["loss_tokens"], 2)
    torch.testing.assert_close(loss.detach().double(), expected.detach().double(), rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("accum, steps_per_generation", [(1, 2), (2, 2), (2, 4)])
def test_dapo_normalizer_is_trls(model_dir, tmp_path, accum, steps_per_generation):
    """dapo divides by the whole generation batch's loss-token count, rescaled to one accumulation window
    (× gradient_accumulation_steps / steps_per_generation): the first micro-batch of a generation batch split in
    steps_per_generation, ours against TRL's _compute_loss with the same count and settings."""
    ds = Dataset.from_list(tiny.addition_rows(16))
    kw = dict(gradient_accumulation_steps=accum, steps_per_generation=steps_per_generation)
    ours = GRPOTrainer(model_dir, tiny.short_reward, GRPOConfig(**fields("dapo", "token", tmp_path / "o", **kw)),
                       train_dataset=ds)
    batch = ours._next_micro_batch()
    assert len(ours._buffer) == steps_per_generation
    loss_tokens = ours._buffer_info["loss_tokens"]  # the generation batch's, not this micro-batch's
    assert loss_tokens > float(batch.completion_mask.sum())
    move_off_policy(batch, accum * steps_per_generation)
    loss, _ = ours._micro_batch_loss(batch)
    expected = trls_loss(model_dir, fields("dapo", "token", tmp_path / "t", **kw), ds, batch, loss_tokens, accum)
    torch.testing.assert_close(loss.detach().double(), expected.detach().double(), rtol=1e-4, atol=1e-7)
