"""The trainer's micro-batch loss against TRL's own `_compute_loss` on identical tensors: the same tiny model (fp32),
the same completions, advantages and reference logprobs, every loss type (luspo, vespo included) at both importance
sampling levels, with beta > 0 and gradient accumulation, and dapo's normaliser across gradient accumulation and
steps_per_generation; then the loss-side options (entropy bonus, static and adaptive, with the entropy quantile;
off-policy sequence masking from old or sampling logprobs; VESPO with vLLM's importance-sampling ratios), with
TRL's logged policy_loss, vespo/phi_seq_mean and entropy controller state. Prompts share one length, so neither
side pads them."""
import dataclasses
import math

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


def assert_same_loss(ours_loss, theirs_loss):
    assert ours_loss.abs() > 1e-4
    torch.testing.assert_close(ours_loss.detach().double(), theirs_loss.detach().double(), rtol=1e-4, atol=1e-7)


def move_off_policy(batch, seed):
    """Old and reference logprobs moved away from the current ones, so that ratios, clipping and the KL term all
    count (on policy at step 0 the loss is a near-zero sum of advantages). The reference is the initial policy:
    its logprobs are the current ones."""
    g = torch.Generator().manual_seed(seed)
    current = batch.ref_logprobs
    batch.old_logprobs = current + 0.3 * torch.randn(current.shape, generator=g)
    batch.ref_logprobs = current + 0.2 * torch.randn(current.shape, generator=g)


def trl_trainer(model_dir, config, ds, accum):
    """TRL's own GRPOTrainer (config: GRPOConfig fields) in training mode, `accum` set as transformers' training
    loop would set it."""
    theirs = trl.GRPOTrainer(model_dir, tiny.short_reward, trl.GRPOConfig(**config), train_dataset=ds)
    theirs.model.train()
    theirs.current_gradient_accumulation_steps = accum  # set by transformers' training loop
    return theirs


def trl_inputs(batch, loss_tokens, **extra):
    """Our micro-batch's tensors as TRL's _compute_loss reads them, with the generation batch's loss-token count."""
    return {"prompt_ids": batch.prompt_ids, "prompt_mask": batch.prompt_mask, "completion_ids": batch.completion_ids,
            "completion_mask": batch.completion_mask, "advantages": batch.advantages,
            "ref_per_token_logps": batch.ref_logprobs, "old_per_token_logps": batch.old_logprobs,
            "num_items_in_batch": torch.tensor(loss_tokens), **extra}


def trls_loss(model_dir, config, ds, batch, loss_tokens, accum):
    """TRL's own GRPOTrainer._compute_loss on our micro-batch's tensors."""
    theirs = trl_trainer(model_dir, config, ds, accum)
    return theirs._compute_loss(theirs.model, trl_inputs(batch, loss_tokens))


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_loss_equals_trls_compute_loss(model_dir, tmp_path, loss_type, level):
    ds = Dataset.from_list(tiny.addition_rows(8))  # "a+b=": every prompt 4 tokens
    ours = GRPOTrainer(model_dir, tiny.short_reward, GRPOConfig(**fields(loss_type, level, tmp_path / "o")),
                       train_dataset=ds)
    batch, info = ours._generate_and_score()  # 8 completions, their advantages and reference logprobs
    assert batch.advantages.abs().sum() > 0 and batch.completion_mask.sum() > 8
    move_off_policy(batch, LOSS_TYPES.index(loss_type))
    loss, metrics = ours._micro_batch_loss(batch, loss_tokens=info["loss_tokens"])
    theirs = trl_trainer(model_dir, fields(loss_type, level, tmp_path / "t"), ds, 2)
    assert_same_loss(loss, theirs._compute_loss(theirs.model, trl_inputs(batch, info["loss_tokens"])))
    if loss_type == "vespo":  # φ spread away from 1 by the off-policy ratios, as TRL logs its mean
        assert abs(float(metrics["vespo/phi_seq_mean"]) - 1.0) > 1e-3
        assert float(metrics["vespo/phi_seq_mean"]) == pytest.approx(theirs._metrics["train"]["vespo/phi_seq_mean"][-1],
                                                                      rel=1e-5)


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


def both_trainers(model_dir, tmp_path, loss_type, level, seed, **extra):
    """(ours, TRL's, our generation batch moved off policy, its loss-token count), the same GRPOConfig fields."""
    ds = Dataset.from_list(tiny.addition_rows(8))
    ours = GRPOTrainer(model_dir, tiny.short_reward, GRPOConfig(**fields(loss_type, level, tmp_path / "o", **extra)),
                       train_dataset=ds)
    batch, info = ours._generate_and_score()
    move_off_policy(batch, seed)
    return ours, trl_trainer(model_dir, fields(loss_type, level, tmp_path / "t", **extra), ds, 2), batch, \
        info["loss_tokens"]


