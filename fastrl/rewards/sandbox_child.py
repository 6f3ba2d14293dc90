"""The program that runs untrusted Python inside the sandbox (started by `fastrl.rewards.sandbox`).

Run as `python -I -S sandbox_child.py` (no site-packages, no PYTHON* variables) with a minimal environment, in a
session of its own. It reads one job as JSON from stdin: a list of runs, each a list of sources to run one after
another in one namespace. Runs go one after another, each isolated afresh (one interpreter start serves them
all: it is most of the cost). It prints one JSON list, per run: whether its sources all ran to the end, the exit
code, the tail of stderr, which isolation was in force, and the seconds taken. Standard library only: this file
must run without fastrl or the venv.

Processes ("kernel" isolation, used when running as root on Linux):

    launcher (this script, root)        forks one runner per run, one after another
      runner (root)                     unshares new mount, network, PID and IPC namespaces, mounts, waits
        init (PID 1 of the new PID ns)  root, dies with the runner (PR_SET_PDEATHSIG); when it exits the
          worker (uid nobody)           kernel kills everything left in the namespace, setsid or not
            whatever the untrusted code starts (at most `max_processes` for the uid, machine-wide)

- network: a fresh network namespace has only a loopback device, and it is down: nothing is reachable.
- files: / is made private to the namespace; fresh tmpfs mounts hide the host's world-writable /tmp, /var/tmp,
  /dev/shm and /run/lock; the worker runs as nobody (no capabilities), so the only place it can write is its
  working directory on the new /tmp, whose size is bounded; the tmpfs disappears with the namespace.
- the standard library, if it lives below a directory nobody cannot enter (pyenv under /root), is made
  readable by hiding that directory under an empty tmpfs and bind-mounting the library back, read-only.
- resources: RLIMIT_AS (memory), RLIMIT_CPU, RLIMIT_NPROC (counted per uid, and root is exempt: hence nobody),
  RLIMIT_FSIZE, RLIMIT_NOFILE, no core files.

"audit" isolation (the fallback when not root, or no namespaces): the worker is a plain child with the same
limits (RLIMIT_NPROC 0 when not root: no forks at all), in a host temporary directory made by the parent, and
Python audit hooks (PEP 578) refuse sockets, subprocesses, forks, ctypes and writes outside that directory.
Audit hooks are not a security boundary against native code, so this mode is weaker; the parent says which mode
ran.

Time: the runner kills the worker (in kernel isolation: PID 1, and so the whole namespace) when the job's
timeout has passed since the fork; the parent kills the launcher's process group if the launcher itself
overstays. RLIMIT_CPU is a further backstop for busy processes.

Pass or fail: the worker writes the job's nonce to a pipe only after every source returned without an
exception; a `sys.exit()` or `os._exit()` before that is a failure. The untrusted code runs in the same
interpreter as that harness, so code written to inspect the harness could forge a pass: the sandbox protects
the machine, not the reward, from such code.
"""
import ctypes
import json
import os
import resource
import select
import signal
import sys
import time
import traceback

CLONE_NEWNS, CLONE_NEWIPC, CLONE_NEWPID, CLONE_NEWNET = 0x00020000, 0x08000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 0x1, 0x2, 0x4, 0x8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 0x20, 0x1000, 0x4000, 0x40000
MNT_DETACH = 0x2
PR_SET_PDEATHSIG = 1
NOBODY = 65534
WORKDIR = "/tmp/work"  # inside the namespace's own /tmp
STDLIB_STAGE = "/tmp/.stdlib"
HIDDEN_WRITABLE = ("/var/tmp", "/dev/shm", "/run/lock", "/dev/mqueue")  # world-writable on typical hosts
MAX_REPORT_BYTES = 4096


# ----------------------------------------------------------------------------------------------- kernel calls

def _libc():
    return ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{what}: {os.strerror(errno)}")


def _mount(source, target, fstype, flags, data=None) -> None:
    def enc(s):
        return s.encode() if s is not None else None
    _check(_libc().mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)), f"mount {target}")


