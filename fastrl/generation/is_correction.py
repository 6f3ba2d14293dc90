"""How far the generator's sampling logprobs are from the trainer's, and the importance-sampling correction.

The trainer recomputes the logprob of every sampled token with its own weights right after generation. With a
generator whose weights were just pushed, the two differ only by numerics (kernels, dtype), so the mean absolute
difference (`rollout/logprob_abs_diff`) stays near 0; a push that did not land shows up at once as a large value.

`importance_sampling_ratio` is TRL's vLLM correction (`vllm_importance_sampling_*` in trl's GRPOTrainer), with its
shapes and defaults; the arithmetic is the trainer's `fastrl.importance_sampling.sampling_ratio`, which this checks
the inputs of, so there is a single implementation.
"""
from __future__ import annotations

import torch

from fastrl.importance_sampling import IS_MODES, sampling_ratio

__all__ = ["IS_MODES", "importance_sampling_ratio", "logprob_abs_diff"]


def _check(sampler_logprobs: torch.Tensor, trainer_logprobs: torch.Tensor, mask: torch.Tensor) -> None:
    if sampler_logprobs.ndim != 2 or sampler_logprobs.shape != trainer_logprobs.shape \
            or mask.shape != sampler_logprobs.shape:
        raise ValueError("sampler_logprobs, trainer_logprobs and mask must all be [B, T]; got "
                         f"{tuple(sampler_logprobs.shape)}, {tuple(trainer_logprobs.shape)}, {tuple(mask.shape)}")
    if torch.isnan(trainer_logprobs[mask.bool()]).any():
        raise ValueError("trainer_logprobs holds NaN at unmasked positions")


def logprob_abs_diff(sampler_logprobs: torch.Tensor, trainer_logprobs: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean |sampler − trainer| logprob over the tokens where mask is set, all [B, T].

    Tokens whose sampler logprob is unknown (NaN) are left out, as TRL does for its
    `sampling/sampling_logp_difference/mean`; no token to compare gives 0.0.
    """
    _check(sampler_logprobs, trainer_logprobs, mask)
    delta = (sampler_logprobs.double() - trainer_logprobs.double()).abs()  # [B, T]
    keep = mask.bool() & ~torch.isnan(delta)
    return float(delta[keep].mean()) if keep.any() else 0.0


def importance_sampling_ratio(sampler_logprobs: torch.Tensor, trainer_logprobs: torch.Tensor, mask: torch.Tensor,
                              mode: str = "sequence_mask", clip_min: float | None = None,
                              clip_max: float | None = 3.0) -> torch.Tensor:
    """TRL's vLLM importance-sampling ratio: [B, T] for token_* modes, [B, 1] for sequence_* modes.

    ratio = exp(trainer − sampler) per token (sequence modes: exp of the masked sum over the sequence); *_truncate
    clamps it to [clip_min, clip_max], *_mask sets it to 0 outside. NaN sampler logprobs count as no difference.
    Defaults are TRL's (mode "sequence_mask", clip_max 3.0, clip_min None).
    """
    if mode not in IS_MODES:
        raise ValueError(f"mode (vllm_importance_sampling_mode) must be one of {IS_MODES}, got {mode!r}")
    if clip_min is not None and clip_max is not None and clip_min >= clip_max:
        raise ValueError(f"clip_min ({clip_min}) must be less than clip_max ({clip_max})")
    _check(sampler_logprobs, trainer_logprobs, mask)
    return sampling_ratio(trainer_logprobs, sampler_logprobs, mask, mode, clip_min, clip_max)
