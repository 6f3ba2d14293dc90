"""The PyTorch path's fusion of all three phases into one sweep, for token-local losses.

When every token's dL/dlogp depends only on that token (token-level importance sampling, no entropy quantile:
the trainer's usual case), the loss gradient can be formed as soon as a row tile's softmax is known. So each tile
computes its logits once and goes straight on to dz, dh and dW: 6·N·H·V matmul flops instead of the 8·N·H·V of
forward sweep + gradient sweep, and the tile's logits never leave cache between the two. Sequence-level ratios
and entropy quantiles need the whole batch first; they take the three-phase path in `grpo_loss.py`.

fp32 inputs (the CPU case) take `_fp32_tile_softmax` and `grad_sweep.lean_tile_grads`: one [n, V] buffer, no elementwise
pass over it besides the softmax (see the comment above them). Other dtypes and softcapped logits (whose dz has
the factor 1 − tanh² per element) keep the dz route (logits copied to
fp32, dz formed in fp32 and rounded once to the input dtype for the GEMMs), whose low-precision error is tested
against PyTorch's own at that dtype; the fp32 route's W_y − q would cancel in bf16.
"""
from __future__ import annotations

import torch

from .forward_sweep import (_TINY, ONE_BUFFER_TILE_ELEMENTS, TILE_ELEMENTS, logits_tile, row_entropy_,
                            rows_per_tile, softcap_derivative, softmax_tile, whole_rows_fit,
                            chunk_shape)
from .grad_sweep import accumulate_grads, allocate_grads, lean_tile_grads, logit_grad_
from .grpo_epilogue import Sequences, finish_metrics, flag_sums, objective_terms, row_is_ratio, token_weights
from .params import GRPOLossParams, LogitTransform


def single_pass_fits(hidden, weight, t: LogitTransform) -> bool:
    """Whether the single pass's whole-vocabulary tiles are tall enough for its GEMMs (forward_sweep.GEMM_ROWS);
    at a large vocabulary (Qwen2.5's 151936) the three phases over vocabulary chunks are faster despite the
    second logits GEMM (bench/bench_sweep_tiles.py)."""
    lean = hidden.dtype == torch.float32 and t.softcap is None
    return whole_rows_fit(hidden.shape[0], weight.shape[0], ONE_BUFFER_TILE_ELEMENTS if lean else TILE_ELEMENTS)


def loss_tile_elements(n_rows: int, vocab: int, fp32: bool) -> int:
    """fp32 logits-tile elements the torch path's fused loss holds at once (no softcap): the single pass's
    whole-vocabulary tiles (one buffer in fp32, two for 16-bit inputs), else the chunked sweeps' two buffers."""
    elements = ONE_BUFFER_TILE_ELEMENTS if fp32 else TILE_ELEMENTS
    if whole_rows_fit(n_rows, vocab, elements):
        return rows_per_tile(n_rows, vocab, elements) * vocab * (1 if fp32 else 2)
    rows, cols = chunk_shape(n_rows, vocab)
    return 2 * rows * cols


def _row_inputs(mask, advantages, old_logp, ref_logp, is_ratio, seqs: Sequences, p: GRPOLossParams):
    """Per-row [N] fp32 inputs of the loss (None stays None): mask, weight, advantage, old/ref logprobs, is_ratio."""
    rows = {"mask": mask.float(), "w": token_weights(mask, seqs, p), "adv": advantages.float()[seqs.index],
            "old": old_logp, "ref": ref_logp, "isr": row_is_ratio(is_ratio, seqs)}
    return {k: None if v is None else v.float() for k, v in rows.items()}


def _tile_loss(logp_tile, sl, flat, p: GRPOLossParams, want_grad: bool):
    """Loss sum, metric sums and dL/dlogp for one row tile (autograd over O(n) elementwise ops)."""
    tile = {k: None if v is None else v[sl] for k, v in flat.items()}
    with torch.set_grad_enabled(want_grad):  # grad mode is off inside autograd.Function.forward
        leaf = logp_tile.detach().requires_grad_(want_grad)
        old = leaf.detach() if tile["old"] is None else tile["old"]
        loss, sums = objective_terms(leaf, leaf - old, tile["adv"], tile["ref"], tile["isr"], None, tile["w"],
                                     tile["mask"], p)
        g = torch.autograd.grad(loss, leaf)[0] if want_grad else None
    sums.update(flag_sums(torch.exp(logp_tile - old), tile["adv"], tile["mask"], p))
    return loss.detach(), sums, g


