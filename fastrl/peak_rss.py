"""This process's resident memory as Linux reports it, for the memory benchmarks and `fastrl plan`'s measurements:
fields of /proc/self/status (VmRSS now, VmHWM its peak, VmSize the address space) and resetting the peak.
A measured process sets MALLOC_MMAP_THRESHOLD_=65536 so freed tensors go back to the kernel and RSS follows live
memory (glibc keeps freed blocks otherwise)."""
from __future__ import annotations


def status_kib(field: str) -> int:
    """A field of /proc/self/status in KiB, e.g. "VmRSS", "VmHWM", "VmSize"."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def reset_peak_rss() -> None:
    """VmHWM := the current VmRSS (writes "5" to /proc/self/clear_refs, Linux >= 4.0; OSError where not allowed)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
