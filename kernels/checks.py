"""Input validation: every bad input gets a ValueError naming the argument and what was expected.

Shapes, dtypes and settings are host facts and cost nothing. Value checks (finite entries, ids in [0, V)) need
the data: each is a device reduction, and `ValueChecks` reads all of one call's back in a single device->host
transfer (on a GPU each separate read stalls the stream: up to seven per loss call before), or, inside
`deferred_value_checks`, those of every call in the block at its end (the trainer: once per optimizer step).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, replace

import torch

from .loss_spec import LOSS_TYPES
from .params import IMPORTANCE_SAMPLING_LEVELS, SCALE_REWARDS, GRPOLossParams, LogitTransform, VespoParams

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _fail(name: str, expected: str, got) -> None:
    raise ValueError(f"{name}: expected {expected}, got {got}")


def check_shape(name: str, t: torch.Tensor, shape: tuple, what: str) -> None:
    if not isinstance(t, torch.Tensor):
        _fail(name, f"a tensor of shape {what}", type(t).__name__)
    if tuple(t.shape) != tuple(shape):
        _fail(name, f"shape {what} = {tuple(shape)}", tuple(t.shape))


class ValueChecks:
    """Value checks of one call, gathered as 0-d device counts of bad entries and read back once by `run`."""

    def __init__(self):
        self.items: list[tuple[str, str, torch.Tensor, object]] = []  # (argument, expected, count, describe)

    def finite(self, name: str, t: torch.Tensor | None) -> None:
        if t is not None:
            self.items.append((name, "finite values (no NaN or inf)", (~torch.isfinite(t)).sum(),
                               lambda n: f"{n} non-finite entries"))

    def no_inf(self, name: str, t: torch.Tensor) -> None:
        self.items.append((name, "finite values or NaN (unscorable)", torch.isinf(t).sum(),
                           lambda n: f"{n} infinite entries"))

    def ids(self, name: str, t: torch.Tensor, vocab: int) -> None:
        if t.numel():
            self.items.append((name, f"ids in [0, V) = [0, {vocab})", ((t < 0) | (t >= vocab)).sum(),
                               lambda n: f"min {int(t.min())}, max {int(t.max())}"))

    def run(self) -> None:
        """One device->host read for every check; a failing check raises naming its argument. Inside
        deferred_value_checks the checks join the block's queue instead."""
        if _deferred is not None:
            _deferred.items.extend(self.items)
            return
        if not self.items:
            return
        device = self.items[0][2].device
        counts = torch.stack([c.to(device) for _, _, c, _ in self.items]).tolist()
        for (name, expected, _, describe), n in zip(self.items, counts):
            if n:
                _fail(name, expected, describe(n))


_deferred: ValueChecks | None = None  # the queue of the active deferred_value_checks block (one thread)


@contextlib.contextmanager
def deferred_value_checks():
    """Queue the value checks of every kernel call inside and read them all in one device->host transfer at the
    end: a training step with many calls (micro-batches, old/reference logprobs) then stalls a GPU once. A bad
    input is found after the work that used it rather than before, so the trainer ends the block before its
    optimizer step. An exception inside (a NaN loss from a NaN input, an index error from an id out of range) is
    re-raised as the failing check's ValueError, naming its argument. A nested block joins the outer one."""
    global _deferred
    if _deferred is not None:
        yield
        return
    queue = _deferred = ValueChecks()
    try:
        yield
    except Exception as e:
        _deferred = None
        try:
            queue.run()
        except ValueError as named:  # a failing check explains the exception
            raise named from e
        raise
    finally:
        _deferred = None
    queue.run()


def check_linear_inputs(hidden, weight, targets, bias, checks: ValueChecks | None = None) -> None:
    """hidden [..., H], weight [V, H], targets [...] integer ids in [0, V), bias [V]. The id range is read by
    `checks.run()`: the caller's, or here when none is given."""
    if not isinstance(hidden, torch.Tensor) or hidden.dim() < 2:
        _fail("hidden", "a tensor [N, H] or [B, T, H]", getattr(hidden, "shape", type(hidden).__name__))
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        _fail("weight", "a 2-D lm_head weight [V, H]", getattr(weight, "shape", type(weight).__name__))
    if hidden.dtype not in FLOAT_DTYPES:
        _fail("hidden", "a floating dtype (float32, bfloat16, float16)", hidden.dtype)
    if weight.dtype != hidden.dtype:
        _fail("weight", f"the same dtype as hidden ({hidden.dtype})", weight.dtype)
    if weight.device != hidden.device:
        _fail("weight", f"the same device as hidden ({hidden.device})", weight.device)
    if weight.shape[1] != hidden.shape[-1]:
        _fail("weight", f"[V, H] with H = hidden.shape[-1] = {hidden.shape[-1]}", tuple(weight.shape))
    check_shape("targets", targets, hidden.shape[:-1], "hidden.shape[:-1]")
    if targets.dtype.is_floating_point or targets.dtype == torch.bool:
        _fail("targets", "integer token ids", targets.dtype)
    if targets.device != hidden.device:
        _fail("targets", f"the same device as hidden ({hidden.device})", targets.device)
    vocab = weight.shape[0]
    if bias is not None:
        check_shape("bias", bias, (vocab,), "[V]")
        if bias.dtype != hidden.dtype or bias.device != hidden.device:
            _fail("bias", f"dtype {hidden.dtype} on {hidden.device}", f"{bias.dtype} on {bias.device}")
    own = checks is None
    checks = ValueChecks() if own else checks
    checks.ids("targets", targets, vocab)
    if own:
        checks.run()


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _positive(value) -> bool:
    return _finite(value) and value > 0


