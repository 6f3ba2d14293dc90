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
import logging
import math
import numbers
import warnings
from typing import Callable

import torch

from fastrl.config import AGGREGATIONS
from fastrl.kernels import group_advantages
from fastrl.kernels.advantages import _nan_mean_std
from fastrl.rewards.reward_model import load_reward_model, reward_model_name

log = logging.getLogger(__name__)


def resolve_reward_funcs(reward_funcs, model_init_kwargs: dict | None = None,
                         optional: bool = False) -> tuple[list, list[str]]:
    """One callable, reward model or string, or a list of them -> (functions and models, TRL's names).
    optional: none is fine (an environment may score its rollouts; check_reward_source runs once they are known).

    A string is "module:function", a built-in reward name, or else a reward model's id or folder."""
    if reward_funcs is None:
        reward_funcs = []
    elif not isinstance(reward_funcs, (list, tuple)):
        reward_funcs = [reward_funcs]
    if not optional:
        check_reward_source(reward_funcs)
    funcs = [import_reward(f, model_init_kwargs) if isinstance(f, str) else f for f in reward_funcs]
    for f in funcs:
        if isinstance(f, torch.nn.Module) and not hasattr(f, "config"):
            raise ValueError(f"reward_funcs: a reward model must be a transformers model with a .config, got "
                             f"{type(f).__name__}")
        if not callable(f):
            raise ValueError(f"reward_funcs: expected callables or reward models, got {f!r}")
    names = [reward_model_name(f) if isinstance(f, torch.nn.Module) else getattr(f, "__name__", type(f).__name__)
             for f in funcs]
    return funcs, names


def check_reward_source(funcs: list) -> None:
    if not funcs:  # TRL's message (an environment's get_reward is the other source TRL accepts)
        raise ValueError("No reward source provided. Pass `reward_funcs`, or an `environment_factory` whose "
                         "environment defines a `get_reward` method.")


def import_reward(spec: str, model_init_kwargs: dict | None = None) -> Callable | torch.nn.Module:
    """'package.module:function' -> that function; a built-in name -> fastrl.rewards.REGISTRY[name]; anything
    else -> the reward model it names (a model id or folder, as TRL loads it)."""
    module_name, sep, attr = spec.partition(":")
    if not sep:
        from fastrl.rewards import REGISTRY

        if spec not in REGISTRY:
            return load_reward_model(spec, model_init_kwargs)
        return REGISTRY[spec]
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"rewards: could not import reward {spec!r} ({e})") from None


REWARD_ARGS = ("prompts", "completions", "completion_ids", "trainer_state", "log_metric", "log_extra")
# |reward| above this is refused: the group std squares deviations in float32 (max 3.4e38), so 1e19 would
# overflow to inf and every advantage of the group would be NaN.
MAX_ABS_REWARD = 1e18


def check_reward_weights(weights, funcs) -> None:
    if weights is not None and len(weights) != len(funcs):
        raise ValueError(f"reward_weights: {len(weights)} weights for {len(funcs)} reward functions")


def check_reward_columns(funcs, names, columns) -> None:
    """Each reward function's required keyword arguments must be dataset columns (or what the trainer passes):
    found before training rather than as a TypeError at the first step."""
    for f, name in zip(funcs, names):
        if isinstance(f, torch.nn.Module):  # a reward model reads the prompt and completion text only
            continue
        try:
            params = inspect.signature(f).parameters.values()
        except (TypeError, ValueError):  # a builtin or C callable: nothing to check
            continue
        needed = [p.name for p in params if p.default is inspect.Parameter.empty
                  and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name not in REWARD_ARGS]
        missing = [n for n in needed if n not in columns]
        if missing:
            raise ValueError(f"reward function {name!r} needs dataset column(s) {missing}; the dataset has "
                             f"{sorted(columns)}")


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
            if not abs(float(v)) <= MAX_ABS_REWARD and not math.isnan(float(v)):
                raise ValueError(f"reward function {name!r} returned {v}; rewards must be finite and at most "
                                 f"{MAX_ABS_REWARD:g} in magnitude (or None)")
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
            with _named(names[i]):
                outputs[i] = f(prompts=prompts, completions=completions, completion_ids=completion_ids, **kwargs)
    if pending:
        async def call(i, f):
            with _named(names[i]):
                return await f(prompts=prompts, completions=completions, completion_ids=completion_ids, **kwargs)

        async def run_all():
            return await asyncio.gather(*(call(i, f) for i, f in pending))

        for (i, _), out in zip(pending, asyncio.run(run_all())):
            outputs[i] = out
    cols = [check_reward_output(names[i], outputs[i], len(prompts)) for i in range(len(funcs))]
    rewards_per_func = torch.tensor(cols, dtype=torch.float32).T.reshape(len(prompts), len(funcs))  # [B, F]
    unscorable = torch.isnan(rewards_per_func).all(dim=1)
    if unscorable.any():  # TRL's warning, with the first such row's arguments
        row = int(unscorable.nonzero()[0, 0])
        shown = {k: v[row] for k, v in columns.items()}
        shown.update(prompt=prompts[row], completion=completions[row])
        log.warning(f"All reward functions returned None for the following kwargs:\n{shown}\n"
                    "Please ensure that at least one reward function returns a valid reward.")
    return rewards_per_func


