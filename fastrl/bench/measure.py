"""How things are measured: time quantiles, peak memory above a baseline, and the GEMM floor.

Time. CPU: `time.perf_counter` around each call after warm-up; calls of several functions are interleaved
(round-robin, order rotated each round), so a burst of load from elsewhere on the machine hits every provider
alike. CUDA: `triton.testing.do_bench` (device events, L2 flushed), per function.

Memory. CPU: peak resident set size above the RSS just before the call, read from /proc/self/status (VmHWM,
reset by writing "5" to /proc/self/clear_refs). Run it in a fresh process with MALLOC_MMAP_THRESHOLD_=65536 so
freed blocks go back to the kernel and each peak is the call's own (see worker.py). CUDA:
torch.cuda.max_memory_allocated above memory_allocated.

Floor. 8·N·H·V flops (forward+backward of the fused algorithm) at the rate torch.mm reaches on this device and
dtype for the three GEMM shapes the algorithm runs: [N,H]@[H,V], [N,V]@[V,H], [V,N]@[N,H].
"""
from __future__ import annotations

import gc
import time
from typing import Callable

import torch

from fastrl.peak_rss import reset_peak_rss, status_kib

QUANTILES = (0.2, 0.5, 0.8)


def quantiles(samples: list[float], qs=QUANTILES) -> list[float]:
    """Linear-interpolated quantiles (numpy's default), no numpy needed."""
    if not samples:
        raise ValueError("quantiles: no samples")
    xs = sorted(samples)
    out = []
    for q in qs:
        pos = q * (len(xs) - 1)
        lo = int(pos)
        hi = min(lo + 1, len(xs) - 1)
        out.append(xs[lo] + (xs[hi] - xs[lo]) * (pos - lo))
    return out


# ---------------------------------------------------------------------------------------------------------------
# time

def time_interleaved(fns: dict[str, Callable[[], object]], *, warmup: int = 1, min_reps: int = 3,
                     max_reps: int = 50, budget_s: float = 5.0, on_round: Callable[[int], None] | None = None
                     ) -> dict[str, list[float]]:
    """Milliseconds per call for each function (CPU). Rounds stop at max_reps, or once min_reps are done and
    the rounds have used budget_s seconds."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    start = time.perf_counter()
    for rep in range(max_reps):
        order = names[rep % len(names):] + names[:rep % len(names)]
        for name in order:
            t0 = time.perf_counter()
            fns[name]()
            samples[name].append((time.perf_counter() - t0) * 1e3)
        if on_round is not None:
            on_round(rep)
        if rep + 1 >= min_reps and time.perf_counter() - start >= budget_s:
            break
    return samples


def time_cuda(fn: Callable[[], object], grad_to_none=None) -> list[float]:
    """(p20, p50, p80) milliseconds with device events."""
    import triton.testing

    p50, p20, p80 = triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8], grad_to_none=grad_to_none)
    return [p20, p50, p80]


def synchronize(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------------------------------
# memory

def can_reset_peak_rss() -> bool:
    try:
        reset_peak_rss()
        return True
    except OSError:
        return False


def peak_rss_above(fn: Callable[[], object]) -> float:
    """MiB of peak RSS during fn() above the RSS right before it. Needs /proc/self/clear_refs (Linux >= 4.0)."""
    gc.collect()
    reset_peak_rss()
    before = status_kib("VmRSS")
    out = fn()
    peak = status_kib("VmHWM")
    del out
    return (peak - before) / 1024.0


def peak_cuda_above(fn: Callable[[], object]) -> float:
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    del out
    return (peak - before) / 2**20


def peak_memory_above(fn: Callable[[], object], device) -> float:
    return peak_cuda_above(fn) if torch.device(device).type == "cuda" else peak_rss_above(fn)


# ---------------------------------------------------------------------------------------------------------------
# floor

def gemm_fns(N: int, H: int, V: int, dtype: torch.dtype, device) -> Callable[[], object]:
    """One call runs the three GEMM shapes of the fused algorithm once: 6·N·H·V flops."""
    g = torch.Generator().manual_seed(1)
    h = torch.randn(N, H, generator=g).to(device=device, dtype=dtype)
    w = torch.randn(V, H, generator=g).to(device=device, dtype=dtype)
    z = torch.empty(N, V, device=device, dtype=dtype)
    dh = torch.empty(N, H, device=device, dtype=dtype)
    dw = torch.empty(V, H, device=device, dtype=dtype)

    def run():
        torch.mm(h, w.t(), out=z)  # [N, H] @ [H, V] -> [N, V]   logits (and their recompute)
        torch.mm(z, w, out=dh)  # [N, V] @ [V, H] -> [N, H]        dh = dz @ W
        torch.mm(z.t(), h, out=dw)  # [V, N] @ [N, H] -> [V, H]    dW = dzᵀ @ h
        return None
    return run


def floor_ms(gemm_ms: list[float], flops: float, N: int, H: int, V: int) -> list[float]:
    """Time for `flops` at the rate measured by gemm_fns (6·N·H·V flops per call)."""
    return [t * flops / (6.0 * N * H * V) for t in gemm_ms]


def gemm_rate_gflops(gemm_ms: float, N: int, H: int, V: int) -> float:
    return 6.0 * N * H * V / (gemm_ms * 1e-3) / 1e9
