"""The seccomp filter every sandboxed process runs under, compiled by the system's libseccomp (libseccomp.so.2).

The filter allows by default and refuses, with EPERM, the system calls a program that reads input and prints an
answer never needs and that widen the kernel surface it can reach: debugging other processes, mounts and
namespaces, kernel keyrings, BPF, perf, userfaultfd, io_uring, module loading and the like. Sockets other than
AF_UNIX are refused with EAFNOSUPPORT (in the strong mode the network namespace has nothing to reach anyway;
this also closes netlink, packet and vsock sockets); in the landlock mode every socket is (Landlock does not
govern connecting to a host's unix socket). System calls of another architecture's ABI (i386 on x86_64)
kill the process: libseccomp's default for a foreign architecture.

The list follows what container runtimes refuse by default (Docker's default seccomp profile and bubblewrap's
own `--disable-userns`), trimmed to calls a Python program does not use.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import socket
from functools import lru_cache

SCMP_ACT_ALLOW = 0x7FFF0000
SCMP_CMP_NE, SCMP_CMP_MASKED_EQ = 1, 7
NEW_NAMESPACE_FLAGS = (0x00020000, 0x02000000, 0x04000000, 0x08000000, 0x10000000, 0x20000000, 0x40000000,
                       0x00000080)  # CLONE_NEWNS, NEWCGROUP, NEWUTS, NEWIPC, NEWUSER, NEWPID, NEWNET, NEWTIME

REFUSED = (
    "ptrace", "process_vm_readv", "process_vm_writev", "kcmp", "pidfd_getfd",  # other processes' memory
    "mount", "umount2", "pivot_root", "chroot", "move_mount", "open_tree", "fsopen", "fsconfig", "fsmount",
    "fspick", "mount_setattr", "unshare", "setns", "clone3",  # clone3 -> glibc falls back to clone, filtered
    "keyctl", "add_key", "request_key", "bpf", "perf_event_open", "userfaultfd", "fanotify_init",
    "io_uring_setup", "io_uring_enter", "io_uring_register", "open_by_handle_at", "name_to_handle_at",
    "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module", "acct", "swapon", "swapoff",
    "reboot", "syslog", "quotactl", "ioperm", "iopl", "personality", "lookup_dcookie", "vhangup",
    "mbind", "move_pages", "migrate_pages", "set_mempolicy",
)


class ArgCmp(ctypes.Structure):
    """libseccomp's struct scmp_arg_cmp."""
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int), ("datum_a", ctypes.c_uint64),
                ("datum_b", ctypes.c_uint64)]


def errno_action(code: int) -> int:
    return 0x00050000 | (code & 0xFFFF)  # SCMP_ACT_ERRNO(code)


def load_libseccomp() -> ctypes.CDLL:
    """The system's libseccomp with the prototypes used here; OSError saying how to get it when absent."""
    name = ctypes.util.find_library("seccomp") or "libseccomp.so.2"
    try:
        lib = ctypes.CDLL(name, use_errno=True)
    except OSError as exc:
        raise OSError(f"libseccomp.so.2 not found ({exc}): apt-get install libseccomp2") from exc
    lib.seccomp_init.restype, lib.seccomp_init.argtypes = ctypes.c_void_p, [ctypes.c_uint32]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint,
                                           ctypes.POINTER(ArgCmp)]
    lib.seccomp_export_bpf.argtypes = [ctypes.c_void_p, ctypes.c_int]
    lib.seccomp_release.argtypes = [ctypes.c_void_p]
    return lib


@lru_cache(maxsize=2)
def seccomp_filter(unix_sockets: bool = True) -> bytes:
    """The compiled BPF program (an array of 8-byte sock_filter instructions), built once per process."""
    lib = load_libseccomp()
    ctx = lib.seccomp_init(SCMP_ACT_ALLOW)
    if not ctx:
        raise OSError("seccomp_init failed")
    try:
        for name in REFUSED:
            _add(lib, ctx, errno_action(errno.EPERM), name)
        if unix_sockets:
            _add(lib, ctx, errno_action(errno.EAFNOSUPPORT), "socket", ArgCmp(0, SCMP_CMP_NE, socket.AF_UNIX, 0))
        else:
            _add(lib, ctx, errno_action(errno.EAFNOSUPPORT), "socket")
        for flag in NEW_NAMESPACE_FLAGS:  # clone(flags & CLONE_NEWxxx): one rule per flag (a masked compare)
            _add(lib, ctx, errno_action(errno.EPERM), "clone", ArgCmp(0, SCMP_CMP_MASKED_EQ, flag, flag))
        fd = os.memfd_create("seccomp-bpf")
        try:
            if lib.seccomp_export_bpf(ctx, fd) != 0:
                raise OSError("seccomp_export_bpf failed")
            os.lseek(fd, 0, os.SEEK_SET)
            return _read_all(fd)
        finally:
            os.close(fd)
    finally:
        lib.seccomp_release(ctx)


def _add(lib: ctypes.CDLL, ctx, action: int, name: str, *compares: ArgCmp) -> None:
    number = lib.seccomp_syscall_resolve_name(name.encode())
    if number < 0:  # __NR_SCMP_ERROR: no such call on this architecture
        return
    array = (ArgCmp * len(compares))(*compares) if compares else None
    if lib.seccomp_rule_add_array(ctx, action, number, len(compares), array) != 0:
        raise OSError(f"seccomp_rule_add({name}) failed")


def _read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 1 << 16):
        chunks.append(chunk)
    return b"".join(chunks)


def filter_fd() -> int:
    """A fresh descriptor holding the filter, positioned at its start (bubblewrap's `--seccomp FD` reads it)."""
    fd = os.memfd_create("seccomp-bpf", 0)  # inheritable is set by the caller's pass_fds
    data = seccomp_filter()
    while data:
        data = data[os.write(fd, data):]
    os.lseek(fd, 0, os.SEEK_SET)
    return fd
