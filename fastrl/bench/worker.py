"""One measurement in a fresh process: `python -m fastrl.bench.worker` reads a JSON job on stdin and prints
its result as the last line of stdout, prefixed by RESULT_PREFIX.

Jobs:
  {"kind": "time", "case": {...}, "providers": [...], "device": "cpu", "timing": {...}}
      builds the case's inputs once, times every provider on them (interleaved on CPU) and the GEMM floor;
      -> {"samples": {provider: [ms, ...]}, "quantiles": {provider: [p20, p50, p80]}, "errors": {provider: msg}}
  {"kind": "memory", "case": {...}, "provider": name, "device": "cpu", "repeats": 3}
      one provider, one warm-up call, then `repeats` calls each measured as peak memory above the memory
      before it; the parent starts this process with MALLOC_MMAP_THRESHOLD_=65536 (see measure.py)
      -> {"memory_mib": [..], "method": ..., "inputs_mib": ..}
A fresh process per memory measurement keeps one provider's allocator state, compiled code and caches out of
another's numbers.
"""
from __future__ import annotations

import json
import sys
import traceback

from .jobs import RESULT_PREFIX


def mode_fn(run, inputs: dict, mode: str):
    """The callable a mode measures. forward: the forward with autograd recording (as in training); backward:
    gradients of hidden and weight from a forward done once, beforehand; full: both."""
    import torch

    params = [inputs["hidden"], inputs["weight"]]
    if mode == "forward":
        return lambda: run(inputs)
    if mode == "full":
        return lambda: torch.autograd.grad(run(inputs), params)
    if mode == "backward":
        loss = run(inputs)
        return lambda: torch.autograd.grad(loss, params, retain_graph=True)
    raise ValueError(f"mode: expected forward, backward or full, got {mode!r}")


def _error(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:300]


def run_time_job(job: dict) -> dict:
    import torch

    from .cases import DTYPES, KernelCase, make_inputs
    from .measure import floor_ms, gemm_fns, quantiles, synchronize, time_cuda, time_interleaved
    from .providers import PROVIDERS

    case = KernelCase.from_dict(job["case"])
    device = job.get("device", "cpu")
    timing = job.get("timing", {})
    inputs = make_inputs(case, device)
    fns, errors = {}, {}
    for name in job["providers"]:
        try:
            fn = mode_fn(PROVIDERS[name].build(case), inputs, case.mode)
            fn()  # first call: compilation, lazy initialisation; also proves the provider runs
            synchronize(device)
            fns[name] = fn
        except Exception as e:  # a peer that fails here is reported as skipped, with the reason
            errors[name] = _error(e)
            traceback.print_exc(file=sys.stderr)
    fns["floor"] = gemm_fns(case.N, case.H, case.V, DTYPES[case.dtype], device)
    fns["floor"]()  # its first call, like every provider's, is not timed
    if torch.device(device).type == "cuda":
        q = {name: time_cuda(fn) for name, fn in fns.items()}
        samples = {}
    else:
        samples = time_interleaved(fns, warmup=timing.get("warmup", 1), min_reps=timing.get("min_reps", 3),
                                   max_reps=timing.get("max_reps", 50), budget_s=timing.get("budget_s", 5.0))
        q = {name: quantiles(s) for name, s in samples.items()}
    gemm = q.pop("floor")
    samples.pop("floor", None)
    return {"samples": samples, "quantiles": q, "errors": errors, "gemm_ms": gemm,
            "floor_ms": floor_ms(gemm, case.flops(), case.N, case.H, case.V)}


def run_memory_job(job: dict) -> dict:
    import gc

    import torch

    from .cases import KernelCase, input_bytes, make_inputs
    from .measure import can_reset_peak_rss, peak_memory_above, synchronize
    from .providers import PROVIDERS

    case = KernelCase.from_dict(job["case"])
    device = job.get("device", "cpu")
    if torch.device(device).type == "cpu" and not can_reset_peak_rss():
        raise RuntimeError("cannot reset the peak RSS (/proc/self/clear_refs not writable)")
    inputs = make_inputs(case, device)
    fn = mode_fn(PROVIDERS[job["provider"]].build(case), inputs, case.mode)
    out = fn()  # warm-up: one-time allocations (code, thread pools, compile caches) are not the call's
    synchronize(device)
    del out
    gc.collect()
    peaks = [peak_memory_above(fn, device) for _ in range(job.get("repeats", 3))]
    method = "cuda max_memory_allocated" if torch.device(device).type == "cuda" else "VmHWM-VmRSS after clear_refs"
    return {"memory_mib": peaks, "method": method, "inputs_mib": input_bytes(inputs) / 2**20}


def main() -> int:
    job = json.loads(sys.stdin.read())
    kind = job["kind"]
    if kind == "time":
        result = run_time_job(job)
    elif kind == "memory":
        result = run_memory_job(job)
    elif kind == "e2e":
        from .e2e import run_e2e_job

        result = run_e2e_job(job)
    else:
        raise ValueError(f"unknown job kind {kind!r}")
    sys.stdout.write("\n" + RESULT_PREFIX + json.dumps(result) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
