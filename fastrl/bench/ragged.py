"""Ragged GRPO batches with long-tailed completion lengths, as RL produces them, for the packed-vs-padded
benchmark (bench/bench_packed.py) and the plan's memory validation (fastrl/plan/measure.py)."""
from __future__ import annotations

import torch

from fastrl.rollout_batch import RolloutBatch


def long_tail_lengths(batch: int, prompt_range: tuple[int, int], max_completion: int, mean_tail: float,
                      seed: int = 0) -> tuple[list[int], list[int]]:
    """(prompt lengths uniform in prompt_range, completion lengths 8 + Geometric(mean mean_tail) capped at
    max_completion), the longest completion set to max_completion: a truncated completion sets the padded
    width, as in real batches."""
    g = torch.Generator().manual_seed(seed)
    prompts = torch.randint(prompt_range[0], prompt_range[1] + 1, (batch,), generator=g).tolist()
    torch.manual_seed(seed)  # torch.distributions samples from the global generator
    tail = torch.distributions.Geometric(probs=torch.tensor(1.0 / mean_tail)).sample((batch,))
    completions = [min(max_completion, 8 + int(x)) for x in tail]
    completions[completions.index(max(completions))] = max_completion
    return prompts, completions


def random_rollout(prompts: list[int], completions: list[int], vocab: int, seed: int = 0) -> RolloutBatch:
    """A RolloutBatch of random token ids (ids ≥ 4, clear of the tiny tokenizer's special tokens) with these
    prompt (left-padded) and completion (right-padded) lengths, every completion token trained, and random
    advantages."""
    g = torch.Generator().manual_seed(seed)
    b, p_width, t_width = len(prompts), max(prompts), max(completions)
    prompt, prompt_mask = torch.zeros(b, p_width, dtype=torch.long), torch.zeros(b, p_width, dtype=torch.long)
    completion, attention = torch.zeros(b, t_width, dtype=torch.long), torch.zeros(b, t_width, dtype=torch.long)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        prompt[i, p_width - p:], prompt_mask[i, p_width - p:] = torch.randint(4, vocab, (p,), generator=g), 1
        completion[i, :c], attention[i, :c] = torch.randint(4, vocab, (c,), generator=g), 1
    return RolloutBatch(prompt, prompt_mask, completion, attention, attention.clone(), torch.randn(b, generator=g))
