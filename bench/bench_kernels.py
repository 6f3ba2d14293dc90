"""Kernel cases under pytest-benchmark: each (case, provider) of fastrl.bench.cases.suite_cases, plus the GEMM
floor of each case. Same inputs, providers and modes as `fastrl bench --suite kernels`."""
import pytest
import torch

from _bench_env import device, quick
from fastrl.bench.cases import DTYPES, make_inputs, suite_cases
from fastrl.bench.kernels import Settings
from fastrl.bench.measure import gemm_fns
from fastrl.bench.providers import providers_for
from fastrl.bench.worker import mode_fn

CASES = suite_cases(quick())
SETTINGS = Settings.for_quick_run(device()) if quick() else Settings(device=device())
PAIRS = [(c, p) for c in CASES for p in providers_for(c.operation)]


def _sync():
    if device().startswith("cuda"):
        torch.cuda.synchronize()


@pytest.mark.parametrize("case,provider", PAIRS, ids=[f"{c.case_id}-{c.sweep}-{p.name}" for c, p in PAIRS])
def test_kernel(benchmark, case, provider):
    reason = SETTINGS.skip_reason(provider, case)
    if reason:
        pytest.skip(reason)
    inputs = make_inputs(case, device())
    fn = mode_fn(provider.build(case), inputs, case.mode)
    benchmark.extra_info.update(case.config())
    benchmark.extra_info["flops"] = case.flops()

    def call():
        fn()
        _sync()
    benchmark.pedantic(call, warmup_rounds=1, rounds=SETTINGS.timing["min_reps"], iterations=1)


@pytest.mark.parametrize("case", CASES, ids=[f"{c.case_id}-{c.sweep}" for c in CASES])
def test_gemm_floor(benchmark, case):
    """The three GEMM shapes of the fused algorithm (6·N·H·V flops); the floor is 8·N·H·V at this rate."""
    fn = gemm_fns(case.N, case.H, case.V, DTYPES[case.dtype], device())
    benchmark.extra_info.update(case.config())
    benchmark.extra_info["flops_per_call"] = 6.0 * case.N * case.H * case.V

    def call():
        fn()
        _sync()
    benchmark.pedantic(call, warmup_rounds=1, rounds=SETTINGS.timing["min_reps"], iterations=1)
