"""Random inputs for kernel tests, and the tolerance rule every kernel test uses."""
from __future__ import annotations

import torch

# One rule for every dtype (apple/ml-cross-entropy's): the fused path's error against the float64 ground truth
# may be at most FACTOR × the error of PyTorch's own materializing path at the same dtype, plus a slack relative to
# the size of the values. Both paths round the logits GEMM to the input precision and sum over V in fp32 or
# lower, so neither can be exact; the fused path may not be meaningfully worse.
FACTOR = 1.25
RELATIVE_SLACK = {torch.float32: 2e-6, torch.bfloat16: 4e-3, torch.float16: 5e-4}


def make_linear_inputs(n_rows, hidden_size, vocab, dtype, seed, *, bias=False, peaked=False, lead=None):
    g = torch.Generator().manual_seed(seed)
    shape = (n_rows,) if lead is None else lead
    h = torch.randn(*shape, hidden_size, generator=g)
    w = torch.randn(vocab, hidden_size, generator=g) / hidden_size ** 0.5 * 2.0
    if peaked:  # some rows put nearly all mass on one token: stresses the online max / log-sum-exp
        h.view(-1, hidden_size)[::3] *= 8.0
    y = torch.randint(0, vocab, shape, generator=g)
    b = torch.randn(vocab, generator=g) * 0.5 if bias else None
    cast = lambda t: None if t is None else t.to(dtype).requires_grad_(True)  # noqa: E731
    return cast(h), cast(w), y, cast(b)


def max_abs_err(a, b) -> float:
    return float((a.detach().double() - b.detach().double()).abs().max()) if a.numel() else 0.0


def assert_no_worse_than(actual, baseline, truth, dtype, what: str):
    """err(actual) ≤ FACTOR·err(baseline) + RELATIVE_SLACK[dtype]·max|truth| (errors: max abs vs truth)."""
    ours, theirs = max_abs_err(actual, truth), max_abs_err(baseline, truth)
    scale = float(truth.detach().abs().max()) if truth.numel() else 0.0
    limit = FACTOR * theirs + RELATIVE_SLACK[dtype] * max(scale, 1.0)
    assert ours <= limit, f"{what} ({dtype}): error {ours:.3g} > {FACTOR}×{theirs:.3g} + slack (limit {limit:.3g})"


