"""The program that runs inside the sandbox and runs the untrusted code there (started by fastrl.rewards.sandbox).

Standard library only: it runs as `python -I -S -c <this file>` under an interpreter the sandbox can read, not in
fastrl's environment. It is trusted with no verdict. It reads one job as JSON on stdin: the program, the mode,
each case's input (stdin text, a call expression, or, in the forgeable "trusted" mode, a test source) and the
limits; never an expected output. It answers on stdout with a `{"ready": true}` line, then one JSON line per
case: what the worker wrote to stdout (stdin mode) or the JSON text of the value it returned (call mode), its
exit code, whether it timed out or wrote past the output limit, and the tail of its stderr. The trusted parent
compares these with the expected outputs it alone holds.

Each case runs in a worker forked from this runner (no new interpreter start: a fork costs ~1 ms), in a fresh
directory, with its own limits; the session's /tmp is emptied after each case. Output travels through pipes, never through files read back by name. After
each case every other process in the sandbox is killed, so nothing one case starts lives into the next.

- strong mode (bubblewrap): this runner is PID 1 of the sandbox's PID namespace, so `kill(-1)` ends every other
  process there and orphans are reaped here; bubblewrap has already set no_new_privs and the seccomp filter.
- "landlock" mode (the named weaker mode, never root): the runner first installs the parent's seccomp filter
  and a Landlock domain (read-only access to the interpreter's files, no writes anywhere, no TCP, no signals or
  abstract sockets reaching outside), and the worker gets RLIMIT_NPROC 0 (no processes at all).
"""
import ctypes
import json
import os
import resource
import selectors
import signal
import sys
import time
import traceback

VALUE_FD = 3  # the worker's pipe for the call's JSON value
STDERR_TAIL = 2000  # bytes of the worker's stderr kept
READ_CHUNK = 65536
PR_SET_NO_NEW_PRIVS, PR_SET_DUMPABLE, PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 38, 4, 22, 2


# ------------------------------------------------------------------------------------------------- the worker

def set_limits(limits: dict, forks: bool) -> None:
    """Per-process limits of the worker (and whatever it starts)."""
    mb = 1 << 20
    cpu = int(limits["timeout"]) + 1
    nproc = limits["max_processes"] + 1 if forks else 0  # + 1: this runner, the same uid in the sandbox
    for name, soft, hard in (("RLIMIT_AS", limits["memory_mb"] * mb, limits["memory_mb"] * mb),
                             ("RLIMIT_CPU", cpu, cpu + 1),  # SIGXCPU first, SIGKILL a second later
                             ("RLIMIT_NPROC", nproc, nproc), ("RLIMIT_FSIZE", limits["disk_mb"] * mb,
                                                             limits["disk_mb"] * mb),
                             ("RLIMIT_NOFILE", limits["max_open_files"], limits["max_open_files"]),
                             ("RLIMIT_CORE", 0, 0)):
        resource.setrlimit(getattr(resource, name), (soft, hard))


def redirect(stdin_fd: int, out_w: int, err_w: int, value_w: int) -> None:
    """The case's pipes on fds 0-3; every other descriptor (the job pipe, the runner's stdout) closed."""
    for fd, target in ((stdin_fd, 0), (out_w, 1), (err_w, 2), (value_w, VALUE_FD)):
        os.dup2(fd, target)
    os.closerange(VALUE_FD + 1, resource.getrlimit(resource.RLIMIT_NOFILE)[0])
    sys.stdin = sys.__stdin__ = open(0, encoding="utf-8", errors="replace", closefd=False)
    sys.stdout = sys.__stdout__ = open(1, "w", encoding="utf-8", errors="replace", closefd=False)
    sys.stderr = sys.__stderr__ = open(2, "w", encoding="utf-8", errors="replace", closefd=False)


def run_program(program: str, mode: str, case: str) -> None:
    """Run the program, then the case's call (its value goes to VALUE_FD as JSON) or, in the forgeable trusted
    mode, its test source (b"true" to VALUE_FD if it returns). Exits the process; a SystemExit keeps its code."""
    namespace = {"__name__": "__main__", "__builtins__": __builtins__}
    try:
        exec(compile(program, "<program>", "exec"), namespace)
        if mode == "call":
            value = eval(compile(case, "<call>", "eval"), namespace)
            os.write(VALUE_FD, json.dumps(value, allow_nan=False).encode())  # plain data or an exception
        elif mode == "trusted":
            exec(compile(case, "<test>", "exec"), namespace)
            os.write(VALUE_FD, b"true")
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:  # noqa: BLE001 - KeyboardInterrupt and the like are failures too
        traceback.print_exc()
        code = 1
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:  # noqa: BLE001 - a closed or broken stream must not change the exit code
            pass
    os._exit(code & 0xFF)


