"""The kernel suite: every case of cases.suite_cases, every provider, time + peak memory + the GEMM floor.

Per case: one process times all providers on the same inputs (and the floor's GEMMs), interleaved; then one fresh
process per provider measures its peak memory (MALLOC_MMAP_THRESHOLD_=65536 on CPU). Timing runs without that
setting: it makes every allocation above 64 KiB an mmap, which would slow the timed calls.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .cases import KernelCase, suite_cases
from .jobs import JobFailed, run_job
from .providers import PROVIDERS, providers_for
from .results import row

MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}
# torch.compile on CPU takes 30-90 s per new shape (inductor + a C++ compiler), in every fresh process: a quick run
# compiles Liger only for the headline case.
QUICK_ONLY_HEADLINE = {"liger-compiled": "quick run: compiled Liger is measured on the headline case only "
                                         "(torch.compile takes 30-90 s per new shape on CPU)"}


@dataclass
class Settings:
    device: str = "cpu"
    providers: list[str] | None = None  # None: all
    timing: dict = field(default_factory=lambda: dict(warmup=1, min_reps=5, max_reps=50, budget_s=10.0))
    memory_repeats: int = 3
    memory: bool = True
    timeout_s: float = 3600.0
    quick: bool = False

    @staticmethod
    def for_quick_run(device: str = "cpu") -> "Settings":
        return Settings(device=device, timing=dict(warmup=0, min_reps=3, max_reps=10, budget_s=2.0),
                        memory_repeats=1, timeout_s=600.0, quick=True)

    def skip_reason(self, provider, case: KernelCase) -> str | None:
        if self.quick and case.sweep != "headline" and provider.name in QUICK_ONLY_HEADLINE:
            return QUICK_ONLY_HEADLINE[provider.name]
        return provider.unavailable(case, self.device)


def jobs_in(cases: list[KernelCase], settings: Settings) -> int:
    """How many worker processes a run starts (for the progress bar)."""
    n = 0
    for case in cases:
        runnable = [p for p in providers_for(case.operation, settings.providers)
                    if settings.skip_reason(p, case) is None]
        n += 1 + (len(runnable) if settings.memory else 0)
    return n


def measure_case(case: KernelCase, settings: Settings, run: dict, step=lambda label: None) -> list[dict]:
    """All rows for one case."""
    rows: list[dict] = []
    base = dict(operation=case.operation, mode=case.mode, x_name=case.x_name, x_value=case.x_value, run=run)
    cfg = case.config()

    def skipped(name: str, reason: str):
        rows.append(row(provider=name, metric="skipped", unit="", config={**cfg, "reason": reason}, **base))

    runnable = []
    for p in providers_for(case.operation, settings.providers):
        reason = settings.skip_reason(p, case)
        if reason:
            skipped(p.name, reason)
        else:
            runnable.append(p.name)

    step(f"{case.case_id} time")
    try:
        timed = run_job({"kind": "time", "case": cfg, "providers": runnable, "device": settings.device,
                         "timing": settings.timing}, timeout=settings.timeout_s)
    except JobFailed as e:
        for name in runnable:
            skipped(name, f"timing process failed: {e}")
        return rows
    for name, msg in timed["errors"].items():
        skipped(name, msg)
    floor = timed["floor_ms"]
    gemm_p50 = timed["gemm_ms"][1]
    rows.append(row(provider="floor", metric="time", unit="ms", values=floor,
                    config={**cfg, "flops": case.flops(), "gemm_ms": timed["gemm_ms"]}, **base))
    rate = [6.0 * case.N * case.H * case.V / (t * 1e-3) / 1e9 for t in reversed(timed["gemm_ms"])]
    rows.append(row(provider="torch.mm", metric="gemm_rate", unit="GFLOP/s", values=rate, config=cfg, **base))
    for name, q in timed["quantiles"].items():
        reps = len(timed["samples"].get(name, [])) or None
        rows.append(row(provider=name, metric="time", unit="ms", values=q, config={**cfg, "reps": reps}, **base))
        rows.append(row(provider=name, metric="floor_ratio", unit="x", values=[t / floor[1] for t in q],
                        config={**cfg, "floor_ms": floor[1], "gemm_ms_p50": gemm_p50}, **base))

    if not settings.memory:
        return rows
    for name in runnable:
        if name in timed["errors"]:
            continue
        step(f"{case.case_id} memory {name}")
        try:
            mem = run_job({"kind": "memory", "case": cfg, "provider": name, "device": settings.device,
                           "repeats": settings.memory_repeats}, env_extra=MEMORY_ENV, timeout=settings.timeout_s)
        except JobFailed as e:
            rows.append(row(provider=name, metric="memory_skipped", unit="", config={**cfg, "reason": str(e)},
                            **base))
            continue
        m = sorted(mem["memory_mib"])
        values = [m[0], m[len(m) // 2], m[-1]]
        info = {**cfg, "method": mem["method"], "inputs_mib": round(mem["inputs_mib"], 3), "repeats": len(m),
                "env": MEMORY_ENV, "grad_mib": round(case.grad_mib(), 3)}
        rows.append(row(provider=name, metric="memory", unit="MiB", values=values, config=info, **base))
        # what the algorithm holds besides its unavoidable outputs: the quantity that should stay flat in V
        rows.append(row(provider=name, metric="memory_beyond_grads", unit="MiB",
                        values=[v - case.grad_mib() for v in values], config=info, **base))
    return rows


def run_kernel_suite(run: dict, *, quick: bool = False, settings: Settings | None = None,
                     cases: list[KernelCase] | None = None, progress: bool = True) -> list[dict]:
    """Measure every case; returns the CSV rows (the caller writes them)."""
    settings = settings or (Settings.for_quick_run() if quick else Settings())
    cases = cases if cases is not None else suite_cases(quick)
    unknown = [n for n in (settings.providers or []) if n not in PROVIDERS]
    if unknown:
        raise ValueError(f"providers: unknown {unknown}; known: {sorted(PROVIDERS)}")
    from tqdm.auto import tqdm

    bar = tqdm(total=jobs_in(cases, settings), desc="kernels", unit="proc", disable=not progress,
               dynamic_ncols=True)
    first = [True]

    def step(label: str):
        if not first[0]:
            bar.update(1)
        first[0] = False
        bar.set_postfix_str(label, refresh=True)

    rows: list[dict] = []
    try:
        for case in cases:
            rows += measure_case(case, settings, run, step)
        bar.update(bar.total - bar.n)
    finally:
        bar.close()
    return rows