ENTROPY_CASES = {  # loss_type, extra GRPOConfig fields
    "dapo-static": ("dapo", dict(entropy_coef=0.05)),  # ITEMS: the bonus is still divided by accumulation
    "grpo-static-quantile": ("grpo", dict(entropy_coef=0.05, top_entropy_quantile=0.5)),
    "vespo-static": ("vespo", dict(entropy_coef=0.02)),
    "bnpo-adaptive": ("bnpo", dict(use_adaptive_entropy=True, entropy_coef=0.1, entropy_target=50.0)),
    "dapo-adaptive-above-target": ("dapo", dict(use_adaptive_entropy=True, entropy_coef=0.1, entropy_target=0.01)),
}


@pytest.mark.parametrize("case", ENTROPY_CASES)
def test_entropy_bonus_equals_trls(model_dir, tmp_path, case):
    loss_type, extra = ENTROPY_CASES[case]
    ours, theirs, batch, tokens = both_trainers(model_dir, tmp_path, loss_type, "token", 11, **extra)
    if extra.get("use_adaptive_entropy"):  # as after a first step that measured entropy 0.05: the bonus applies
        ours.entropy_control.last_entropy = theirs._last_world_entropy = 0.05  # while 0.05 <= entropy_target
    ours.model.train()
    loss, metrics = ours._micro_batch_loss(batch, loss_tokens=tokens)
    assert_same_loss(loss, theirs._compute_loss(theirs.model, trl_inputs(batch, tokens)))
    assert float(metrics["policy_loss"]) == pytest.approx(theirs._metrics["train"]["policy_loss"][-1], rel=1e-4)
    if extra.get("use_adaptive_entropy"):  # TRL updated its coefficient from this micro-batch (sync_gradients)
        ours.entropy_control.end_step(*ours.entropy_control.window)
        assert ours.entropy_control.coef == pytest.approx(theirs.entropy_coef, abs=1e-12)
        assert ours.entropy_control.last_entropy == pytest.approx(theirs._last_world_entropy, rel=1e-5)
        assert ours.entropy_control.coef != extra["entropy_coef"]


def test_entropy_bonus_changes_the_loss(model_dir, tmp_path):
    """The bonus is in the loss: the same batch with entropy_coef 0.05 differs by 0.05 × its mean entropy / 2."""
    ours, _, batch, tokens = both_trainers(model_dir, tmp_path, "dapo", "token", 3, entropy_coef=0.05)
    with_bonus, metrics = ours._micro_batch_loss(batch, loss_tokens=tokens)
    ours.entropy_control.coef = 0.0
    without, _ = ours._micro_batch_loss(batch, loss_tokens=tokens)
    assert float(without - with_bonus) == pytest.approx(0.05 * float(metrics["entropy"]) / 2, rel=1e-4)


@pytest.mark.parametrize("source", ["old", "sampling"])
@pytest.mark.parametrize("loss_type", ["bnpo", "grpo"])
def test_off_policy_mask_equals_trls(model_dir, tmp_path, loss_type, source):
    ours, theirs, batch, tokens = both_trainers(model_dir, tmp_path, loss_type, "token", 5,
                                                off_policy_mask_threshold=0.02)
    extra = {}
    if source == "sampling":  # vLLM's logprobs: TRL measures those when present (NaN = unscored, counted as 0)
        g = torch.Generator().manual_seed(9)
        batch.sampling_logprobs = batch.old_logprobs + 0.2 * torch.randn(batch.old_logprobs.shape, generator=g)
        batch.sampling_logprobs[0, 1] = math.nan
        extra = {"sampling_per_token_logps": batch.sampling_logprobs}
    loss, _ = ours._micro_batch_loss(batch, loss_tokens=tokens)
    assert_same_loss(loss, theirs._compute_loss(theirs.model, trl_inputs(batch, tokens, **extra)))
    # the mask dropped some sequence here: without it the loss differs
    ours.loss_spec = dataclasses.replace(ours.loss_spec, off_policy_mask_threshold=None)
    unmasked, _ = ours._micro_batch_loss(batch, loss_tokens=tokens)
    assert abs(float(unmasked - loss)) > 1e-5


def test_vespo_folds_importance_sampling_ratios_like_trl(model_dir, tmp_path):
    """vLLM's per-token ratios (token_mask: some 0) enter VESPO's sequence weight, not the per-token loss."""
    ours, theirs, batch, tokens = both_trainers(model_dir, tmp_path, "vespo", "token", 13)
    g = torch.Generator().manual_seed(21)
    batch.is_ratio = (0.6 + 0.8 * torch.rand(batch.completion_mask.shape, generator=g)) * batch.completion_mask
    batch.is_ratio += 1.0 - batch.completion_mask  # padding carries ratio 1, as TRL's exp(0)
    batch.is_ratio[1, 0] = 0.0  # token_mask dropped this token: log 0 clamped to log 1e-8
    loss, metrics = ours._micro_batch_loss(batch, loss_tokens=tokens)
    assert_same_loss(loss, theirs._compute_loss(theirs.model, trl_inputs(batch, tokens,
                                                                         importance_sampling_ratio=batch.is_ratio)))
    assert float(metrics["vespo/phi_seq_mean"]) == pytest.approx(theirs._metrics["train"]["vespo/phi_seq_mean"][-1],
                                                                  rel=1e-5)