def grpo_single_pass(hidden, weight, targets, bias, mask, advantages, old_logp, ref_logp, is_ratio,
                     p: GRPOLossParams, need_hidden_grad, need_weight_grad, need_bias_grad, cu_seqlens):
    """hidden [N, H] packed rows (sequence b at cu_seqlens[b]:cu_seqlens[b+1]), targets, mask, old/ref logprobs
    [N], is_ratio [N] or [B, 1], advantages [B] -> (loss, metrics, grad_hidden, grad_weight, grad_bias)."""
    n_rows, vocab = hidden.shape[0], weight.shape[0]
    t = p.logits
    seqs = Sequences.from_cu_seqlens(cu_seqlens, n_rows)
    flat = _row_inputs(mask, advantages, old_logp, ref_logp, is_ratio, seqs, p)
    want_grad = need_hidden_grad or need_weight_grad or need_bias_grad
    lean = hidden.dtype == torch.float32 and t.softcap is None
    dh, dw, db = allocate_grads(hidden, weight, need_hidden_grad, need_weight_grad, need_bias_grad,
                                zero_weight=not lean or n_rows == 0)  # lean: the first tile's GEMM writes dW
    loss, totals, entropy_sum = torch.zeros((), dtype=torch.float32), {}, torch.zeros(())
    rows = rows_per_tile(n_rows, vocab, ONE_BUFFER_TILE_ELEMENTS if lean else TILE_ELEMENTS)
    bufs = 1 if lean else 2 + (t.softcap is not None and want_grad)
    z_buf, p_buf, cap_buf = [torch.empty(rows, vocab, dtype=torch.float32, device=hidden.device)
                             for _ in range(bufs)] + [None] * (3 - bufs)
    for s in range(0, n_rows, rows):
        sl = slice(s, min(s + rows, n_rows))
        h_t, y_t, n = hidden[sl], targets[sl], sl.stop - s
        cap = None
        if lean:
            prob, q, logp, entropy = _fp32_tile_softmax(h_t, weight, y_t, bias, t, z_buf[:n])
        else:
            z = logits_tile(h_t, weight, bias, t, z_buf[:n])  # [n, V]
            cap = None if cap_buf is None else softcap_derivative(z, t, cap_buf[:n])  # [n, V]
            prob = p_buf[:n]
            row_max, log_sum, logp = softmax_tile(z, y_t, prob)
            entropy = row_entropy_(z, row_max, log_sum, prob)  # z is spent after
        entropy_sum = entropy_sum + (entropy * flat["mask"][sl]).sum()
        tile_loss, sums, g = _tile_loss(logp, sl, flat, p, want_grad)
        loss = loss + tile_loss
        for k, v in sums.items():
            totals[k] = totals.get(k, 0.0) + v
        if not want_grad:
            continue
        grads = (None if dh is None else dh[sl], dw, db)
        if lean:
            lean_tile_grads(prob, h_t, weight, y_t, g * t.grad_scale, *grads, first=s == 0, q=q)
        else:
            dz = logit_grad_(None, prob, y_t, g * t.grad_scale, None, None)
            accumulate_grads(dz if cap is None else dz.mul_(cap), h_t, weight, *grads)
    t.bias_grad_(db)
    metrics = finish_metrics(totals, flat["mask"].sum(), seqs.count, False, entropy_sum)
    return loss, metrics, dh, dw, db


# fp32 row tiles. One [n, V] buffer: the logits GEMM writes it, softmax turns it into p in place, and the two
# gradient GEMMs read p. Nothing else touches [n, V], because everything the loss needs besides p comes from
# O(n·H) products with q = p @ W [n, H]:
#   z_y   = (h · W_y + b_y) / τ                        (gathered from the tile before the softmax)
#   H     = lse − Σ_j p_j z_j = lse − (h · q + p · b) / τ
#   dh    = Σ_j dz_j W_j / τ = g · (W_y − q) / τ        with dz = g · (onehot(y) − p)
#   dW   += dzᵀ h / τ = pᵀ (−g·h/τ) + onehot(y)ᵀ (g·h/τ)   (a GEMM plus an index_add of n rows)
# (written for z = (h·Wᵀ + b)/τ; a LogitTransform without softcap only changes the scalars: 1/τ on h·Wᵀ becomes
# gemm_scale = grad_scale, on b bias_scale)
# so the tile costs three GEMMs (2·n·H·V flops each) and the three passes of ATen's fused softmax, with no
# [n, V] elementwise pass for the entropy or for dz. Tile height: forward_sweep.ONE_BUFFER_TILE_ELEMENTS.


def _fp32_tile_softmax(h, weight, targets, bias, t: LogitTransform, buf):
    """h [n, H] fp32 -> (p [n, V] in buf, q = p @ W [n, H], logp [n], entropy [n]); t without a softcap, so
    z = gemm_scale·(h·Wᵀ) + bias_scale·b is linear in h."""
    z = logits_tile(h, weight, bias, t, buf)  # [n, H] @ [H, V] -> [n, V], the factors inside the GEMM
    idx = targets[:, None].long()
    z_y = z.gather(1, idx).squeeze(1)  # [n]
    prob = torch.ops.aten._softmax.out(z, 1, False, out=z)  # in place, row by row: z is spent, buf holds p
    p_y = prob.gather(1, idx).squeeze(1)
    # logp = log p_y straight from the softmax (error ~1e-7), not z_y − lse: lse ≈ 70 on peaked rows would round
    # at ulp(70) ≈ 7.6e-6 in between
    logp = torch.log(p_y)
    tiny = p_y < _TINY
    if tiny.any():  # rare: recompute those rows' logits, logp = (z_y − m) − log Σ exp(z − m) directly
        rows_z = logits_tile(h[tiny], weight, bias, t, torch.empty(int(tiny.sum()), weight.shape[0], device=h.device))
        m = rows_z.max(dim=1).values
        logp[tiny] = (z_y[tiny] - m) - torch.logsumexp(rows_z - m[:, None], dim=1)
    lse = z_y - logp
    q = prob @ weight  # [n, V] @ [V, H] -> [n, H]
    pz = (h * q).sum(dim=1) * t.gemm_scale  # Σ_j p_j z_j without the bias, [n]
    if bias is not None:
        pz += (prob @ bias) * t.bias_scale  # [n, V] @ [V] -> [n]
    # lse − Σ p·z cancels on a peaked row (both ≈ the top logit): its fp32 rounding can dip below 0 (−4.6e-5
    # measured at |z| ≈ 100), where the entropy is ≥ 0 by definition
    return prob, q, logp, (lse - pz).clamp_(min=0.0)
