"""Importance-sampling correction for a generator whose sampling logprobs differ from the trainer's (vLLM).

TRL's rule (GRPOTrainer._generate_and_score_completions, `vllm_importance_sampling_*`): the ratio
exp(old_logp − sampler_logp) per token, or per sequence (sum of the masked differences); *_truncate modes clamp it
to [clip_min, clip_max], *_mask modes set it to 0 outside that range. Tokens whose sampler logprob is NaN count as
a zero difference (ratio 1). The loss multiplies each token's loss by this ratio (`is_ratio`).

Where this differs from TRL: with both bounds None, *_truncate returns the ratio unclamped (TRL calls
torch.clamp(min=None, max=None), which raises); a None bound means "no bound" in every mode.
"""
from __future__ import annotations

import torch

from fastrl.config import VLLM_IS_MODES as IS_MODES  # one list of the mode names, checked by GRPOConfig too


def sampling_ratio(old_logprobs: torch.Tensor, sampler_logprobs: torch.Tensor, mask: torch.Tensor, mode: str,
                   clip_min: float | None, clip_max: float | None) -> torch.Tensor:
    """old_logprobs, sampler_logprobs, mask [B, T] -> ratio [B, T] (token_* modes) or [B, 1] (sequence_* modes)."""
    if mode not in IS_MODES:
        raise ValueError(f"vllm_importance_sampling_mode must be one of {', '.join(IS_MODES)}; got {mode!r}")
    diff = torch.nan_to_num((old_logprobs - sampler_logprobs) * mask, nan=0.0)  # [B, T]
    if mode.startswith("sequence"):
        diff = diff.sum(dim=-1, keepdim=True)  # [B, 1]
    ratio = torch.exp(diff)
    if clip_min is None and clip_max is None:
        return ratio  # no bounds: nothing to clamp or mask
    if mode.endswith("truncate"):
        return torch.clamp(ratio, min=clip_min, max=clip_max)
    outside = torch.zeros_like(ratio, dtype=torch.bool)
    if clip_min is not None:
        outside |= ratio < clip_min
    if clip_max is not None:
        outside |= ratio > clip_max
    return ratio.masked_fill(outside, 0.0)
