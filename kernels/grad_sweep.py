"""Phase 3 in PyTorch: gradients of hidden, weight and bias from dL/dlogp (and dL/dentropy), over row tiles.

For each row tile the logits are recomputed, then with p = softmax(z) and y the target:
    dL/dz_j = g_logp · (1[j = y] − p_j) − g_entropy · p_j · (log p_j + entropy)
and, with z = (h Wᵀ + b) / τ, dh = (dz/τ) @ W, dW += (dz/τ)ᵀ @ h, db += Σ_rows dz/τ, accumulated in fp32.
A LogitTransform replaces 1/τ by its grad_scale, and a softcap multiplies dz by 1 − (z / cap_scale)² first.
"""
from __future__ import annotations

import torch

from .forward_sweep import (ONE_BUFFER_TILE_ELEMENTS, TILE_ELEMENTS, logits_tile, rows_per_tile, softcap_derivative,
                           chunk_shape, fp32_chunk, whole_rows_fit)
from .params import LogitTransform


def logit_grad_(log_p: torch.Tensor, p: torch.Tensor, targets, g_logp, g_entropy, entropy,
                log_sum=None, target_grad=None) -> torch.Tensor:
    """In place on p: returns dL/dz [n, V] (log_p is clobbered when the entropy term is present).

    target_grad [n]: what is added at each row's target column, g_logp by default (a vocabulary chunk passes 0
    for rows whose target lies in another chunk, and targets clamped into the chunk).

    log_sum None: p = softmax(z), log_p = log p. log_sum s [n] given: p holds e = exp(z − m) and log_p
    holds z − m (m the row max, s = log Σ exp(z − m)); the true p = e·exp(−s) and log p = (z − m) − s, with
    exp(−s) folded into the per-row coefficients (no pass over [n, V] to normalize)."""
    if log_sum is not None:
        r = torch.exp(-log_sum)  # [n]
        g_p = g_logp * r
        g_entropy = None if g_entropy is None else g_entropy * r
        entropy = None if entropy is None else entropy - log_sum
    else:
        g_p = g_logp
    if g_entropy is not None:
        log_p.add_(entropy[:, None]).mul_(p).mul_(-g_entropy[:, None])  # −g_H · p · (log p + H)
    p.mul_(-g_p[:, None])
    if g_entropy is not None:
        p.add_(log_p)
    at_target = g_logp if target_grad is None else target_grad
    p.scatter_add_(1, targets[:, None].long(), at_target[:, None])  # + g at the target
    return p


def accumulate_grads(dz, hidden, weight, grad_hidden, grad_weight, grad_bias) -> None:
    """dz [n, V] fp32 (already times grad_scale) -> writes grad_hidden [n, H], adds into grad_weight, grad_bias."""
    dz_in = dz if dz.dtype == hidden.dtype else dz.to(hidden.dtype)
    if grad_hidden is not None and grad_hidden.dtype == dz_in.dtype:
        torch.mm(dz_in, weight, out=grad_hidden)  # [n, V] @ [V, H] -> [n, H]
    elif grad_hidden is not None:
        grad_hidden.copy_(dz_in @ weight)
    if grad_weight is not None:
        if grad_weight.dtype == dz_in.dtype:
            grad_weight.addmm_(dz_in.T, hidden)  # [V, n] @ [n, H] -> [V, H]
        else:
            grad_weight.add_(dz_in.T @ hidden)
    if grad_bias is not None:
        grad_bias.add_(dz.sum(dim=0))


def allocate_grads(hidden, weight, need_hidden_grad, need_weight_grad, need_bias_grad, *, zero_weight=True):
    """fp32 gradient buffers; dW left unwritten when zero_weight is False (the caller's first GEMM overwrites it)."""
    f32 = dict(dtype=torch.float32, device=hidden.device)
    dh = torch.empty(hidden.shape, **f32) if need_hidden_grad else None
    dw = (torch.zeros if zero_weight else torch.empty)(weight.shape, **f32) if need_weight_grad else None
    db = torch.zeros(weight.shape[0], **f32) if need_bias_grad else None
    return dh, dw, db


