"""The transformers generation backend: the policy itself samples (any device), through fastrl's lean loop.

It samples from the very module being trained, so `push_weights` has nothing to copy. Sampling runs in
`fastrl.generation.decode.sample`: one forward per token with a KV cache and transformers' own logits processors
(repetition penalty, temperature, top-k, top-p, min-p), the token drawn by inverse CDF instead of
`torch.multinomial` (`model.generate` with the same processors took 1.9x as long for 8 completions x 16 tokens at
V = 32768 on this CPU, measured interleaved). The logprob of each sampled token is the sampler's own: log-softmax
of the processed scores, i.e. of the distribution the token was drawn from. No [B, T, V] scores are kept.
"""
from __future__ import annotations

import logging

import torch

from .base import Rollout, SamplingConfig
from .decode import sample

log = logging.getLogger(__name__)


class TransformersGenerator:
    def __init__(self, model: torch.nn.Module, pad_token_id: int, eos_token_ids: list[int],
                 cache_implementation: str | None = None):
        self.model = model
        self.pad_token_id = pad_token_id
        self.eos_token_ids = list(eos_token_ids)
        if cache_implementation not in (None, "dynamic"):
            # speed only (TRL passes it to model.generate): the sampling math does not depend on the cache's layout
            log.warning("cache_implementation=%r: fastrl's sampling loop uses a dynamic KV cache; ignored",
                        cache_implementation)

    def generate(self, prompt_ids: list[list[int]], num_generations: int, sampling: SamplingConfig) -> Rollout:
        device = next(self.model.parameters()).device
        repeated = [ids for ids in prompt_ids for _ in range(num_generations)]  # P*G, grouped by prompt
        input_ids, attention_mask = left_pad(repeated, self.pad_token_id, device)  # [B, P]
        was_training = self.model.training
        self.model.eval()  # no dropout while sampling, and the KV cache works with gradient checkpointing on
        keys = None if sampling.stream_keys is None else torch.tensor(sampling.stream_keys, device=device)  # [B]
        try:
            new_tokens, token_logps = sample(self.model, input_ids, attention_mask, sampling, self.eos_token_ids,
                                             self.pad_token_id, keys)  # [B, T] each
        finally:
            self.model.train(was_training)
        return self._cut_at_eos(new_tokens.tolist(), token_logps.tolist())

    def _cut_at_eos(self, rows: list[list[int]], logps: list[list[float]]) -> Rollout:
        ids_out, logps_out, truncated = [], [], []
        for ids, lp in zip(rows, logps):
            end = next((i + 1 for i, t in enumerate(ids) if t in self.eos_token_ids), None)
            if end is None:  # no eos sampled: the completion is cut by max_completion_length
                end = len(ids)
            ids_out.append(ids[:end])
            logps_out.append(lp[:end])
            truncated.append(ids[end - 1] not in self.eos_token_ids if end else True)
        return Rollout(completion_ids=ids_out, logprobs=logps_out, truncated=truncated)

    def push_weights(self, model: torch.nn.Module) -> None:
        if model is not self.model:
            self.model.load_state_dict(model.state_dict())

    def sleep(self) -> None:
        pass  # shares the policy's memory: nothing of its own to release

    def wake_up(self) -> None:
        pass


def left_pad(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """rows of ids -> (ids [B, L] left-padded, attention mask [B, L])."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r):] = torch.tensor(r)
            mask[i, width - len(r):] = 1
    return ids.to(device), mask.to(device)
