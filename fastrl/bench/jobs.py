"""Running one measurement in a fresh Python process (`python -m fastrl.bench.worker`) and reading its result.

The worker prints its result as the last stdout line prefixed by RESULT_PREFIX; this module owns that protocol
so the suites (kernels.py, e2e.py) and the worker need not import each other.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

RESULT_PREFIX = "FASTRL_BENCH_RESULT "


class JobFailed(RuntimeError):
    pass


def run_job(job: dict, *, env_extra: dict | None = None, timeout: float = 1800.0) -> dict:
    """Run a worker job (see worker.py) in a fresh Python process and return its result dict."""
    env = dict(os.environ)
    env.update(env_extra or {})
    try:
        proc = subprocess.run([sys.executable, "-m", "fastrl.bench.worker"], input=json.dumps(job),
                              capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise JobFailed(f"timed out after {timeout:.0f} s") from None
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX):])
    tail = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    reason = tail[-1] if tail else f"exit code {proc.returncode}"
    if proc.returncode < 0:
        reason = f"killed by signal {-proc.returncode} (out of memory?)"
    raise JobFailed(reason[:300])