def try_unshare_namespaces() -> bool:
    """Enter new mount, network, PID and IPC namespaces; False if the system does not allow it."""
    if os.geteuid() != 0 or not sys.platform.startswith("linux"):
        return False
    try:
        libc = _libc()
        return libc.unshare(CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID | CLONE_NEWIPC) == 0
    except (OSError, AttributeError):
        return False


# ------------------------------------------------------------------------------------------------ file system

def prepare_filesystem(disk_mb: int) -> None:
    """Mounts in the new mount namespace (the worker's view of the file system)."""
    _mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing below propagates back to the host
    for path in HIDDEN_WRITABLE:
        if os.path.isdir(path):
            _mount("tmpfs", path, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC | MS_RDONLY, "size=4k,mode=755")
    _mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, f"size={disk_mb}m,mode=755")
    os.mkdir(WORKDIR, 0o700)
    os.chown(WORKDIR, NOBODY, NOBODY)
    expose_stdlib()


def expose_stdlib() -> None:
    """Let nobody read the standard library when it sits below a directory only root may enter (pyenv in
    /root): that directory is covered by an empty tmpfs (which also hides everything else in it) and the
    standard library is bind-mounted back, read-only, at its own path, so module paths stay the same."""
    stdlib = os.path.dirname(os.__file__)
    closed = _first_closed_ancestor(stdlib)
    if closed is None:
        return
    os.mkdir(STDLIB_STAGE, 0o755)
    _mount(stdlib, STDLIB_STAGE, None, MS_BIND | MS_REC)
    _mount("tmpfs", closed, "tmpfs", MS_NOSUID | MS_NODEV, "size=64k,mode=755")
    os.makedirs(stdlib, 0o755)
    _mount(STDLIB_STAGE, stdlib, None, MS_BIND | MS_REC)
    _mount(None, stdlib, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)
    _check(_libc().umount2(STDLIB_STAGE.encode(), MNT_DETACH), f"umount {STDLIB_STAGE}")
    os.rmdir(STDLIB_STAGE)


def _first_closed_ancestor(path: str):
    """The outermost directory on `path` that others may not enter, or None."""
    parts = os.path.abspath(path).split(os.sep)[1:]
    for i in range(1, len(parts) + 1):
        ancestor = os.sep + os.path.join(*parts[:i])
        if not os.stat(ancestor).st_mode & 0o001:
            return ancestor
    return None


