"""A lean sampling loop for the transformers backend: one forward per token with a KV cache, nothing else.

`model.generate` spends much of a small model's step outside the model: its per-token bookkeeping and, above
all, `torch.multinomial`, which on CPU costs ~20 ms per call at [8, 32768] (measured on this 2-core machine,
against ~0.6 ms for the inverse-CDF draw below). This loop keeps transformers' own logits processors (repetition
penalty, temperature, top-k, top-p, min-p, in `GenerationMixin._get_logits_processor`'s order), so the
distribution sampled is the one `generate` samples, and draws the token by inverse CDF: one uniform per row and
a binary search in the cumulative probabilities. Its logprob comes from the same processed scores: one gather
minus their log-sum-exp. Per step it holds a few [B, V] fp32 tensors, never [B, T, V].
"""
from __future__ import annotations

import contextlib
import inspect

import torch
from transformers import DynamicCache, LogitsProcessorList
from transformers.generation.logits_process import (MinPLogitsWarper, RepetitionPenaltyLogitsProcessor,
                                                    TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)

from fastrl.distributed import all_ranks

from .base import SamplingConfig
from .extra_kwargs import transformers_generation_config
from .skinny_linear import SkinnyLinear
from .streams import uniforms


def logits_processors(sampling: SamplingConfig) -> LogitsProcessorList:
    """transformers' processors for these settings, in its order (repetition penalty first, then the warpers)."""
    out = LogitsProcessorList()
    if sampling.repetition_penalty != 1.0:
        out.append(RepetitionPenaltyLogitsProcessor(sampling.repetition_penalty))
    if sampling.temperature != 1.0:
        out.append(TemperatureLogitsWarper(sampling.temperature))
    if sampling.top_k:
        out.append(TopKLogitsWarper(top_k=sampling.top_k, min_tokens_to_keep=1))
    if sampling.top_p < 1.0:
        out.append(TopPLogitsWarper(top_p=sampling.top_p, min_tokens_to_keep=1))
    if sampling.min_p:
        out.append(MinPLogitsWarper(min_p=sampling.min_p, min_tokens_to_keep=1))
    return out