def worker(job: dict, case: str, case_dir: str, fds: tuple) -> None:
    os.setsid()
    redirect(*fds)
    os.chdir(case_dir)
    os.environ.clear()
    os.environ.update(HOME=case_dir, TMPDIR=case_dir, PATH="/usr/bin:/bin", LANG="C.UTF-8")
    set_limits(job["limits"], forks=job["isolation"] == "bwrap")
    sys.dont_write_bytecode = True
    run_program(job["program"], job["mode"], case)


# ------------------------------------------------------------------------------------------------- one case

def input_fd(text: str) -> int:
    """A read-only descriptor holding `text` (an anonymous in-memory file: a pipe would block past 64 KB)."""
    fd = os.memfd_create("stdin")
    data = text.encode()
    while data:
        data = data[os.write(fd, data):]
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


class Streams:
    """The worker's stdout, stderr and value pipes, read as they fill: stdout and value up to `limit` bytes
    (past it, `overflow`), stderr's last STDERR_TAIL bytes."""

    def __init__(self, out_r: int, err_r: int, value_r: int, limit: int):
        self.limit, self.overflow = limit, False
        self.data = {out_r: bytearray(), err_r: bytearray(), value_r: bytearray()}
        self.out_r, self.err_r, self.value_r = out_r, err_r, value_r
        self.selector = selectors.DefaultSelector()
        for fd in self.data:
            os.set_blocking(fd, False)
            self.selector.register(fd, selectors.EVENT_READ)

    def pump(self, timeout: float) -> None:
        """Read what is ready, waiting at most `timeout`; also wakes when a registered pidfd's process exits."""
        for key, _ in self.selector.select(max(0.0, timeout)):
            if key.fd in self.data:
                self.read(key.fd)

    def read(self, fd: int) -> None:
        try:
            chunk = os.read(fd, READ_CHUNK)
        except BlockingIOError:
            return
        if not chunk:
            self.selector.unregister(fd)
            os.close(fd)
            return
        buffer = self.data[fd]
        buffer += chunk
        if fd == self.err_r:
            del buffer[:-STDERR_TAIL]
        elif len(buffer) > self.limit:
            self.overflow = True

    def drain(self, seconds: float) -> None:
        """Read what is left once every writer is dead (EOF comes at once), for at most `seconds`."""
        deadline = time.monotonic() + seconds
        while self.selector.get_map() and time.monotonic() < deadline and not self.overflow:
            self.pump(deadline - time.monotonic())
        for fd in list(self.selector.get_map()):
            self.selector.unregister(fd)
            os.close(fd)
        self.selector.close()

    def text(self, fd: int) -> str:
        return bytes(self.data[fd][:self.limit]).decode("utf-8", "replace")


def run_case(job: dict, index: int, case: str) -> dict:
    """Fork the worker for one case, collect its output until it exits, the time limit, or the output limit."""
    limits = job["limits"]
    case_dir = os.path.join(job["workdir"], f"case{index}")
    if job["isolation"] == "bwrap":  # landlock mode writes nowhere: its cases share the empty workdir
        os.mkdir(case_dir, 0o700)
    else:
        case_dir = job["workdir"]
    stdin_fd = input_fd(case if job["mode"] == "stdin" else "")
    (out_r, out_w), (err_r, err_w), (value_r, value_w) = os.pipe(), os.pipe(), os.pipe()
    sys.stdout.flush()
    start = time.monotonic()
    pid = os.fork()
    if pid == 0:
        try:
            worker(job, case, case_dir, (stdin_fd, out_w, err_w, value_w))
        finally:
            os._exit(70)
    for fd in (stdin_fd, out_w, err_w, value_w):
        os.close(fd)
    streams = Streams(out_r, err_r, value_r, limits["max_output_bytes"])
    status = wait_for(pid, streams, start + limits["timeout"])
    seconds = time.monotonic() - start
    end_case(pid, job["isolation"])
    streams.drain(0.5)
    if job["isolation"] == "bwrap":
        empty_directory(job["workdir"])
    return {"exit_code": None if status is None else os.waitstatus_to_exitcode(status),
            "timed_out": status is None and not streams.overflow, "output_limit": streams.overflow,
            "stdout": streams.text(out_r), "value": streams.text(value_r) if job["mode"] != "stdin" else None,
            "stderr": streams.text(err_r), "seconds": seconds}


def wait_for(pid: int, streams: Streams, deadline: float):
    """The worker's wait status, or None at the deadline or once its output passed the limit."""
    exited = os.pidfd_open(pid)  # readable once the worker exits: no polling
    streams.selector.register(exited, selectors.EVENT_READ)
    try:
        while not streams.overflow:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                return status
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            streams.pump(remaining)
        return None
    finally:
        streams.selector.unregister(exited)
        os.close(exited)