def redirect_output(workdir: str) -> None:
    """The untrusted code's stdin is empty; its stdout and stderr go to files in its directory."""
    null = os.open(os.devnull, os.O_RDONLY)
    out = os.open(os.path.join(workdir, ".stdout"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    err = os.open(os.path.join(workdir, ".stderr"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    for fd, target in ((null, 0), (out, 1), (err, 2)):
        os.dup2(fd, target)
        os.close(fd)


def close_other_fds(keep: int) -> None:
    os.closerange(3, keep)
    os.closerange(keep + 1, resource.getrlimit(resource.RLIMIT_NOFILE)[0])


# ---------------------------------------------------------------------------------------------------- limits

def set_limits(limits: dict, forks_allowed: bool) -> None:
    mb = 1024 * 1024
    cpu = int(limits["timeout"]) + 1
    nproc = limits["max_processes"] if forks_allowed else 0
    for name, value in (("RLIMIT_AS", limits["memory_mb"] * mb), ("RLIMIT_CPU", cpu),
                        ("RLIMIT_NPROC", nproc), ("RLIMIT_FSIZE", limits["disk_mb"] * mb),
                        ("RLIMIT_NOFILE", limits["max_open_files"]), ("RLIMIT_CORE", 0)):
        hard = value + 1 if name == "RLIMIT_CPU" else value  # SIGXCPU first, SIGKILL a second later
        resource.setrlimit(getattr(resource, name), (value, hard))


def drop_privileges() -> None:
    os.setgroups([])
    os.setgid(NOBODY)
    os.setuid(NOBODY)
    if os.getuid() == 0 or os.geteuid() == 0:
        raise OSError("could not drop root")


def clean_environment(workdir: str) -> None:
    os.environ.clear()
    os.environ.update(HOME=workdir, TMPDIR=workdir, PATH="/usr/bin:/bin", LANG="C.UTF-8")
    os.chdir(workdir)


# ------------------------------------------------------------------------------------------------ audit hooks

_REFUSED_EVENTS = ("socket.", "os.fork", "os.forkpty", "os.system", "os.exec", "os.posix_spawn", "os.spawn",
                   "os.kill", "os.killpg", "subprocess.", "_posixsubprocess", "ctypes.", "pty.")
_PATH_EVENTS = ("os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.chmod", "os.chown", "os.link",
                "os.symlink", "os.truncate", "os.utime", "os.setxattr", "os.removexattr", "shutil.")
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def install_audit_hook(workdir: str) -> None:
    """Refuse network, processes, native calls, and writes outside `workdir` (a fallback, not a boundary)."""
    root = os.path.realpath(workdir)
    realpath, fspath = os.path.realpath, os.fspath

    def inside(path) -> bool:
        if isinstance(path, int):
            return True  # an fd already open
        resolved = realpath(os.fsdecode(fspath(path)))
        return resolved == root or resolved.startswith(root + os.sep)

    def hook(event, args):
        if event.startswith(_REFUSED_EVENTS):
            raise PermissionError(f"sandbox: {event} is not allowed")
        if event == "open" and args[2] & _WRITE_FLAGS and not inside(args[0]):
            raise PermissionError(f"sandbox: writing {args[0]!r} is not allowed")
        if event.startswith(_PATH_EVENTS):
            for arg in args:
                if isinstance(arg, (str, bytes, os.PathLike)) and not inside(arg):
                    raise PermissionError(f"sandbox: {event} on {arg!r} is not allowed")

    sys.addaudithook(hook)


# ------------------------------------------------------------------------------------------------- the worker

def run_sources(sources: list, nonce: str, result_fd: int) -> None:
    """Run each source in one namespace; write the nonce only if all of them returned. Never returns."""
    worker = os.getpid()
    namespace = {"__name__": "__main__", "__builtins__": __builtins__}
    try:
        for index, source in enumerate(sources):
            exec(compile(source, f"<source {index}>", "exec"), namespace)
        sys.stdout.flush()
    except BaseException:  # noqa: BLE001 - SystemExit and KeyboardInterrupt are failures too
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    if os.getpid() == worker:  # a child the code forked does not report
        os.write(result_fd, nonce.encode())
    os._exit(0)


def worker(job: dict, result_fd: int, kernel: bool) -> None:
    workdir = WORKDIR if kernel else job["workdir"]
    redirect_output(workdir)
    close_other_fds(result_fd)
    sys.dont_write_bytecode = True
    set_limits(job["limits"], forks_allowed=kernel or os.geteuid() == 0)
    if kernel:
        drop_privileges()
    clean_environment(workdir)
    if not kernel:
        install_audit_hook(workdir)
    run_sources(job["sources"], job["nonce"], result_fd)


def init_process(job: dict, lifeline: int, result_fd: int) -> None:
    """PID 1 of the new PID namespace: starts the worker, reaps orphans, exits with the worker's status."""
    _libc().prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    # getppid() is 0 here (the parent is outside the namespace), so the runner's liveness before the line
    # above took effect is read from the lifeline pipe: readable means EOF, i.e. the runner is gone.
    if select.select([lifeline], [], [], 0)[0]:
        os._exit(70)
    os.close(lifeline)
    try:
        _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)  # this namespace's processes only
    except OSError:
        pass
    pid = os.fork()
    if pid == 0:
        _run_guarded(worker, job, result_fd, True)
    os.close(result_fd)
    while True:
        child, status = os.wait()
        if child == pid:
            os._exit(_exit_code(status))


# ------------------------------------------------------------------------------------ runner and launcher

def _run_guarded(function, *args) -> None:
    """Run `function` in a forked child; whatever happens, the child never returns to the caller's code."""
    try:
        function(*args)
    except BaseException:  # noqa: BLE001
        traceback.print_exc()
    finally:
        os._exit(70)


def _exit_code(status: int) -> int:
    code = os.waitstatus_to_exitcode(status)
    return code if code >= 0 else 128 - code  # killed by signal s -> 128 + s, as shells report it


def _read_until(fd: int, deadline: float) -> bytes | None:
    """What the worker reports, up to EOF; None if the deadline passes or the report is too long. Closes fd."""
    data = b""
    try:
        while len(data) <= MAX_REPORT_BYTES:  # a longer report is not the nonce anyway
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
                return None
            chunk = os.read(fd, MAX_REPORT_BYTES)
            if not chunk:
                return data
            data += chunk
        return None
    finally:
        os.close(fd)


def _wait_until(pid: int, deadline: float) -> int | None:
    """The child's exit status, or None if it is still running at the deadline."""
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.005)


def _tail(path: str, limit: int) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - limit))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