def draw(scores: torch.Tensor, generator: torch.Generator | None = None,
         u: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """scores [B, V] (processed; -inf = filtered out) -> (tokens [B], their logprobs [B], fp32).

    Inverse CDF: token i is drawn when u·total falls in [c_{i-1}, c_i); tokens of probability 0 own an empty
    interval and are never drawn. u [B] in [0, 1) is given (per-row streams) or drawn from `generator`."""
    scores = scores.float()
    lse = torch.logsumexp(scores, dim=-1, keepdim=True)  # [B, 1]
    cdf = (scores - lse).exp_().cumsum_(dim=-1)  # [B, V]
    if u is None:
        u = torch.rand(scores.shape[0], device=scores.device, generator=generator)
    u = u.to(scores.device).unsqueeze(-1) * cdf[:, -1:]  # [B, 1]
    tokens = torch.searchsorted(cdf, u, right=True).clamp_(max=scores.shape[-1] - 1)  # [B, 1]
    return tokens.squeeze(-1), (scores.gather(-1, tokens) - lse).squeeze(-1)


def _inner(model: torch.nn.Module) -> torch.nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model  # a PEFT wrapper takes **kwargs


def cache_argument(model: torch.nn.Module) -> str | None:
    """The KV cache's keyword: `cache` in recent transformers (which deprecates `past_key_values`), else the old
    name; None when the forward takes neither (OpenAI GPT)."""
    params = inspect.signature(_inner(model).forward).parameters
    return next((name for name in ("cache", "past_key_values") if name in params), None)


def new_cache(model: torch.nn.Module):
    """The cache `generate` builds for this model (transformers' `_prepare_cache_for_generation`): a DynamicCache
    from the model's decoder config, whose layer types make hybrid attention/Mamba models (Bamba, Nemotron-H,
    FalconH1) work; None for the classes transformers gives no default cache (RWKV, xLSTM, Reformer, ...) and
    those whose forward takes no cache."""
    inner = _inner(model)
    supports = getattr(inner, "_supports_default_dynamic_cache", lambda: True)
    if not supports() or cache_argument(model) is None:
        return None
    return DynamicCache(config=inner.config.get_text_config(decoder=True))


def forward_step(model: torch.nn.Module, cache):
    """model(input_ids, attention_mask, position_ids) -> logits of the last position [B, V], with the cache and
    only the optional arguments (position_ids, logits_to_keep) the model's forward names: some take neither."""
    params = inspect.signature(_inner(model).forward).parameters
    cache_arg = cache_argument(model)

    def step(input_ids, attention_mask, position_ids):
        kwargs = {k: v for k, v in (("position_ids", position_ids), ("logits_to_keep", 1)) if k in params}
        if cache is not None:
            kwargs.update(use_cache=True, **{cache_arg: cache})
        return model(input_ids=input_ids, attention_mask=attention_mask, **kwargs).logits[:, -1, :]

    return step


@torch.no_grad()
def sample(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, sampling: SamplingConfig,
           eos_token_ids: list[int], pad_token_id: int,
           stream_keys: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompts input_ids/attention_mask [B, P] -> (completion ids [B, T], sampler logprobs [B, T]).

    stream_keys [B] (fastrl.generation.streams): row i's uniforms come from its own stream, so a row's
    completion does not depend on which other rows share the batch; None: torch's global generator.

    Rows that sampled an eos are padded with pad_token_id afterwards (logprob 0); T ≤ max_completion_length
    (the loop stops once every row has finished)."""
    eos = torch.tensor(eos_token_ids, device=input_ids.device)
    processors, max_new_tokens = logits_processors(sampling), sampling.max_completion_length
    if sampling.generation_kwargs:  # transformers builds the processors of the merged GenerationConfig
        config = transformers_generation_config(sampling.generation_kwargs, sampling)
        config._eos_token_tensor = eos  # what generate() sets before building them (min_new_tokens needs it)
        processors = model._get_logits_processor(generation_config=config, input_ids_seq_length=input_ids.shape[1],
                                                 encoder_input_ids=input_ids, device=input_ids.device)
        max_new_tokens = config.max_new_tokens
    batch = input_ids.shape[0]
    done = torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
    cache = new_cache(model)  # None: no cache, each step re-reads the whole sequence
    step = forward_step(model, cache)
    seen = input_ids  # [B, P + t]: what the repetition penalty looks at
    step_ids, mask = input_ids, attention_mask
    position_ids = (attention_mask.cumsum(-1) - 1).clamp_(min=0)  # [B, P]
    tokens_out, logps_out = [], []
    # CPU: the loop's linear layers take a few rows each, where W @ xᵀ beats x @ Wᵀ (skinny_linear)
    with SkinnyLinear() if input_ids.device.type == "cpu" else contextlib.nullcontext():
        for position in range(max_new_tokens):
            scores = processors(seen, step(step_ids, mask, position_ids).float())  # [B, V]
            tokens, logps = draw(scores, u=None if stream_keys is None else uniforms(stream_keys, position))
            tokens = torch.where(done, pad_token_id, tokens)
            tokens_out.append(tokens)
            logps_out.append(logps.masked_fill(done, 0.0))
            done |= torch.isin(tokens, eos)
            if all_ranks(bool(done.all())):  # a sharded model's forward is collective: ranks stop together
                break
            step_ids = tokens.unsqueeze(-1)  # [B, 1]
            seen = torch.cat([seen, step_ids], dim=-1)
            mask = torch.cat([mask, torch.ones_like(step_ids)], dim=-1)
            position_ids = position_ids[:, -1:] + 1
            if cache is None:  # the whole sequence again
                step_ids, position_ids = seen, (mask.cumsum(-1) - 1).clamp_(min=0)
    if not tokens_out:
        empty = input_ids.new_zeros(batch, 0)
        return empty, empty.float()
    return torch.stack(tokens_out, dim=1), torch.stack(logps_out, dim=1)
