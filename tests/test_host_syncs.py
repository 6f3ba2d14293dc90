"""Device->host reads in the kernels' hot path: one per entry-point call (all input value checks batched into a
single read), none in the loss itself, on both backends.

On a GPU every read of a tensor's value on the host (`.item()`, `.tolist()`, `float(t)`, `if t:`, a boolean-mask
index, which must learn its result size) waits for the stream. CPU tensors cannot show a stall, so the test counts
those reads made from fastrl.kernels' own source lines while the entry points run (Triton's interpreter and torch
internals are not counted). On CUDA the `cuda` test asks torch's own sync detector.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

from fastrl.kernels import fused_linear_grpo_loss, fused_linear_logprobs

KERNELS_DIR = os.path.dirname(os.path.abspath(sys.modules["fastrl.kernels"].__file__))
READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "nonzero", "masked_select")
B, T, H, V = 3, 6, 32, 70


def count_kernel_reads(monkeypatch) -> list[str]:
    """Wrap the Tensor methods that read values back; record the kernels' source lines that call them."""
    seen: list[str] = []

    def wrap(name, real):
        def reader(self, *args, **kwargs):
            caller = sys._getframe(1)
            if os.path.realpath(caller.f_code.co_filename).startswith(os.path.realpath(KERNELS_DIR)):
                seen.append(f"{os.path.basename(caller.f_code.co_filename)}:{caller.f_lineno} {name}")
            return real(self, *args, **kwargs)
        return reader

    for name in READS:
        monkeypatch.setattr(torch.Tensor, name, wrap(name, getattr(torch.Tensor, name)))
    real_getitem = torch.Tensor.__getitem__

    def getitem(self, index):
        if isinstance(index, torch.Tensor) and index.dtype == torch.bool:  # result size depends on the values
            seen.append(f"{os.path.basename(sys._getframe(1).f_code.co_filename)} boolean index")
        return real_getitem(self, index)

    monkeypatch.setattr(torch.Tensor, "__getitem__", getitem)
    return seen


def inputs():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(B, T, H, generator=g, requires_grad=True)
    w = (torch.randn(V, H, generator=g) / H ** 0.5).requires_grad_(True)
    y = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T)
    old = -torch.rand(B, T, generator=g) * 3 - 1
    return h, w, y, mask, old


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_grpo_loss_reads_the_device_once(monkeypatch, backend):
    h, w, y, mask, old = inputs()
    seen = count_kernel_reads(monkeypatch)
    loss, _ = fused_linear_grpo_loss(h, w, y, mask, rewards=torch.rand(B), num_generations=3, old_logprobs=old,
                                     ref_logprobs=old + 0.1, beta=0.04, is_ratio=torch.rand(B, T) + 0.5,
                                     top_entropy_quantile=0.5, loss_type="grpo", backend=backend)
    reads_in_forward = list(seen)
    loss.backward(torch.tensor(2.0))
    assert len(reads_in_forward) == 1 and "tolist" in reads_in_forward[0], reads_in_forward
    backward = seen[len(reads_in_forward):]
    # backward reads the incoming factor only for CPU tensors (a factor of 1 skips the scaling pass there; on CUDA
    # the factor stays on the device: kernels/grpo_loss.py)
    assert len(backward) == 1 and backward[0].startswith("grpo_loss.py") and "__float__" in backward[0], backward


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_logprobs_read_the_device_once(monkeypatch, backend):
    h, w, y, _, _ = inputs()
    seen = count_kernel_reads(monkeypatch)
    logp = fused_linear_logprobs(h, w, y, backend=backend)
    logp.sum().backward()
    assert len(seen) == 1 and "tolist" in seen[0], seen


def test_batched_checks_still_name_each_argument():
    h, w, y, mask, old = inputs()
    bad_old = old.clone()
    bad_old[1, 2] = float("nan")
    with pytest.raises(ValueError, match=r"old_logprobs: expected finite values \(no NaN or inf\), got 1 non-finite"):
        fused_linear_grpo_loss(h, w, y, mask, torch.randn(B), old_logprobs=bad_old, backend="torch")
    bad_y = y.clone()
    bad_y[0, 0] = V
    with pytest.raises(ValueError, match=r"targets: expected ids in \[0, V\) = \[0, 70\), got min \d+, max 70"):
        fused_linear_logprobs(h, w, bad_y, backend="torch")


@pytest.mark.cuda
def test_no_unexpected_sync_on_cuda():
    """torch's sync debug mode raises on any synchronizing call; the one batched check read is allowed."""
    h, w, y, mask, old = (t.cuda() for t in inputs())
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with pytest.warns(UserWarning) as record:
            loss, _ = fused_linear_grpo_loss(h, w, y, mask, torch.randn(B, device="cuda"), old_logprobs=old,
                                             top_entropy_quantile=0.5)
            loss.backward()
        assert len([r for r in record if "synchroniz" in str(r.message)]) == 1
    finally:
        torch.cuda.set_sync_debug_mode(0)
