"""Phase 3 in PyTorch: gradients of hidden, weight and bias from dL/dlogp (and dL/dentropy), over row tiles.

For each row tile the logits are recomputed, then with p = softmax(z) and y the target:
    dL/dz_j = g_logp · (1[j = y] − p_j) − g_entropy · p_j · (log p_j + entropy)
and, since z = (h Wᵀ + b) / τ, dh = (dz/τ) @ W, dW += (dz/τ)ᵀ @ h, db += Σ_rows dz/τ, accumulated in fp32.
"""
from __future__ import annotations

import torch

from .forward_sweep import logits_tile, rows_per_tile


def logit_grad_(log_p: torch.Tensor, p: torch.Tensor, targets, g_logp, g_entropy, entropy) -> torch.Tensor:
    """In place on p: returns dL/dz [n, V] (log_p is clobbered when the entropy term is present)."""
    if g_entropy is not None:
        log_p.add_(entropy[:, None]).mul_(p).mul_(-g_entropy[:, None])  # −g_H · p · (log p + H)
    p.mul_(-g_logp[:, None])
    if g_entropy is not None:
        p.add_(log_p)
    p.scatter_add_(1, targets[:, None].long(), g_logp[:, None])  # + g at the target
    return p


def accumulate_grads(dz, hidden, weight, grad_hidden, grad_weight, grad_bias) -> None:
    """dz [n, V] fp32 (already divided by τ) -> writes grad_hidden [n, H], adds into grad_weight, grad_bias."""
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


def grad_sweep(hidden, weight, targets, bias, temperature, lse, g_logp, g_entropy, logp, entropy,
               need_hidden_grad, need_weight_grad, need_bias_grad):
    """See kernels/README.md. Returns (grad_hidden [N, H], grad_weight [V, H], grad_bias [V]) in fp32 or None."""
    n_rows, vocab = hidden.shape[0], weight.shape[0]
    dh, dw, db = allocate_grads(hidden, weight, need_hidden_grad, need_weight_grad, need_bias_grad)
    g_logp = g_logp.float() / temperature
    g_entropy = None if g_entropy is None else g_entropy.float() / temperature
    rows = rows_per_tile(n_rows, vocab)
    z_buf, p_buf = (torch.empty(rows, vocab, dtype=torch.float32, device=hidden.device) for _ in range(2))
    for s in range(0, n_rows, rows):
        e = min(s + rows, n_rows)
        z = logits_tile(hidden[s:e], weight, bias, temperature, z_buf[: e - s])  # [n, V]
        z.sub_(lse[s:e, None])  # log p
        p = torch.exp(z, out=p_buf[: e - s])
        ent = None if g_entropy is None else entropy[s:e]
        dz = logit_grad_(z, p, targets[s:e], g_logp[s:e], None if ent is None else g_entropy[s:e], ent)
        accumulate_grads(dz, hidden[s:e], weight, None if dh is None else dh[s:e], dw, db)
    return dh, dw, db