def isolate_and_run(job: dict) -> dict:
    """The runner's part: isolate, fork the worker (through PID 1 in kernel isolation), wait, report."""
    read_fd, write_fd = os.pipe()
    lifeline, lifeline_held = os.pipe()  # the runner holds the write end until the end
    mode = job["isolation"]
    kernel = mode in ("auto", "kernel") and try_unshare_namespaces()
    if mode == "kernel" and not kernel:
        raise OSError("kernel isolation needs root on Linux with unshare(2) allowed")
    if kernel:
        prepare_filesystem(job["limits"]["disk_mb"])
    else:
        os.mkdir(job["workdir"], 0o700)
    pid = os.fork()
    if pid == 0:
        os.close(read_fd)
        os.close(lifeline_held)
        if kernel:
            _run_guarded(init_process, job, lifeline, write_fd)
        _run_guarded(worker, job, write_fd, False)
    os.close(write_fd)
    deadline = time.monotonic() + job["limits"]["timeout"]
    report = _read_until(read_fd, deadline)
    status = _wait_until(pid, deadline) if report is not None else None
    if status is None:  # by pid, not group: the code may have left the group. In kernel isolation pid is
        os.kill(pid, signal.SIGKILL)  # PID 1, and its death ends every process in the namespace
        os.waitpid(pid, 0)
    os.close(lifeline_held)
    workdir = WORKDIR if kernel else job["workdir"]
    return {"passed": status is not None and report == job["nonce"].encode(), "timed_out": status is None,
            "exit_code": None if status is None else _exit_code(status),
            "stderr": _tail(os.path.join(workdir, ".stderr"), 2000), "isolation": "kernel" if kernel else "audit"}


def run_one(job: dict, sources: list, workdir: str) -> dict:
    """One run in a forked runner, which owns that run's namespaces (they cannot be re-entered for the next
    run: a PID namespace has one PID 1). The runner reports a JSON line on a pipe only the launcher reads."""
    read_fd, write_fd = os.pipe()
    start = time.monotonic()
    pid = os.fork()
    if pid == 0:
        os.close(read_fd)
        try:
            result = isolate_and_run({**job, "sources": sources, "workdir": workdir})
        except Exception as exc:  # noqa: BLE001 - reported to the parent, which raises it
            result = {"error": f"{type(exc).__name__}: {exc}"}
        os.write(write_fd, json.dumps(result).encode())
        os._exit(0)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as report:
        data = report.read()
    os.waitpid(pid, 0)
    result = json.loads(data) if data else {"error": "the runner died without a report"}
    return {**result, "seconds": time.monotonic() - start}


def main() -> None:
    """Runs the job's runs one after another, each isolated afresh; prints one JSON list of results."""
    job = json.loads(sys.stdin.buffer.read())
    results = []
    for index, sources in enumerate(job["runs"]):
        results.append(run_one(job, sources, os.path.join(job["workdir"], f"run{index}")))
        if "error" in results[-1]:
            break
    sys.stdout.write(json.dumps(results) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
