"""The interface every generation backend implements (transformers, vLLM).

A backend turns P prompts into P × G completions, grouped: completions [i*G, (i+1)*G) belong to prompt i.
It also owns its copy of the policy's weights (push_weights) and its device memory (sleep / wake_up).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch


@dataclass
class SamplingConfig:
    """Sampling parameters, named as in GRPOConfig (TRL's names)."""

    max_completion_length: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = disabled (TRL: None or 0)
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    generation_kwargs: dict | None = None  # GRPOConfig.generation_kwargs, merged per backend (extra_kwargs.py)
    # fastrl: one random-stream key per completion row (P*G, fastrl.generation.streams), so a completion does not
    # depend on the batch it is sampled in (N ranks and one process sample the same); None: the global generator
    stream_keys: list[int] | None = None


@dataclass
class Rollout:
    """What a backend returns for P prompts × G completions (rows grouped by prompt)."""

    completion_ids: list[list[int]]  # P*G lists of token ids, eos included when sampled, no padding
    logprobs: list[list[float]] | None  # P*G lists, the sampler's logprob of each completion token (None if unknown)
    truncated: list[bool] = field(default_factory=list)  # P*G: hit max_completion_length without eos
    # multi-turn rollouts (rollout_func, tools, environments; fastrl.rollout_hooks):
    prompt_ids: list[list[int]] | None = None  # P*G: each row's own prompt, when rows of a group differ
    tool_mask: list[list[int]] | None = None  # P*G, as completion_ids: 1 = written by the model, 0 = tool/env text

    def model_lengths(self) -> list[int]:
        """Each completion's model-written tokens (tool and environment tokens left out): TRL's completion lengths,
        for the length metrics and num_tokens."""
        return [sum(m) for m in self.tool_mask] if self.tool_mask else [len(c) for c in self.completion_ids]

    def select(self, rows: list[int]) -> "Rollout":
        """The rows `rows`, in that order, of every per-row field."""
        pick = lambda values: None if values is None else [values[i] for i in rows]  # noqa: E731
        return Rollout(completion_ids=pick(self.completion_ids), logprobs=pick(self.logprobs),
                       truncated=pick(self.truncated), prompt_ids=pick(self.prompt_ids),
                       tool_mask=pick(self.tool_mask))


def concat_rollouts(parts: list[Rollout]) -> Rollout:
    """The rows of several rollouts, in order (an optional field is None when any part lacks it)."""
    def joined(name):
        values = [getattr(p, name) for p in parts]
        return None if any(v is None for v in values) else [x for v in values for x in v]

    return Rollout(completion_ids=joined("completion_ids"), logprobs=joined("logprobs"),
                   truncated=joined("truncated"), prompt_ids=joined("prompt_ids"), tool_mask=joined("tool_mask"))


class Generator(Protocol):
    def generate(self, prompt_ids: list[list[int]], num_generations: int, sampling: SamplingConfig) -> Rollout:
        """Sample num_generations completions for each prompt (token ids without padding)."""

    def push_weights(self, model: torch.nn.Module) -> None:
        """Make the generator sample from `model`'s current weights."""

    def sleep(self) -> None:
        """Release device memory held for generation (weights and/or KV cache, per backend)."""

    def wake_up(self) -> None:
        """Re-take the memory released by sleep()."""
