"""Calling reward functions the way TRL does, and checking what they return.

A reward function is called as f(prompts=..., completions=..., completion_ids=..., **columns, trainer_state=...,
log_metric=..., log_extra=...) with one entry per completion (prompt columns repeated num_generations times) and
returns one number or None per completion. None means "not applicable" and becomes NaN; a completion every
function scored None is unscorable: NaN reward, left out of group statistics, advantage 0 (TRL's rule).
"""
from __future__ import annotations

import asyncio
import importlib
import inspect
import math
import numbers
from typing import Callable

import torch


def resolve_reward_funcs(reward_funcs) -> tuple[list[Callable], list[str]]:
    """One callable, a "module:function" string, or a list of them -> (functions, names)."""
    if not isinstance(reward_funcs, (list, tuple)):
        reward_funcs = [reward_funcs]
    if not reward_funcs:
        raise ValueError("reward_funcs: expected at least one reward function, got an empty list")
    funcs = [import_reward(f) if isinstance(f, str) else f for f in reward_funcs]
    for f in funcs:
        if isinstance(f, torch.nn.Module):
            raise ValueError(f"reward_funcs: reward models ({type(f).__name__}) are not supported yet; "
                             "pass a function")
        if not callable(f):
            raise ValueError(f"reward_funcs: expected callables, got {f!r}")
    names = [getattr(f, "__name__", type(f).__name__) for f in funcs]
    return funcs, names


def import_reward(spec: str) -> Callable:
    """'package.module:function' -> that function; a bare name -> fastrl.rewards.REGISTRY[name]."""
    module_name, sep, attr = spec.partition(":")
    if not sep:
        from fastrl.rewards import REGISTRY

        if spec not in REGISTRY:
            raise ValueError(f"rewards: unknown reward {spec!r}; built-in names are {sorted(REGISTRY)}, "
                             "or give 'module:function'")
        return REGISTRY[spec]
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"rewards: could not import reward {spec!r} ({e})") from None


def check_reward_output(name: str, values, expected: int) -> list[float]:
    if not isinstance(values, (list, tuple)) and not (isinstance(values, torch.Tensor) and values.dim() == 1):
        raise ValueError(f"reward function {name!r} returned {type(values).__name__}; expected a list of "
                         f"{expected} numbers (or None)")
    values = values.tolist() if isinstance(values, torch.Tensor) else list(values)
    if len(values) != expected:
        raise ValueError(f"reward function {name!r} returned {len(values)} rewards, expected {expected} "
                         "(one per completion)")
    out = []
    for v in values:
        if isinstance(v, torch.Tensor) and v.numel() == 1:
            v = v.item()
        if v is None:
            out.append(math.nan)
        elif isinstance(v, numbers.Real):  # int, float, bool, numpy scalars
            if math.isinf(float(v)):
                raise ValueError(f"reward function {name!r} returned {v}; rewards must be finite (or None)")
            out.append(float(v))
        else:
            raise ValueError(f"reward function {name!r} returned a non-number {v!r} ({type(v).__name__}); "
                             "expected numbers or None")
    return out


def score(funcs, names, prompts, completions, completion_ids, columns: dict, extras: dict) -> torch.Tensor:
    """Call every reward function on B completions -> rewards_per_func [B, F] float32 (NaN = None)."""
    kwargs = {**columns, **extras}
    outputs: dict[int, list] = {}
    pending = []
    for i, f in enumerate(funcs):
        if inspect.iscoroutinefunction(f) or inspect.iscoroutinefunction(getattr(f, "__call__", None)):
            pending.append((i, f))
        else:
            outputs[i] = f(prompts=prompts, completions=completions, completion_ids=completion_ids, **kwargs)
    if pending:
        async def run_all():
            return await asyncio.gather(*(f(prompts=prompts, completions=completions,
                                            completion_ids=completion_ids, **kwargs) for _, f in pending))

        for (i, _), out in zip(pending, asyncio.run(run_all())):
            outputs[i] = out
    cols = [check_reward_output(names[i], outputs[i], len(prompts)) for i in range(len(funcs))]
    return torch.tensor(cols, dtype=torch.float32).T.reshape(len(prompts), len(funcs))  # [B, F]


def combine(rewards_per_func: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """[B, F] -> [B]: weighted nansum; rows where every function returned None stay NaN (unscorable)."""
    rewards = (rewards_per_func * weights.unsqueeze(0)).nansum(dim=1)
    rewards[torch.isnan(rewards_per_func).all(dim=1)] = math.nan
    return rewards
