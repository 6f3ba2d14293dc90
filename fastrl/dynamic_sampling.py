"""Dynamic sampling (DAPO, arXiv:2503.14476 §3.2): train only on groups whose rewards differ.

A group whose G rewards are all equal has all-zero advantages: it costs a forward and backward pass and moves
nothing. With `dynamic_sampling=True` the trainer draws a generation batch, drops such groups, and draws more
prompts until it holds prompts_per_generation groups with differing rewards; surplus groups of the last draw are
discarded (they were sampled from the same policy, but keeping them for the next batch would make that batch
off-policy).

Bounded: after `dynamic_sampling_max_attempts` draws the batch is topped up with dropped groups (zero advantage,
so they add no gradient) rather than stopping the run; `dynamic_sampling/filled_groups` counts them, and a
warning says so. A data set where this happens often is too easy or too hard for the policy: filter it first
(`fastrl filter`).

"Equal" is the trainer's `frac_reward_zero_std` rule: the Bessel-corrected std of the group's non-NaN rewards
is close to 0 (`torch.isclose`), or fewer than two of its rewards are scorable.
"""
from __future__ import annotations

import warnings
from typing import Callable, NamedTuple

import torch

from fastrl.generation.base import Rollout, concat_rollouts


class ScoredGroups(NamedTuple):
    """P prompts with G scored completions each (rows of the per-completion fields grouped by prompt)."""

    rows: list[dict]  # P dataset rows
    prompt_ids: list[list[int]]  # P tokenized prompts
    rollout: Rollout  # P*G completions
    rewards_per_func: torch.Tensor  # [P*G, F], NaN = None
    rewards: torch.Tensor  # [P*G] weighted sum, NaN = unscorable
    extra: dict[str, list] = {}  # columns reward functions added through log_extra, P*G values each
    prompts: list = []  # P*G prompts as the reward functions got them (an environment's observation appended)
    completions: list = []  # P*G completions as the reward functions got them (text, or message lists)


def varied_groups(rewards: torch.Tensor, num_generations: int) -> torch.Tensor:
    """[P*G] rewards -> [P] bool: True where the group's rewards are not all equal."""
    out = []
    for group in rewards.view(-1, num_generations):
        valid = group[~torch.isnan(group)]
        std = valid.std() if valid.numel() > 1 else torch.tensor(0.0)
        out.append(not torch.isclose(std, torch.zeros_like(std)).item())
    return torch.tensor(out, dtype=torch.bool)


def select_groups(scored: ScoredGroups, groups: list[int], num_generations: int) -> ScoredGroups:
    """The groups at indices `groups`, in that order."""
    G = num_generations
    rows_idx = [g * G + j for g in groups for j in range(G)]
    rollout = scored.rollout.select(rows_idx)
    index = torch.tensor(rows_idx, dtype=torch.long)
    pick = lambda values: [values[i] for i in rows_idx] if values else values  # noqa: E731
    return ScoredGroups([scored.rows[g] for g in groups], [scored.prompt_ids[g] for g in groups], rollout,
                        scored.rewards_per_func[index], scored.rewards[index],
                        {k: pick(v) for k, v in scored.extra.items()}, pick(scored.prompts), pick(scored.completions))


def concat_groups(parts: list[ScoredGroups]) -> ScoredGroups:
    rollout = concat_rollouts([p.rollout for p in parts])
    columns = dict.fromkeys(k for p in parts for k in p.extra)  # a column some parts lack is None there
    extra = {k: [v for p in parts for v in p.extra.get(k, [None] * len(p.rewards))] for k in columns}
    return ScoredGroups([r for p in parts for r in p.rows], [x for p in parts for x in p.prompt_ids], rollout,
                        torch.cat([p.rewards_per_func for p in parts]), torch.cat([p.rewards for p in parts]), extra,
                        [x for p in parts for x in p.prompts], [x for p in parts for x in p.completions])


def fill_generation_batch(sample: Callable[[], ScoredGroups], num_prompts: int, num_generations: int,
                          max_attempts: int) -> tuple[ScoredGroups, dict[str, float]]:
    """Call `sample()` (one generation batch of prompts, scored) until `num_prompts` groups with differing
    rewards are collected or `max_attempts` calls are made. Returns (exactly num_prompts groups, metrics)."""
    if max_attempts < 1:
        raise ValueError(f"dynamic_sampling_max_attempts: expected an integer >= 1, got {max_attempts!r}")
    kept: list[ScoredGroups] = []
    dropped: list[ScoredGroups] = []
    num_kept, num_dropped, attempts = 0, 0, 0
    while num_kept < num_prompts and attempts < max_attempts:
        part = sample()
        attempts += 1
        varied = varied_groups(part.rewards, num_generations).tolist()
        keep = [i for i, v in enumerate(varied) if v][: num_prompts - num_kept]  # surplus groups discarded
        drop = [i for i, v in enumerate(varied) if not v]
        kept.append(select_groups(part, keep, num_generations))
        dropped.append(select_groups(part, drop, num_generations))
        num_kept, num_dropped = num_kept + len(keep), num_dropped + len(drop)
    filled = num_prompts - num_kept
    if filled:
        warnings.warn(f"dynamic sampling: {attempts} attempts gave {num_kept} of {num_prompts} groups with differing "
                      f"rewards; the batch is topped up with {filled} zero-advantage groups "
                      "(raise dynamic_sampling_max_attempts, or filter the data set with `fastrl filter`)")
        top_up = concat_groups(dropped)
        kept.append(select_groups(top_up, list(range(filled)), num_generations))
    metrics = {"dynamic_sampling/attempts": float(attempts), "dynamic_sampling/dropped_groups": float(num_dropped),
               "dynamic_sampling/filled_groups": float(filled)}
    return concat_groups(kept), metrics