def grad_sweep(hidden, weight, targets, bias, logits: LogitTransform, lse, g_logp, g_entropy, logp, entropy,
               need_hidden_grad, need_weight_grad, need_bias_grad):
    """See kernels/README.md. Returns (grad_hidden [N, H], grad_weight [V, H], grad_bias [V]) in fp32 or None.

    lse [2, N]: the row max m and s = log Σ exp(z − m) from the forward sweep. Each tile forms z − m (exact near
    the max) and e = exp(z − m); p = e·exp(−s) is never formed, exp(−s) scales the per-row coefficients."""
    n_rows, vocab = hidden.shape[0], weight.shape[0]
    g_logp = g_logp.float() * logits.grad_scale
    g_entropy = None if g_entropy is None else g_entropy.float() * logits.grad_scale
    # fp32 without an entropy gradient or softcap (GRPO's three-phase path, logprobs whose entropy is only
    # logged): p in one buffer and no dz pass, as in grpo_single_pass (dh and dW straight from p: lean_tile_grads)
    lean = hidden.dtype == torch.float32 and g_entropy is None and logits.softcap is None
    if not whole_rows_fit(n_rows, vocab, ONE_BUFFER_TILE_ELEMENTS if lean else TILE_ELEMENTS):
        dh, dw, db = allocate_grads(hidden, weight, need_hidden_grad, need_weight_grad, need_bias_grad)
        chunked_grad_sweep(hidden, weight, targets, bias, logits, lse, g_logp, g_entropy, entropy,
                           chunk_shape(n_rows, vocab), dh, dw, db)
        return dh, dw, logits.bias_grad_(db)
    dh, dw, db = allocate_grads(hidden, weight, need_hidden_grad, need_weight_grad, need_bias_grad,
                                zero_weight=not lean or n_rows == 0)
    rows = rows_per_tile(n_rows, vocab, ONE_BUFFER_TILE_ELEMENTS if lean else TILE_ELEMENTS)
    z_buf = torch.empty(rows, vocab, dtype=torch.float32, device=hidden.device)
    p_buf = None if lean else torch.empty_like(z_buf)
    cap_buf = None if logits.softcap is None else torch.empty_like(z_buf)
    row_max, log_sum = lse[0], lse[1]
    for a in range(0, n_rows, rows):
        e = min(a + rows, n_rows)
        z = logits_tile(hidden[a:e], weight, bias, logits, z_buf[: e - a])  # [n, V]
        cap = None if cap_buf is None else softcap_derivative(z, logits, cap_buf[: e - a])  # [n, V]
        z.sub_(row_max[a:e, None])  # z − m
        if lean:
            ex = z.exp_()  # [n, V] in place: exp(z − m) = p·exp(s)
            lean_tile_grads(ex, hidden[a:e], weight, targets[a:e], g_logp[a:e], None if dh is None else dh[a:e],
                            dw, db, first=a == 0, row_scale=torch.exp(-log_sum[a:e]))
            continue
        ex = torch.exp(z, out=p_buf[: e - a])
        ent = None if g_entropy is None else entropy[a:e]
        dz = logit_grad_(z, ex, targets[a:e], g_logp[a:e], None if ent is None else g_entropy[a:e], ent,
                         log_sum=log_sum[a:e])
        if cap is not None:
            dz.mul_(cap)
        accumulate_grads(dz, hidden[a:e], weight, None if dh is None else dh[a:e], dw, db)
    return dh, dw, logits.bias_grad_(db)