class RewardFunctionError(RuntimeError):
    """A reward function raised; the message names it, the original exception is the cause."""


class _named:
    """Re-raise anything a reward function raises as RewardFunctionError naming the function."""

    def __init__(self, name: str):
        self.name = name

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        if exc is not None and isinstance(exc, Exception):
            raise RewardFunctionError(f"reward function {self.name!r} raised {kind.__name__}: {exc}") from exc
        return False


class UninformativeRewardWarning:
    """Warns once per reward function whose rewards in a generation batch are all None/NaN or all equal: such a
    function gives no learning signal there (every advantage it contributes is 0)."""

    def __init__(self, names: list[str]):
        self.names, self.warned = names, set()

    def check(self, rewards_per_func: torch.Tensor) -> None:  # [B, F]
        for i, name in enumerate(self.names):
            column = rewards_per_func[:, i]
            valid = column[~torch.isnan(column)]
            if name in self.warned or (valid.numel() > 0 and not torch.all(valid == valid[0])):
                continue
            what = "None or NaN for every completion" if valid.numel() == 0 else f"{float(valid[0]):g} for every " \
                "completion"
            warnings.warn(f"reward function {name!r} returned {what} of a generation batch: it gives no learning "
                          "signal there (warned once per function)", stacklevel=2)
            self.warned.add(name)


def combine(rewards_per_func: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """[B, F] -> [B]: weighted nansum; rows where every function returned None stay NaN (unscorable).
    This is the logged `reward` under either aggregation, as in TRL."""
    rewards = (rewards_per_func * weights.unsqueeze(0).to(rewards_per_func.device)).nansum(dim=1)
    rewards[torch.isnan(rewards_per_func).all(dim=1)] = math.nan
    return rewards


def aggregate_advantages(rewards_per_func: torch.Tensor, weights: torch.Tensor, num_generations: int,
                         aggregation: str, scale_rewards: str) -> tuple[torch.Tensor, torch.Tensor]:
    """TRL's multi_objective_aggregation: [B, F] rewards -> (advantages [B], reward std used for scaling [B]).

    sum_then_normalize: the weighted sum, then group advantages under scale_rewards.
    normalize_then_sum: each function's rewards normalized within their group, weighted and summed, then the sum
    standardized over the whole batch (scale_rewards does not apply; TRL's rule). Both normalizations are
    group_advantages: the batch is one group of size B. The std is returned for frac_reward_zero_std.
    """
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"multi_objective_aggregation: expected one of {AGGREGATIONS}, got {aggregation!r}")
    G, B = num_generations, rewards_per_func.shape[0]
    if aggregation == "sum_then_normalize":
        rewards = combine(rewards_per_func, weights)  # [B]
        std = _nan_mean_std(rewards.view(-1, G), dim=1)[1].repeat_interleave(G) if scale_rewards != "batch" \
            else _nan_mean_std(rewards, dim=None)[1].expand(B)
        return group_advantages(rewards, G, scale_rewards=scale_rewards), std
    per_func = torch.stack([group_advantages(col, G) for col in rewards_per_func.T], dim=1)  # [B, F]
    per_func[torch.isnan(rewards_per_func)] = math.nan  # a None stays out of the weighted sum
    rewards = combine(per_func, weights)  # [B]
    return group_advantages(rewards, B), _nan_mean_std(rewards, dim=None)[1].expand(B)

