"""Group-normalized advantages: A_i = (r_i − mean_group(r)) / (std_group(r) + eps), TRL's definition.

std is Bessel-corrected (TRL's `nanstd`). A NaN reward marks a completion no reward function could score: it is
left out of its group's mean and std and gets advantage 0, as in TRL's `_generate_and_score_completions`.
"""
from __future__ import annotations

import torch

from .checks import ValueChecks
from .params import SCALE_REWARDS


def _nan_mean_std(x: torch.Tensor, dim: int | None):
    """Mean and Bessel-corrected std ignoring NaN; std is NaN where fewer than two values are present."""
    valid = ~torch.isnan(x)
    count = valid.sum(dim=dim, keepdim=True).to(x.dtype)
    zeroed = torch.where(valid, x, torch.zeros_like(x))
    mean = zeroed.sum(dim=dim, keepdim=True) / count
    sq = torch.where(valid, (x - mean) ** 2, torch.zeros_like(x)).sum(dim=dim, keepdim=True)
    std = torch.sqrt(sq / (count - 1))  # count == 1 -> inf/NaN, count == 0 -> NaN; both end as advantage 0
    return mean, std


def group_advantages(rewards: torch.Tensor, num_generations: int, *, scale_rewards: str = "group",
                     eps: float = 1e-4) -> torch.Tensor:
    """rewards [B] (B = prompts × num_generations, grouped contiguously) -> advantages [B] float32."""
    if not isinstance(rewards, torch.Tensor) or rewards.dim() != 1:
        raise ValueError(f"rewards: expected a 1-D tensor [B], got {getattr(rewards, 'shape', type(rewards))}")
    if not isinstance(num_generations, int) or num_generations < 1 or rewards.numel() % num_generations:
        raise ValueError(f"num_generations: expected a positive integer dividing B = {rewards.numel()}, "
                         f"got {num_generations}")
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards: expected one of {list(SCALE_REWARDS)}, got {scale_rewards!r}")
    checks = ValueChecks()
    checks.no_inf("rewards", rewards)
    checks.run()
    return normalized_advantages(rewards, num_generations, scale_rewards, eps)


def normalized_advantages(rewards: torch.Tensor, num_generations: int, scale_rewards: str,
                          eps: float = 1e-4) -> torch.Tensor:
    """group_advantages on rewards already checked (the loss entry point checks them with its other inputs)."""
    r = rewards.float()
    groups = r.view(-1, num_generations)  # [P, G]
    mean, std = _nan_mean_std(groups, dim=1)  # [P, 1] each
    adv = (groups - mean).reshape(-1)  # [B]
    if scale_rewards == "group":
        adv = adv / (std.repeat_interleave(num_generations, dim=0).reshape(-1) + eps)
    elif scale_rewards == "batch":
        adv = adv / (_nan_mean_std(r, dim=None)[1].reshape(()) + eps)
    return torch.nan_to_num(adv, nan=0.0, posinf=0.0, neginf=0.0)
