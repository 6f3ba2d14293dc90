"""No tensor anywhere near [N, V] is created by the PyTorch path, forward or backward.

A TorchDispatchMode sees every tensor every aten op returns; the largest must stay under N·V/8 elements at
N = 2048, V = 32768 (the [N, V] logits would be 67M elements; the bound is 8.4M; a row tile is 2M, or 8.4M
for the fp32 paths that hold one tile buffer)."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fastrl.kernels import fused_linear_grpo_loss, fused_linear_logprobs


class LargestTensor(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.largest, self.op = 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.numel() > self.largest:
                self.largest, self.op = t.numel(), str(func)
        return out


B, T, H, V = 8, 256, 64, 32768  # N = 2048
BOUND = B * T * V // 8


def _inputs():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(B, T, H, generator=g, requires_grad=True)
    w = (torch.randn(V, H, generator=g) * 0.05).requires_grad_(True)
    return h, w, torch.randint(0, V, (B, T), generator=g)


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_grpo_loss_never_allocates_logits(level):
    h, w, y = _inputs()
    ref = torch.randn(B, T) - 10
    with LargestTensor() as seen:
        loss, _ = fused_linear_grpo_loss(h, w, y, torch.ones(B, T), torch.randn(B), ref_logprobs=ref, beta=0.04,
                                         importance_sampling_level=level, backend="torch")
        loss.backward()
    assert seen.largest <= BOUND, f"{seen.op} made a tensor of {seen.largest} elements (bound {BOUND})"
    assert w.grad is not None and h.grad is not None


def test_logprobs_with_entropy_never_allocates_logits():
    h, w, y = _inputs()
    with LargestTensor() as seen:
        logp, ent = fused_linear_logprobs(h, w, y, with_entropy=True, backend="torch")
        (logp.sum() + ent.sum()).backward()
    assert seen.largest <= BOUND, f"{seen.op} made a tensor of {seen.largest} elements (bound {BOUND})"


def test_the_check_catches_a_materializing_path():
    h, w, y = _inputs()
    with LargestTensor() as seen:
        torch.log_softmax(h[:2] @ w.T, -1)  # a quarter of the rows, and still too big
    assert seen.largest > BOUND


class NewBigTensors(TorchDispatchMode):
    """Ops that return a tensor of at least `size` elements in fresh storage (not a view of, or in place on,
    one of their inputs)."""

    def __init__(self, size):
        super().__init__()
        self.size, self.ops = size, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = [a for a in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        held = {a.untyped_storage().data_ptr() for a in inputs}
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.numel() >= self.size and t.untyped_storage().data_ptr() not in held:
                self.ops.append(str(func))
        return out


@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_backward_makes_no_second_gradient(scale):
    """The gradients computed in forward are scaled in place: backward (of the loss as is, or divided as for
    gradient accumulation) allocates no second [V, H] or [N, H] gradient, which would double the peak."""
    h, w, y = _inputs()
    loss, _ = fused_linear_grpo_loss(h, w, y, torch.ones(B, T), torch.randn(B), backend="torch")
    with NewBigTensors(min(B * T, V) * H) as seen:
        (loss * scale if scale != 1.0 else loss).backward()
    assert not seen.ops, seen.ops
    assert h.grad is not None and w.grad is not None
