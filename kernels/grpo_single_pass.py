"""The PyTorch path's fusion of all three phases into one sweep, for token-local losses.

When every token's dL/dlogp depends only on that token (token-level importance sampling, no entropy quantile:
the trainer's usual case), the loss gradient can be formed as soon as a row tile's softmax is known. So each tile
computes its logits once and goes straight on to dz, dh and dW: 6·N·H·V matmul flops instead of the 8·N·H·V of
forward sweep + gradient sweep, and the tile's logits never leave cache between the two. Sequence-level ratios
and entropy quantiles need the whole batch first; they take the three-phase path in `grpo_loss.py`.
"""
from __future__ import annotations

import torch

from .forward_sweep import logits_tile, row_entropy_, rows_per_tile, softmax_tile
from .grad_sweep import accumulate_grads, allocate_grads, logit_grad_
from .grpo_epilogue import finish_metrics, objective_terms, token_weights
from .params import GRPOLossParams


def _flat_token_inputs(mask, advantages, old_logp, ref_logp, is_ratio, p: GRPOLossParams):
    """[B, T] / [B] inputs -> per-token [N] fp32 tensors (None stays None)."""
    length = mask.shape[1]
    flat = {"mask": mask.float().reshape(-1), "w": token_weights(mask, p).reshape(-1),
            "adv": advantages.float().repeat_interleave(length)}
    flat["old"] = None if old_logp is None else old_logp.float().reshape(-1)
    flat["ref"] = None if ref_logp is None else ref_logp.float().reshape(-1)
    if is_ratio is not None:
        flat["isr"] = is_ratio.float().expand(mask.shape).reshape(-1)
    else:
        flat["isr"] = None
    return flat


def _tile_loss(logp_tile, sl, flat, p: GRPOLossParams, want_grad: bool):
    """Loss sum, metric sums and dL/dlogp for one row tile (autograd over O(n) elementwise ops)."""
    tile = {k: None if v is None else v[sl] for k, v in flat.items()}
    with torch.set_grad_enabled(want_grad):  # grad mode is off inside autograd.Function.forward
        leaf = logp_tile.detach().requires_grad_(want_grad)
        old = leaf.detach() if tile["old"] is None else tile["old"]
        loss, sums = objective_terms(leaf, leaf - old, tile["adv"], tile["ref"], tile["isr"], None, tile["w"],
                                     tile["mask"], p)
        g = torch.autograd.grad(loss, leaf)[0] if want_grad else None
    return loss.detach(), sums, g


def grpo_single_pass(hidden, weight, targets, bias, mask, advantages, old_logp, ref_logp, is_ratio,
                     p: GRPOLossParams, need_hidden_grad, need_weight_grad, need_bias_grad):
    """hidden [N, H] (N = B·T), targets [N], mask [B, T] -> (loss, metrics, grad_hidden, grad_weight, grad_bias)."""
    n_rows, vocab = hidden.shape[0], weight.shape[0]
    flat = _flat_token_inputs(mask, advantages, old_logp, ref_logp, is_ratio, p)
    want_grad = need_hidden_grad or need_weight_grad or need_bias_grad
    dh, dw, db = allocate_grads(hidden, weight, need_hidden_grad, need_weight_grad, need_bias_grad)
    loss, totals, entropy_sum = torch.zeros((), dtype=torch.float32), {}, torch.zeros(())
    rows = rows_per_tile(n_rows, vocab)
    z_buf, p_buf = (torch.empty(rows, vocab, dtype=torch.float32, device=hidden.device) for _ in range(2))
    for s in range(0, n_rows, rows):
        sl = slice(s, min(s + rows, n_rows))
        z = logits_tile(hidden[sl], weight, bias, p.temperature, z_buf[: sl.stop - s])  # [n, V]
        prob = p_buf[: sl.stop - s]
        lse, logp = softmax_tile(z, targets[sl], prob)
        entropy_sum = entropy_sum + (row_entropy_(z, lse, prob) * flat["mask"][sl]).sum()  # z is spent after
        tile_loss, sums, g = _tile_loss(logp, sl, flat, p, want_grad)
        loss = loss + tile_loss
        for k, v in sums.items():
            totals[k] = totals.get(k, 0.0) + v
        if want_grad:
            dz = logit_grad_(None, prob, targets[sl], g / p.temperature, None, None)
            accumulate_grads(dz, hidden[sl], weight, None if dh is None else dh[sl], dw, db)
    metrics = finish_metrics(totals, float(mask.sum()), mask.shape[0], False, entropy_sum)
    return loss, metrics, dh, dw, db