def lean_tile_grads(p, h, weight, targets, gs, grad_hidden, grad_weight, grad_bias, *, first: bool, q=None,
                    row_scale=None):
    """fp32 row tile, p = softmax(z) [n, V], gs = (dL/dlogp)·grad_scale [n], no entropy term or softcap,
    so dz = gs·(onehot(y) − p):
        dh  = gs · (W_y − p @ W)                      [n, H]   (the GEMM reads p, no dz is formed)
        dW += pᵀ (−gs·h) + onehot(y)ᵀ (gs·h)          [V, H]   (a GEMM plus an index_add of n rows)
        db += pᵀ (−gs) + onehot(y)ᵀ gs                [V]
    Writes grad_hidden; adds into grad_weight / grad_bias, or overwrites grad_weight when `first` (beta = 0: its
    unwritten contents are ignored, saving a zero fill of [V, H]). q = p @ W when the caller has it already.
    row_scale r [n]: p holds exp(z − m) and the softmax is p·r (r = exp(−s)); r scales q and the coefficients
    of p, O(n·H) work instead of a pass over [n, V]. q given by the caller is already normalized."""
    gp = gs if row_scale is None else gs * row_scale  # [n] coefficient of the p columns
    if grad_hidden is not None:
        if q is None:
            q = p @ weight  # [n, V] @ [V, H] -> [n, H]
            if row_scale is not None:
                q.mul_(row_scale[:, None])
        torch.mul(torch.index_select(weight, 0, targets).sub_(q), gs[:, None], out=grad_hidden)
    if grad_weight is not None:
        gh = h * gs[:, None]  # [n, H]
        gph = gh if row_scale is None else h * gp[:, None]  # [n, H]
        grad_weight.addmm_(p.T, gph, beta=0.0 if first else 1.0, alpha=-1.0)  # [V, n] @ [n, H] -> [V, H]
        grad_weight.index_add_(0, targets, gh)  # + gs·h at each row's target
    if grad_bias is not None:
        grad_bias.addmv_(p.T, gp, alpha=-1.0)  # [V, n] @ [n] -> [V]
        grad_bias.index_add_(0, targets, gs)


def chunked_grad_sweep(hidden, weight, targets, bias, t: LogitTransform, lse, g_logp, g_entropy, entropy, shape,
                       dh, dw, db) -> None:
    """grad_sweep over [rows, cols] tiles (shape from chunk_shape), g_logp / g_entropy already times
    grad_scale. Each tile's dz is logit_grad_'s, with the target term only where the target is in the chunk; the
    GEMMs run in fp32 (16-bit h and W chunks upcast, as logits_tile does): dh [n, H] += dz @ W_c over the chunks,
    dW_c [C, H] += dzᵀ @ h and db_c += Σ dz over the row blocks (dW, db zeroed by the caller)."""
    n_rows, vocab = hidden.shape[0], weight.shape[0]
    rows, cols = shape
    z_buf, e_buf = (torch.empty(rows, cols, dtype=torch.float32, device=hidden.device) for _ in range(2))
    cap_buf = None if t.softcap is None else torch.empty_like(z_buf)
    for a in range(0, n_rows, rows):
        b = min(a + rows, n_rows)
        h32, y = hidden[a:b].float(), targets[a:b].long()  # [n, H], [n]
        g_ent, ent = (None, None) if g_entropy is None else (g_entropy[a:b], entropy[a:b])
        for c in range(0, vocab, cols):
            d = min(c + cols, vocab)
            w_c, b_c = fp32_chunk(weight, bias, c, d)  # [C, H], [C]: upcast once for the three GEMMs
            z = logits_tile(h32, w_c, b_c, t, z_buf[: b - a, : d - c])
            cap = None if cap_buf is None else softcap_derivative(z, t, cap_buf[: b - a, : d - c])
            z.sub_(lse[0, a:b, None])  # z − m
            ex = torch.exp(z, out=e_buf[: b - a, : d - c])  # exp(z − m) = p·exp(s)
            in_chunk = (y >= c) & (y < d)
            dz = logit_grad_(z, ex, (y - c).clamp_(0, d - c - 1), g_logp[a:b], g_ent, ent, log_sum=lse[1, a:b],
                             target_grad=torch.where(in_chunk, g_logp[a:b], 0.0))
            if cap is not None:
                dz.mul_(cap)
            if dh is not None:
                dh[a:b].addmm_(dz, w_c, beta=0.0 if c == 0 else 1.0)  # [n, C] @ [C, H]
            if dw is not None:
                dw[c:d].addmm_(dz.T, h32)  # [C, n] @ [n, H]
            if db is not None:
                db[c:d].add_(dz.sum(dim=0))
