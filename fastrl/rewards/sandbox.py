"""Run untrusted Python (model output) in a separate, locked-down process.

    result = run_python([solution_source, test_source], SandboxLimits(timeout=5))
    result.passed     # True only if every source ran to its end without an exception

Each call starts `python -I -S sandbox_child.py` with an empty environment (PATH only) in a new session, and
hands it the job on stdin. The child isolates itself (see sandbox_child.py for how): with root on Linux it uses
new mount, network, PID and IPC namespaces and runs the code as uid nobody ("kernel" isolation); otherwise it
falls back to resource limits and Python audit hooks ("audit" isolation, weaker; a warning is logged once).
Every result says which isolation was in force.

On timeout the child kills the code's process (in kernel isolation: the namespace's PID 1, and with it every
process the code started, including those that left the process group); should the child itself hang, the
parent kills its whole process group.

Infrastructure failures (the sandbox itself cannot start) raise RuntimeError: a broken sandbox must not
quietly score every completion 0.
"""
from __future__ import annotations

import json
import logging
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from functools import lru_cache

logger = logging.getLogger(__name__)

CHILD_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sandbox_child.py")
ISOLATIONS = ("auto", "kernel", "audit")
_CLEAN_ENV = {"PATH": "/usr/bin:/bin"}
# the launcher enforces each run's timeout; the parent steps in only if the launcher itself hangs
_RUN_OVERHEAD_S, _LAUNCHER_GRACE_S = 0.5, 2.0
_warned_audit = False


@dataclass(frozen=True)
class SandboxLimits:
    """Limits for one run.

    timeout: wall-clock seconds from the start of the sandboxed process (interpreter start-up, ~0.05 s, is
        before it). memory_mb: address space per process (RLIMIT_AS). max_processes: processes of the sandbox
        uid, machine-wide, across concurrent sandboxes (RLIMIT_NPROC); with memory_mb it bounds what a
        fork-and-allocate program can take from the machine: 8 x 512 MB by default. disk_mb: the largest file,
        and in kernel isolation the size of the private tmpfs. max_open_files: RLIMIT_NOFILE."""

    timeout: float = 5.0
    memory_mb: int = 512
    max_processes: int = 8
    disk_mb: int = 16
    max_open_files: int = 64

    def __post_init__(self):
        if not (isinstance(self.timeout, (int, float)) and 0 < self.timeout <= 3600):
            raise ValueError(f"timeout must be seconds in (0, 3600], got {self.timeout!r}")
        minimums = {"memory_mb": 64, "max_processes": 1, "disk_mb": 1, "max_open_files": 16}
        for name, minimum in minimums.items():
            value = getattr(self, name)
            if not isinstance(value, int) or value < minimum:
                raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


@dataclass(frozen=True)
class SandboxResult:
    passed: bool  # every source ran to its end
    timed_out: bool
    exit_code: int | None  # None on timeout; 128 + signal when a signal ended it
    isolation: str | None  # "kernel" or "audit"; None when the launcher itself had to be killed
    stderr: str  # the last 2,000 characters of the code's stderr
    seconds: float  # from the start of the run (after interpreter start-up) to its end


def run_python(sources: list[str], limits: SandboxLimits | None = None, isolation: str = "auto") -> SandboxResult:
    """Run `sources` one after another in one namespace inside the sandbox."""
    return run_python_batch([sources], limits, isolation)[0]


def run_python_batch(runs: list[list[str]], limits: SandboxLimits | None = None,
                     isolation: str = "auto") -> list[SandboxResult]:
    """Several runs, one after another, each isolated afresh, for the price of one interpreter start-up."""
    if isinstance(runs, str) or not runs or not all(_is_sources(sources) for sources in runs):
        raise ValueError("sources must be a list of strings of Python code (runs: a non-empty list of such lists)")
    if isolation not in ISOLATIONS:
        raise ValueError(f"isolation must be one of {ISOLATIONS}, got {isolation!r}")
    limits = limits or SandboxLimits()
    with tempfile.TemporaryDirectory(prefix="fastrl-sandbox-") as workdir:  # used by audit isolation only
        job = {"runs": [list(sources) for sources in runs], "nonce": secrets.token_hex(16),
               "isolation": isolation, "workdir": workdir, "limits": asdict(limits)}
        backstop = len(runs) * (limits.timeout + _RUN_OVERHEAD_S) + _LAUNCHER_GRACE_S
        return _run_child(job, backstop)


def _is_sources(sources) -> bool:
    return isinstance(sources, (list, tuple)) and all(isinstance(s, str) for s in sources)


def _run_child(job: dict, timeout: float) -> list[SandboxResult]:
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-I", "-S", CHILD_SCRIPT], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_CLEAN_ENV, cwd="/",
                            start_new_session=True, close_fds=True)
    try:
        out, err = proc.communicate(json.dumps(job).encode(), timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        proc.communicate()
        killed = SandboxResult(False, True, None, None, "", time.perf_counter() - start)
        return [killed] * len(job["runs"])
    except BaseException:
        _kill_group(proc)
        raise
    return _parse_report(out, err, len(job["runs"]))


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the launcher's process group. Only called before the launcher is reaped, so its pid, which is
    the group id, cannot have been reused by an unrelated process."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def _parse_report(out: bytes, err: bytes, expected: int) -> list[SandboxResult]:
    lines = out.decode("utf-8", "replace").strip().splitlines()
    try:
        reports = json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        raise RuntimeError(f"sandbox child gave no report; its stderr: {err.decode('utf-8', 'replace')[-2000:]}")
    for report in reports:
        if "error" in report:
            raise RuntimeError(f"sandbox could not start: {report['error']}")
    if len(reports) != expected:
        raise RuntimeError(f"sandbox child reported {len(reports)} runs, expected {expected}")
    _warn_if_audit(reports[0]["isolation"])
    return [SandboxResult(r["passed"], r["timed_out"], r["exit_code"], r["isolation"], r["stderr"], r["seconds"])
            for r in reports]


def _warn_if_audit(isolation: str) -> None:
    global _warned_audit
    if isolation == "audit" and not _warned_audit:
        _warned_audit = True
        logger.warning("code sandbox: kernel isolation unavailable (needs root on Linux); using resource limits "
                       "and Python audit hooks, which native code can get around")


@lru_cache(maxsize=None)
def sandbox_isolation(isolation: str = "auto") -> str:
    """Which isolation `run_python(..., isolation=isolation)` gets on this machine: "kernel" or "audit"."""
    return run_python(["pass"], SandboxLimits(timeout=30), isolation).isolation