def check_logit_transform(temperature, transform: LogitTransform | None) -> LogitTransform:
    """The checked LogitTransform of a call: the model's post-processing (`transform`, its temperature left at 1)
    with the sampling temperature."""
    if not _positive(temperature):
        _fail("temperature", "a positive number", temperature)
    if transform is None:
        return LogitTransform(temperature=float(temperature))
    if not isinstance(transform, LogitTransform):
        _fail("logit_transform", "a fastrl.kernels.LogitTransform or None", type(transform).__name__)
    if transform.temperature != 1.0:
        _fail("logit_transform.temperature", "1.0 (pass the sampling temperature as temperature=)",
              transform.temperature)
    for name in ("logit_scale", "hidden_scale"):
        if not _positive(getattr(transform, name)):
            _fail(f"logit_transform.{name}", "a positive finite number", getattr(transform, name))
    if transform.softcap is not None and not _positive(transform.softcap):
        _fail("logit_transform.softcap", "a positive finite number or None", transform.softcap)
    return replace(transform, temperature=float(temperature))


@dataclass
class GRPOInputs:
    """Validated loss inputs: tensors in their original dtypes plus the scalar settings."""

    params: GRPOLossParams
    advantages: torch.Tensor | None  # [B]
    rewards: torch.Tensor | None  # [B]
    num_generations: int | None
    scale_rewards: str
    bias: torch.Tensor | None
    old_logprobs: torch.Tensor | None  # [B, T] ([N] packed)
    ref_logprobs: torch.Tensor | None  # [B, T] ([N] packed)
    is_ratio: torch.Tensor | None  # [B, T] ([N] packed) or [B, 1]
    sampling_logprobs: torch.Tensor | None = None  # [B, T] ([N] packed), the off-policy mask's, NaN = unscored


def _check_choice(name, value, choices):
    if value not in choices:
        _fail(name, f"one of {list(choices)}", repr(value))


def _check_advantage_source(advantages, rewards, num_generations, scale_rewards, batch, checks: ValueChecks):
    if (advantages is None) == (rewards is None):
        _fail("advantages/rewards", "exactly one of advantages [B] or rewards [B] (+ num_generations)",
              "both" if advantages is not None else "neither")
    if advantages is not None:
        check_shape("advantages", advantages, (batch,), "[B]")
        checks.finite("advantages", advantages)
        return
    check_shape("rewards", rewards, (batch,), "[B]")
    checks.finite("rewards", rewards)
    _check_choice("scale_rewards", scale_rewards, SCALE_REWARDS)
    if not isinstance(num_generations, int) or num_generations < 1 or batch % num_generations:
        _fail("num_generations", f"a positive integer dividing the batch size B = {batch}", num_generations)


def _check_loss_settings(p: GRPOLossParams, ref_logprobs) -> None:
    _check_choice("loss_type", p.loss_type, LOSS_TYPES)
    _check_choice("importance_sampling_level", p.importance_sampling_level, IMPORTANCE_SAMPLING_LEVELS)
    if p.loss_type == "dr_grpo" and not (isinstance(p.max_completion_length, int) and p.max_completion_length > 0):
        _fail("max_completion_length", "a positive integer when loss_type='dr_grpo'", p.max_completion_length)
    if p.beta < 0:
        _fail("beta", "a non-negative KL coefficient", p.beta)
    if p.beta > 0 and ref_logprobs is None:
        _fail("ref_logprobs", "reference logprobs [B, T] when beta > 0", None)
    if p.epsilon_low < 0 or p.epsilon_high < 0:
        _fail("epsilon/epsilon_high", "non-negative clip ranges", (p.epsilon_low, p.epsilon_high))
    if p.delta is not None and p.delta <= 1.0:
        _fail("delta", "a ratio cap > 1 (or None)", p.delta)
    if not 0.0 < p.top_entropy_quantile <= 1.0:
        _fail("top_entropy_quantile", "a value in (0, 1]", p.top_entropy_quantile)
    if p.num_items_in_batch is not None and not float(p.num_items_in_batch) > 0:
        _fail("num_items_in_batch", "a positive token count", p.num_items_in_batch)
    for name in ("k_pos", "lambda_pos", "k_neg", "lambda_neg"):
        if not _finite(getattr(p.vespo, name)):
            _fail(f"vespo_{name}", "a finite number", getattr(p.vespo, name))
    for name in ("off_policy_mask_threshold", "entropy_coef"):
        if getattr(p, name) is not None and not _finite(getattr(p, name)):
            _fail(name, "a finite number or None", getattr(p, name))


