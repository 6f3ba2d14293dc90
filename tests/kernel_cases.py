"""Random inputs for kernel tests, and the tolerance rule every kernel test uses."""
from __future__ import annotations

import math

import torch

# One rule for every dtype (apple/ml-cross-entropy's): the fused path's error against the float64 ground truth may
# be no worse than the error of PyTorch's own materializing path at the same dtype, plus a slack relative to the
# size of the values. Both paths round the logits GEMM to the input precision, so neither is exact. Two statistics:
# the mean absolute error may exceed PyTorch's by at most MEAN_FACTOR (measured over 12 seeds: ours is 0.6-0.75×
# PyTorch's in bf16/fp16), and the single worst element by at most MAX_FACTOR (one element's rounding luck varies:
# measured up to 1.4× in bf16/fp16 while the mean stayed below PyTorch's).
MEAN_FACTOR, MAX_FACTOR = 1.25, 2.0
RELATIVE_SLACK = {torch.float32: 2e-6, torch.bfloat16: 2e-3, torch.float16: 2.5e-4}


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


def assert_no_worse_than(actual, baseline, truth, dtype, what: str, extra: float = 0.0):
    """Errors against truth: mean ≤ MEAN_FACTOR·PyTorch's mean + slack, max ≤ MAX_FACTOR·PyTorch's max + slack,
    slack = RELATIVE_SLACK[dtype]·max(|truth|, 1) + extra (a stated rounding bound, e.g. logit_rounding_bound)."""
    if truth.numel() == 0:
        return
    ours = (actual.detach().double() - truth.detach().double()).abs()
    theirs = (baseline.detach().double() - truth.detach().double()).abs()
    slack = RELATIVE_SLACK[dtype] * max(float(truth.detach().abs().max()), 1.0) + extra
    for stat, factor in (("mean", MEAN_FACTOR), ("max", MAX_FACTOR)):
        a, b = float(getattr(ours, stat)()), float(getattr(theirs, stat)())
        assert a <= factor * b + slack, f"{what} ({dtype}): {stat} error {a:.3g} > {factor}×{b:.3g} + {slack:.2g}"




def logit_rounding_bound(h, w, b, tau, g_logp, g_ent, ulps: float = 1.0) -> tuple[float, float, float]:
    """First-order bound on the fp32 gradient error (hidden, weight, bias) caused by `ulps` units of roundoff in
    every logit z_ij = (h_i·w_j + b_j)/τ (ulps of the sum Σ|h_ik·w_jk| + |b_j|): the rounding any fp32 GEMM makes.
    Ours and PyTorch's block the sum differently, so on a given element one can be off where the other's errors
    happen to cancel.

    On sharply peaked rows (|z| ≈ 70-100) such an error is ~1e-5 per logit and reaches the gradient through
    dz_ij = [g_logp·(1[j=y] − p_ij) − g_ent·p_ij·(log p_ij + H_i)]/τ, whose sensitivity to z_ij is
    p_ij·(|g_logp| + |g_ent|·(|log p_ij + H_i| + 1))/τ. Measured without this term: ~5% of seeds failed the
    max-error rule at N130 fp32 (our dh 2.75e-5 vs PyTorch's lucky 9e-6, truth up to 3.2)."""
    hd, wd = h.detach().double(), w.detach().double()
    z = hd @ wd.T + (0.0 if b is None else b.detach().double())  # [N, V]
    scale = (hd.abs() @ wd.abs().T + (0.0 if b is None else b.detach().double().abs())) / tau  # [N, V]
    logp = torch.log_softmax(z / tau, -1)
    p = logp.exp()
    entropy = -(p * logp).sum(-1, keepdim=True)  # [N, 1]
    dz = p * (g_logp.abs()[:, None] + g_ent.abs()[:, None] * ((logp + entropy).abs() + 1.0)) / tau  # [N, V]
    dz = dz * scale * ulps * 2.0 ** -24  # [N, V] bound on |δdz_ij|
    return float((dz @ wd.abs()).max()), float((dz.T @ hd.abs()).max()), float(dz.sum(0).max())


def ratios_off_clip_edges(logp, old, mask, level, margin, epsilon=0.2, epsilon_high=0.2):
    """old [B, T] moved so no exact log-ratio logp − old (token, or the row's masked mean at sequence level) lies
    within `margin` of a clip edge log(1 − ε), log(1 + ε_high); logp [B, T] is the float64-exact policy logprob.

    The clipped objective's gradient jumps at those edges: a token whose exact ratio sits within a 16-bit logp
    error (PyTorch's own reaches ~0.04 in bf16 here) of an edge lands on either side in any 16-bit implementation,
    switching its whole gradient on or off, which an error statistic against float64 can not judge. Measured:
    ~3% of seeds failed that way for the fused path and PyTorch-bf16 alike (18% with logits scaled ×3 by a
    logit transform). The edges themselves are tested exactly in test_grpo_hand_worked.py."""
    log_ratio = logp - old
    if level == "sequence":
        log_ratio = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1)).unsqueeze(-1).expand_as(log_ratio)
    shift = torch.zeros_like(log_ratio)
    for edge in (math.log(1 - epsilon), math.log(1 + epsilon_high)):
        near = (log_ratio - edge).abs() < margin
        side = torch.where(log_ratio >= edge, 1.0, -1.0)
        shift = torch.where(near, edge + side * margin - log_ratio, shift)
    return old - shift  # log_ratio + shift is now ≥ margin from each edge
