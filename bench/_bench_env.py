"""Settings shared by the bench_*.py files (a module of its own: `conftest` is a name tests/ uses too)."""
import os

import torch


def quick() -> bool:
    """FASTRL_BENCH=quick (default) or full."""
    return os.environ.get("FASTRL_BENCH", "quick") != "full"


def device() -> str:
    return os.environ.get("FASTRL_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")


def load_note() -> str:
    """The machine and its 1-minute load average now, for a result's config (timings on a shared machine)."""
    return f"2-core CPU, 1-minute load average {os.getloadavg()[0]:.1f} at the end"
