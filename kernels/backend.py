"""Which implementation runs: `backend="auto"` is Triton on CUDA tensors, PyTorch everywhere else."""
from __future__ import annotations

import importlib
import os
from types import SimpleNamespace

import torch

BACKENDS = ("auto", "triton", "torch")


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(backend: str, device: torch.device) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {list(BACKENDS)}, got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    if backend == "triton":
        if not triton_available():
            raise ValueError("backend='triton': triton is not installed (pip install triton)")
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(f"backend='triton': needs CUDA tensors (got {device}) or TRITON_INTERPRET=1")
    return backend


def phases(backend: str) -> SimpleNamespace:
    """The three phase functions of a resolved backend (the Triton modules are imported only when used)."""
    suffix = "_triton" if backend == "triton" else ""
    mod = lambda name: importlib.import_module(f"{__package__}.{name}{suffix}")  # noqa: E731
    return SimpleNamespace(forward_sweep=mod("forward_sweep").forward_sweep,
                           grad_sweep=mod("grad_sweep").grad_sweep,
                           grpo_epilogue=mod("grpo_epilogue").grpo_epilogue)