def check_cu_seqlens(cu_seqlens, n_rows: int, checks: ValueChecks) -> int:
    """cu_seqlens [B + 1]: integer row offsets from 0 to N, non-decreasing (sequence b owns rows
    cu_seqlens[b]:cu_seqlens[b + 1]); the values are read by `checks.run()`. Returns B."""
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        _fail("cu_seqlens", "a 1-D tensor [B + 1] of row offsets", getattr(cu_seqlens, "shape", cu_seqlens))
    if cu_seqlens.dtype.is_floating_point or cu_seqlens.dtype == torch.bool:
        _fail("cu_seqlens", "integer row offsets", cu_seqlens.dtype)
    checks.items.append(("cu_seqlens", f"offsets rising from 0 to N = hidden.shape[0] = {n_rows}",
                         (cu_seqlens[0] != 0).int() + (cu_seqlens[-1] != n_rows).int() + (cu_seqlens.diff() < 0).sum(),
                         lambda n: cu_seqlens.tolist()))
    return cu_seqlens.numel() - 1


def _token_layout(hidden, cu_seqlens, checks: ValueChecks) -> tuple[int, tuple, str]:
    """(B, the shape of a per-token tensor, its name): [B, T] for padded hidden [B, T, H], [N] for packed
    hidden [N, H] with cu_seqlens."""
    if cu_seqlens is None:
        if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3:
            _fail("hidden", "a tensor [B, T, H] (or packed rows [N, H] with cu_seqlens)",
                  getattr(hidden, "shape", type(hidden).__name__))
        return hidden.shape[0], tuple(hidden.shape[:2]), "[B, T]"
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 2:
        _fail("hidden", "packed rows [N, H] when cu_seqlens is given", getattr(hidden, "shape", type(hidden)))
    return check_cu_seqlens(cu_seqlens, hidden.shape[0], checks), (hidden.shape[0],), "[N]"


def validate_grpo_inputs(hidden, weight, targets, mask, advantages=None, *, rewards=None, num_generations=None,
                         scale_rewards="group", old_logprobs=None, ref_logprobs=None, bias=None, beta=0.0,
                         epsilon=0.2, epsilon_high=None, delta=None, temperature=1.0, loss_type="dapo",
                         importance_sampling_level="token", use_bias_correction_kl=False,
                         max_completion_length=None, num_items_in_batch=None, is_ratio=None,
                         top_entropy_quantile=1.0, logit_transform=None, cu_seqlens=None, sampling_logprobs=None,
                         off_policy_mask_threshold=None, entropy_coef=None, vespo_k_pos=2.0, vespo_lambda_pos=3.0,
                         vespo_k_neg=3.0, vespo_lambda_neg=2.0) -> GRPOInputs:
    checks = ValueChecks()
    batch, tokens, what = _token_layout(hidden, cu_seqlens, checks)
    check_linear_inputs(hidden, weight, targets, bias, checks)
    check_shape("mask", mask, tokens, what)
    for name, t in (("old_logprobs", old_logprobs), ("ref_logprobs", ref_logprobs)):
        if t is not None:
            check_shape(name, t, tokens, what)
            checks.finite(name, t)
    if sampling_logprobs is not None:
        check_shape("sampling_logprobs", sampling_logprobs, tokens, what)
        checks.no_inf("sampling_logprobs", sampling_logprobs)
    if is_ratio is not None:
        if tuple(is_ratio.shape) not in (tokens, (batch, 1)):
            _fail("is_ratio", f"shape {what} = {tokens} or [B, 1]", tuple(is_ratio.shape))
        if loss_type == "vespo" and tuple(is_ratio.shape) != tokens:  # TRL: token_* vLLM modes only
            _fail("is_ratio", f"per-token ratios {what} = {tokens} for loss_type='vespo'", tuple(is_ratio.shape))
        checks.finite("is_ratio", is_ratio)
    if isinstance(num_items_in_batch, torch.Tensor):
        num_items_in_batch = float(num_items_in_batch)
    params = GRPOLossParams(
        loss_type=loss_type, beta=float(beta), epsilon_low=float(epsilon),
        epsilon_high=float(epsilon if epsilon_high is None else epsilon_high), delta=delta,
        logits=check_logit_transform(temperature, logit_transform),
        importance_sampling_level=importance_sampling_level,
        use_bias_correction_kl=bool(use_bias_correction_kl), max_completion_length=max_completion_length,
        num_items_in_batch=num_items_in_batch, top_entropy_quantile=float(top_entropy_quantile),
        vespo=VespoParams(vespo_k_pos, vespo_lambda_pos, vespo_k_neg, vespo_lambda_neg),
        off_policy_mask_threshold=off_policy_mask_threshold, entropy_coef=entropy_coef)
    _check_loss_settings(params, ref_logprobs)
    _check_advantage_source(advantages, rewards, num_generations, scale_rewards, batch, checks)
    checks.run()
    return GRPOInputs(params, advantages, rewards, num_generations, scale_rewards, bias,
                      old_logprobs, ref_logprobs if params.beta != 0.0 else None, is_ratio,
                      sampling_logprobs if off_policy_mask_threshold is not None else None)
