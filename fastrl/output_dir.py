"""The output directory: writable before anything loads, never mixing two runs, locked while a run uses it.

- `check_writable(path)`: creates it and writes, fsyncs and removes a 1 MiB probe, so a read-only or full disk is
  a ValueError before the model loads rather than an OSError at the first checkpoint.
- `check_earlier_run(path, resuming, overwrite)`: transformers' `overwrite_output_dir` rule. A folder holding an
  earlier run (checkpoints, metrics.jsonl, completions.jsonl) is refused unless the run resumes it
  (resume_from_checkpoint) or overwrite_output_dir=True, which moves the earlier run's files into
  `replaced-<UTC time>/` inside it (nothing is deleted) and starts afresh.
- `OutputDirLock`: an exclusive `flock` on `.fastrl.lock` for the whole of `train()`; a second run on the same
  folder gets a ValueError naming the holder's pid. The kernel drops the lock when the process dies.
"""
from __future__ import annotations

import errno
import fcntl
import os
import re
import shutil
import time

LOCK_FILE = ".fastrl.lock"
RUN_FILES = ("metrics.jsonl", "completions.jsonl", "curves.png", "runs")  # what a run writes besides checkpoints
PROBE_BYTES = 1 << 20


def earlier_run_files(path: str) -> list[str]:
    """Names in `path` that an earlier training run wrote (checkpoint-<step> folders and the run's logs)."""
    if not os.path.isdir(path):
        return []
    return sorted(n for n in os.listdir(path) if n in RUN_FILES or re.fullmatch(r"checkpoint-\d+", n))


def check_writable(path: str) -> None:
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise ValueError(f"output_dir: {path!r} can not be created: {e.strerror or e}") from None
    probe = os.path.join(path, f".fastrl-write-probe-{os.getpid()}")
    try:
        write_probe(probe, f"output_dir: {path!r}")
    finally:
        if os.path.isfile(probe):
            os.remove(probe)


def write_probe(file: str, what: str) -> None:
    """Write and fsync PROBE_BYTES to `file`; an OSError becomes a ValueError saying `what` is not writable."""
    try:
        with open(file, "wb") as f:
            f.write(b"\0" * PROBE_BYTES)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        full = " (the disk is full)" if e.errno == errno.ENOSPC else ""
        raise ValueError(f"{what} is not writable{full}: {e.strerror or e}") from None


def check_earlier_run(path: str, resuming: bool, overwrite: bool) -> str | None:
    """Refuse or set aside an earlier run in `path`; returns the folder it was moved to, if it was."""
    found = earlier_run_files(path)
    if not found or resuming:
        return None
    if not overwrite:
        raise ValueError(f"output_dir: {path!r} already holds a run ({', '.join(found[:4])}); pass "
                         "resume_from_checkpoint=True to continue it, overwrite_output_dir=True to start afresh "
                         "(its files are moved to a replaced-<time> folder inside it), or choose another output_dir")
    aside = os.path.join(path, time.strftime("replaced-%Y%m%dT%H%M%SZ", time.gmtime()))
    os.makedirs(aside)
    for name in found:
        shutil.move(os.path.join(path, name), os.path.join(aside, name))
    return aside


class OutputDirLock:
    """`with OutputDirLock(path):` holds an exclusive lock on the folder; a second holder gets a ValueError."""

    def __init__(self, path: str):
        self.path = os.path.join(path, LOCK_FILE)
        self.fd: int | None = None

    def __enter__(self) -> OutputDirLock:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise ValueError(f"output_dir: {os.path.dirname(self.path)!r} is in use by another run (pid {holder}); "
                             "wait for it or choose another output_dir") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing releases the flock
            self.fd = None
