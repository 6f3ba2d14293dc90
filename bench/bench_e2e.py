"""End-to-end cases under pytest-benchmark: one GRPO training run per (size, trainer), fastrl (transformers and
vLLM generation) and TRL on the same tiny model, data and config (fastrl.bench.e2e). The benchmarked time is the whole run in a fresh process;
steps/s and completion tokens/s (first step dropped) go to extra_info."""
import pytest

from _bench_env import device, quick
from fastrl.bench.e2e import TRAINERS, build_model, e2e_cases, unavailable_reason
from fastrl.bench.measure import quantiles
from fastrl.bench.jobs import run_job

CASES = e2e_cases(quick())
PAIRS = [(c, t) for c in CASES for t in TRAINERS]


@pytest.mark.parametrize("case,trainer", PAIRS, ids=[f"{c.size}-{t}" for c, t in PAIRS])
def test_train(benchmark, case, trainer):
    pytest.importorskip("trl" if trainer == "trl" else "fastrl")  # fastrl-vllm is a trainer name, not a module
    reason = unavailable_reason(trainer)
    if reason:
        pytest.skip(reason)
    job = {"kind": "e2e", "trainer": trainer, "case": case.config(), "model_dir": build_model(case),
           "device": device()}
    out = {}
    benchmark.pedantic(lambda: out.update(run_job(job)), rounds=1, iterations=1)
    steps = out["step_s"][1:] or out["step_s"]
    benchmark.extra_info.update(case.config())
    benchmark.extra_info["step_time_s_p20_p50_p80"] = quantiles(steps)
    benchmark.extra_info["steps_per_s"] = len(steps) / sum(steps)
    benchmark.extra_info["tokens_per_s"] = sum(out["tokens"][-len(steps):]) / sum(steps)