def end_case(pid: int, isolation: str) -> None:
    """Kill everything the case left. As PID 1 of the sandbox (bwrap), kill(-1) reaches every other process
    in it, whatever its session; in landlock mode the worker could not fork, so its process group is all."""
    if isolation == "bwrap":
        try:
            os.kill(-1, signal.SIGKILL)
        except ProcessLookupError:  # nothing left to kill
            pass
        while True:  # reap the worker and every orphan re-parented to this PID 1
            try:
                os.waitpid(-1, 0)
            except ChildProcessError:
                break
    else:
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass


def empty_directory(path: str) -> None:
    """Delete everything below `path` (the session's tmpfs) without following the symlinks left in it."""
    import shutil
    for entry in os.listdir(path):
        full = os.path.join(path, entry)
        if os.path.isdir(full) and not os.path.islink(full):
            shutil.rmtree(full, ignore_errors=True)  # fd-based on Linux: symlinks are unlinked, not followed
        else:
            os.unlink(full)


# ---------------------------------------------------------------------------------------- landlock mode only

def _libc():
    return ctypes.CDLL(None, use_errno=True)


# Landlock ABI 6 (Linux 6.12): struct landlock_ruleset_attr {u64 handled_access_fs, handled_access_net, scoped}
LANDLOCK_CREATE_RULESET, LANDLOCK_ADD_RULE, LANDLOCK_RESTRICT_SELF = 444, 445, 446  # one number on every arch
LANDLOCK_RULE_PATH_BENEATH, LANDLOCK_CREATE_RULESET_VERSION = 1, 1
FS_EXECUTE, FS_READ_FILE, FS_READ_DIR = 1 << 0, 1 << 2, 1 << 3
FS_ALL = (1 << 16) - 1  # execute ... ioctl_dev (ABI 5): every right not granted below is refused
NET_BIND_TCP, NET_CONNECT_TCP = 1 << 0, 1 << 1
SCOPE_ABSTRACT_UNIX_SOCKET, SCOPE_SIGNAL = 1 << 0, 1 << 1
LANDLOCK_MIN_ABI = 6


class RulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64), ("handled_access_net", ctypes.c_uint64),
                ("scoped", ctypes.c_uint64)]


class PathBeneath(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def landlock_abi() -> int:
    """The kernel's Landlock ABI version, or 0 without Landlock."""
    abi = _libc().syscall(LANDLOCK_CREATE_RULESET, None, ctypes.c_size_t(0), LANDLOCK_CREATE_RULESET_VERSION)
    return max(abi, 0)


def restrict_with_landlock(readable: list) -> None:
    """From here on this process and its children may read and execute only below `readable`, write and create
    nothing, bind or connect no TCP port, and reach no process or abstract socket outside their domain."""
    libc = _libc()
    if landlock_abi() < LANDLOCK_MIN_ABI:
        raise OSError(f"Landlock ABI {LANDLOCK_MIN_ABI} needed, the kernel has {landlock_abi()}")
    attr = RulesetAttr(FS_ALL, NET_BIND_TCP | NET_CONNECT_TCP, SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL)
    ruleset = libc.syscall(LANDLOCK_CREATE_RULESET, ctypes.byref(attr), ctypes.c_size_t(ctypes.sizeof(attr)), 0)
    if ruleset < 0:
        raise OSError(ctypes.get_errno(), "landlock_create_ruleset")
    try:
        for path in readable:
            fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            rights = FS_EXECUTE | FS_READ_FILE | (FS_READ_DIR if os.path.isdir(path) else 0)
            rule = PathBeneath(rights, fd)
            added = libc.syscall(LANDLOCK_ADD_RULE, ruleset, LANDLOCK_RULE_PATH_BENEATH, ctypes.byref(rule), 0)
            os.close(fd)
            if added != 0:
                raise OSError(ctypes.get_errno(), f"landlock_add_rule {path}")
        if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 or \
                libc.syscall(LANDLOCK_RESTRICT_SELF, ruleset, 0) != 0:
            raise OSError(ctypes.get_errno(), "landlock_restrict_self")
    finally:
        os.close(ruleset)


def install_seccomp(bpf: bytes) -> None:
    """Load the parent's seccomp program (struct sock_fprog over 8-byte sock_filter instructions)."""

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    buffer = ctypes.create_string_buffer(bpf, len(bpf))
    program = SockFprog(len(bpf) // 8, ctypes.cast(buffer, ctypes.c_void_p))
    libc = _libc()
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 or \
            libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(program), 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "could not install the seccomp filter")


def main() -> None:
    job = json.loads(sys.stdin.buffer.read())
    _libc().prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)  # no /proc/<pid>/mem or fd access from the workers
    if job["isolation"] == "landlock":
        restrict_with_landlock(job["readable"])
        install_seccomp(bytes.fromhex(job["seccomp"]))
    sys.stdout.write(json.dumps({"ready": True}) + "\n")
    for index, case in enumerate(job["cases"]):
        result = run_case(job, index, case)
        sys.stdout.write(json.dumps(result) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
