"""The transformers generation backend: `model.generate` on the policy itself (any device).

It samples from the very module being trained, so `push_weights` has nothing to copy. The logprob of each sampled
token is the sampler's own: log-softmax of the scores after the logits processors (repetition penalty,
temperature, top-k, top-p, min-p), i.e. of the distribution the token was drawn from.

No [B, T, V] scores are kept (`output_scores=True` would keep T per-step [B, V] fp32 tensors: 512 MiB for 16
completions of 256 tokens at V = 32768). A last logits processor (`SampledLogprobs`) keeps one step's processed
scores and their log-sum-exp; at the next step the token sampled from them is the last column of `input_ids`, and
its logprob is one gather. So memory is one [B, V] step beyond what sampling itself holds, plus [B, T] floats.
transformers appends its sampling warpers (temperature, top-k, top-p, min-p) after any processor passed in, so they
are built here, in transformers' own order, with the GenerationConfig's values left neutral.
"""
from __future__ import annotations

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList
from transformers.generation.logits_process import (MinPLogitsWarper, TemperatureLogitsWarper, TopKLogitsWarper,
                                                    TopPLogitsWarper)

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
            recorder = SampledLogprobs()
            with torch.no_grad():
                sequences = self.model.generate(input_ids=input_ids, attention_mask=attention_mask,
                                                generation_config=self._generation_config(sampling),
                                                logits_processor=sampling_processors(sampling, recorder))
        finally:
            self.model.train(was_training)
        new_tokens = sequences[:, input_ids.shape[1]:]  # [B, T]
        token_logps = recorder.finish(sequences)  # [B, T]
        return self._cut_at_eos(new_tokens.tolist(), token_logps.tolist(), sampling.max_completion_length)

    def _generation_config(self, sampling: SamplingConfig) -> GenerationConfig:
        # A full GenerationConfig (as TRL builds one), so the model's own defaults (e.g. top_k=50) do not leak in.
        # Temperature, top-k, top-p and min-p stay neutral here: sampling_processors applies them.
        return GenerationConfig(
            max_new_tokens=sampling.max_completion_length, do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
            min_p=None, repetition_penalty=sampling.repetition_penalty, pad_token_id=self.pad_token_id,
            eos_token_id=self.eos_token_ids, cache_implementation=self.cache_implementation, use_cache=True,
            return_dict_in_generate=False, output_scores=False, disable_compile=True)

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


class SampledLogprobs(LogitsProcessor):
    """The last logits processor: records log p(sampled token) under the processed scores, step by step.

    Call t sees the processed scores of step t, and `input_ids` ending with the token sampled at step t − 1 from
    the scores kept at call t − 1. `finish` reads the last step's token from the final sequences.
    """

    def __init__(self):
        self.logps: list[torch.Tensor] = []  # T − 1 (then T) tensors [B]
        self._scores: torch.Tensor | None = None  # [B, V], the previous step's processed scores
        self._lse: torch.Tensor | None = None  # [B], their log-sum-exp (fp32)

    def _take(self, sampled: torch.Tensor) -> None:
        picked = self._scores.gather(-1, sampled.unsqueeze(-1)).squeeze(-1).float()  # [B]
        self.logps.append(picked - self._lse)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self._scores is not None:
            self._take(input_ids[:, -1])
        self._scores, self._lse = scores, torch.logsumexp(scores.float(), dim=-1)
        return scores

    def finish(self, sequences: torch.Tensor) -> torch.Tensor:
        """-> [B, T] logprobs of the T generated tokens (T = the columns generate added)."""
        if self._scores is not None:
            self._take(sequences[:, -1])
        self._scores = self._lse = None
        if not self.logps:
            return torch.zeros(sequences.shape[0], 0)
        return torch.stack(self.logps, dim=1)


def sampling_processors(sampling: SamplingConfig, recorder: SampledLogprobs) -> LogitsProcessorList:
    """transformers' sampling warpers, in its order (GenerationMixin._get_logits_processor), then the recorder.
    Repetition penalty stays with transformers: it runs before any processor passed in."""
    out = LogitsProcessorList()
    if sampling.temperature != 1.0:
        out.append(TemperatureLogitsWarper(sampling.temperature))
    if sampling.top_k:
        out.append(TopKLogitsWarper(top_k=sampling.top_k, min_tokens_to_keep=1))
    if sampling.top_p < 1.0:
        out.append(TopPLogitsWarper(top_p=sampling.top_p, min_tokens_to_keep=1))
    if sampling.min_p:
        out.append(MinPLogitsWarper(min_p=sampling.min_p, min_tokens_to_keep=1))
    out.append(recorder)
    return out


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
