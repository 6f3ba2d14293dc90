"""GRPOConfig.generation_kwargs, merged as TRL 1.16 merges them: over the named sampling fields, into
transformers' `GenerationConfig` (transformers backend) or vLLM's `SamplingParams` (vLLM backend).

Both backends only sample, one token at a time from the processed distribution (the loss needs that
distribution's logprobs). A key that would switch to another search, return something else, or re-seed is refused
with its name (TRL would pass it on and train on what comes back). Everything else applies: transformers' logits
processors built from the merged GenerationConfig (suppress_tokens, no_repeat_ngram_size, bad_words_ids,
min_new_tokens, typical_p, ...; max_new_tokens replaces max_completion_length for sampling), or SamplingParams'
own fields (stop, presence_penalty, min_tokens, max_tokens, a `structured_outputs` dict, ...).
"""
from __future__ import annotations

from typing import Any

# key -> the only value a sampling loop can honour (its no-op); anything else is refused
TRANSFORMERS_FIXED = {"do_sample": True, "num_beams": 1, "num_beam_groups": 1, "num_return_sequences": 1,
                      "penalty_alpha": None, "prompt_lookup_num_tokens": None, "guidance_scale": None,
                      "force_words_ids": None, "constraints": None, "stop_strings": None, "use_cache": True,
                      "max_length": None, "return_dict_in_generate": False, "output_scores": False,
                      "output_logits": False}
HINTS = {"max_length": "use max_new_tokens (or max_completion_length)", "seed": "GRPOConfig.seed seeds sampling"}
VLLM_FIXED = {"n": None, "logprobs": None, "prompt_logprobs": None, "seed": None, "detokenize": None,
              "output_kind": None, "best_of": None}
WHY = "fastrl's generators sample one token at a time and return G completions with their sampling logprobs"


def check_generation_kwargs(kwargs, use_vllm: bool) -> None:
    """At config time (no transformers or vLLM import): a dict, without the keys its backend refuses."""
    if kwargs is None:
        return
    if not isinstance(kwargs, dict):
        raise ValueError(f"generation_kwargs: expected a dict (or None), got {type(kwargs).__name__}")
    if use_vllm:
        _refuse_fixed(kwargs, VLLM_FIXED, "vLLM")
    else:
        _refuse_fixed(kwargs, TRANSFORMERS_FIXED, "transformers")


def _refuse_fixed(kwargs: dict, fixed: dict, backend: str) -> None:
    for key, value in kwargs.items():
        if key in fixed and value != fixed[key]:
            keep = HINTS.get(key, "leave it out" if fixed[key] is None else f"leave it at {fixed[key]!r}")
            raise ValueError(f"generation_kwargs[{key!r}]={value!r} is not supported with the {backend} backend "
                             f"({WHY}); {keep}")


def transformers_generation_config(kwargs: dict[str, Any], sampling) -> "GenerationConfig":  # noqa: F821
    """The named sampling fields, then generation_kwargs over them (TRL's order) -> GenerationConfig."""
    from transformers import GenerationConfig

    _refuse_fixed(kwargs, TRANSFORMERS_FIXED, "transformers")
    known = set(GenerationConfig().to_dict())
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise ValueError(f"generation_kwargs: {unknown} are not GenerationConfig fields")
    merged = {"do_sample": True, "max_new_tokens": sampling.max_completion_length,
              "temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": sampling.top_k or None,
              "min_p": sampling.min_p or None, "repetition_penalty": sampling.repetition_penalty, **kwargs}
    return GenerationConfig(**merged)


def vllm_sampling_kwargs(kwargs: dict[str, Any], defaults: dict[str, Any], params_cls) -> dict[str, Any]:
    """The named sampling fields (`defaults`), then generation_kwargs over them -> SamplingParams keyword
    arguments; a `structured_outputs` dict becomes StructuredOutputsParams (as TRL does)."""
    _refuse_fixed(kwargs, VLLM_FIXED, "vLLM")
    fields = set(getattr(params_cls, "__struct_fields__", ())) or set(params_cls.__init__.__code__.co_varnames)
    unknown = sorted(set(kwargs) - fields)
    if unknown:
        raise ValueError(f"generation_kwargs: {unknown} are not vLLM SamplingParams fields")
    merged = {**defaults, **kwargs}
    if isinstance(merged.get("structured_outputs"), dict):
        from vllm.sampling_params import StructuredOutputsParams

        merged["structured_outputs"] = StructuredOutputsParams(**merged["structured_outputs"])
    return merged
