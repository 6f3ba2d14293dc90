"""The transformers generation backend: `model.generate` on the policy itself (any device).

It samples from the very module being trained, so `push_weights` has nothing to copy. The logprob of each sampled
token is the sampler's own: log-softmax of the scores after the logits processors (temperature, top-k, top-p,
min-p, repetition penalty), i.e. of the distribution the token was drawn from (`output_scores=True`).
"""
from __future__ import annotations

import torch
from transformers import GenerationConfig

from .base import Rollout, SamplingConfig


class TransformersGenerator:
    def __init__(self, model: torch.nn.Module, pad_token_id: int, eos_token_ids: list[int],
                 cache_implementation: str | None = None):
        self.model = model
        self.pad_token_id = pad_token_id
        self.eos_token_ids = list(eos_token_ids)
        self.cache_implementation = cache_implementation

    def generate(self, prompt_ids: list[list[int]], num_generations: int, sampling: SamplingConfig) -> Rollout:
        device = next(self.model.parameters()).device
        repeated = [ids for ids in prompt_ids for _ in range(num_generations)]  # P*G, grouped by prompt
        input_ids, attention_mask = left_pad(repeated, self.pad_token_id, device)  # [B, P]
        was_training = self.model.training
        self.model.eval()  # no dropout while sampling, and the KV cache works with gradient checkpointing on
        try:
            with torch.no_grad():
                out = self.model.generate(input_ids=input_ids, attention_mask=attention_mask,
                                          generation_config=self._generation_config(sampling))
        finally:
            self.model.train(was_training)
        new_tokens = out.sequences[:, input_ids.shape[1]:]  # [B, T]
        scores = torch.stack(out.scores, dim=1).float()  # [B, T, V], processed logits
        token_logps = torch.log_softmax(scores, dim=-1).gather(-1, new_tokens.unsqueeze(-1)).squeeze(-1)  # [B, T]
        return self._cut_at_eos(new_tokens.tolist(), token_logps.tolist(), sampling.max_completion_length)

    def _generation_config(self, sampling: SamplingConfig) -> GenerationConfig:
        # A full GenerationConfig (as TRL builds one), so the model's own defaults (e.g. top_k=50) do not leak in.
        return GenerationConfig(
            max_new_tokens=sampling.max_completion_length, do_sample=True, temperature=sampling.temperature,
            top_p=sampling.top_p, top_k=sampling.top_k, min_p=sampling.min_p or None,
            repetition_penalty=sampling.repetition_penalty, pad_token_id=self.pad_token_id,
            eos_token_id=self.eos_token_ids, cache_implementation=self.cache_implementation, use_cache=True,
            return_dict_in_generate=True, output_scores=True, disable_compile=True)

    def _cut_at_eos(self, rows: list[list[int]], logps: list[list[float]], max_len: int) -> Rollout:
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
