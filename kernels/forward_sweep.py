"""Phase 1 in PyTorch: per-row log-sum-exp, target logprob and entropy, over bounded row blocks.

On a CPU the best tile is a block of rows times the whole vocabulary: a GEMM of [n, H] @ [H, V] runs near the
machine's peak when V is long, the block's logits stay in cache for the softmax passes, and nothing is computed
twice. The block height n is chosen so a block holds about `TILE_ELEMENTS` logits, so memory does not grow with N
(it grows with V only once n reaches its floor of 16 rows).
"""
from __future__ import annotations

import torch

from .params import LogitTransform

# 2^21 fp32 logits = 8 MiB per tile buffer: at V = 32768 that is 64 rows, a GEMM tall enough to run at full rate
# on a CPU core, and two such buffers (logits, probabilities) stay well under the 80 MiB working-memory goal.
TILE_ELEMENTS = 1 << 21
# Paths that hold one [n, V] buffer (the fp32 single pass, the fp32 gradient sweep without an entropy term) take
# 2^23 logits = 32 MiB, 256 rows at V = 32768. Their dW GEMM's inner dimension is the tile height: at 64 rows it
# ran ~10% below torch.mm's rate for [2048, 256] @ [256, 32768], at 128-256 rows within ~3% (one thread); with
# two threads on a shared machine the whole headline step was 15-35% faster at 256 rows than at 128 (best of
# 9-11 interleaved runs, three runs). Memory: 32 MiB + dW 32 MiB + dh 2 MiB = ~66 MiB above the inputs at
# H = 256, V = 32768 (measured), under the 80 MiB goal; the tile is bounded in elements, so it stays flat in V.
ONE_BUFFER_TILE_ELEMENTS = 1 << 23
MIN_ROWS = 16


def rows_per_tile(n_rows: int, vocab: int, elements: int = TILE_ELEMENTS) -> int:
    rows = max(MIN_ROWS, (elements // vocab) // MIN_ROWS * MIN_ROWS)
    return min(rows, max(n_rows, 1))


# A whole-vocabulary tile is only as good as its height: the GEMM packs all of W again for every tile, so a short
# tile spends its time moving W. Measured at H 896, V 151936 (Qwen2.5), N 1024 rows, CPU seconds of the logits
# GEMMs alone (2 threads): [48 rows, V] tiles 18.5 s, [64, 32768] 16.2, [256, 8192] 9.2, [1024, 2048] 6.7, one
# [1024, V] GEMM 6.8 (/tmp script, commit 899ac1d). So once whole-vocabulary tiles would be shorter than GEMM_ROWS,
# the sweeps take blocks of up to BLOCK_ROWS rows times vocabulary chunks of the same element budget, with an
# online log-sum-exp across the chunks (as the Triton kernels tile the vocabulary).
GEMM_ROWS = 256
BLOCK_ROWS = 1024
MIN_COLS = 256


def whole_rows_fit(n_rows: int, vocab: int, elements: int) -> bool:
    """Whether whole-vocabulary tiles of `elements` logits hold min(n_rows, GEMM_ROWS) rows."""
    return rows_per_tile(n_rows, vocab, elements) >= min(n_rows, GEMM_ROWS)


def chunk_shape(n_rows: int, vocab: int) -> tuple[int, int]:
    """(rows, cols) of a vocabulary-chunk tile: up to BLOCK_ROWS rows times the columns TILE_ELEMENTS leaves."""
    rows = max(1, min(n_rows, BLOCK_ROWS))
    return rows, min(vocab, max(MIN_COLS, TILE_ELEMENTS // rows // MIN_COLS * MIN_COLS))


def sweep_tile_elements(n_rows: int, vocab: int) -> int:
    """fp32 logits-tile elements forward_sweep holds at once (two buffers): what `fastrl plan` counts."""
    if whole_rows_fit(n_rows, vocab, TILE_ELEMENTS):
        return 2 * rows_per_tile(n_rows, vocab) * vocab
    rows, cols = chunk_shape(n_rows, vocab)
    return 2 * rows * cols


# 16-bit inputs: W is upcast in chunks of this many elements (4 MiB fp32) for the logits GEMM (logits_tile).
WEIGHT_CHUNK_ELEMENTS = 1 << 20


def logits_tile(hidden: torch.Tensor, weight: torch.Tensor, bias, t: LogitTransform, out: torch.Tensor):
    """[n, H] @ [H, V] -> out [n, V] float32: the logits z of LogitTransform t (scales, softcap, 1/τ).

    The GEMM runs in fp32, writing straight into a reused buffer (a fresh 8 MiB tensor per tile costs page faults
    on every tile), with the scales and 1/τ as the GEMM's alpha/beta (no extra pass over the tile). 16-bit inputs
    are upcast first (h whole, W and b in chunks of WEIGHT_CHUNK_ELEMENTS): the logits are then never rounded to
    16 bits, as in the Triton sweep (fp32 accumulator), whereas a 16-bit GEMM's rounding of h·Wᵀ would be scaled
    by s_l/τ (error ~0.5% of |z| in bf16). A softcap adds one pass: tanh and its factor c/τ."""
    if hidden.dtype == torch.float32:
        _scaled_gemm(hidden, weight, bias, t, out)
    else:
        h32, chunk = hidden.float(), max(MIN_ROWS, WEIGHT_CHUNK_ELEMENTS // weight.shape[1])
        for v in range(0, weight.shape[0], chunk):
            cols = slice(v, v + chunk)
            _scaled_gemm(h32, weight[cols].float(), None if bias is None else bias[cols].float(), t, out[:, cols])
    if t.softcap is not None:
        out.tanh_().mul_(t.cap_scale)
    return out


def _scaled_gemm(hidden, weight, bias, t: LogitTransform, out):
    """fp32 [n, H] @ [H, V] -> out [n, V] = gemm_scale·h·Wᵀ + bias_scale·b."""
    alpha, beta = t.gemm_scale, t.bias_scale
    if bias is None and alpha == 1.0:
        torch.mm(hidden, weight.T, out=out)
    elif bias is None:
        torch.addmm(out, hidden, weight.T, beta=0.0, alpha=alpha, out=out)
    else:
        torch.addmm(bias, hidden, weight.T, beta=beta, alpha=alpha, out=out)


def softcap_derivative(z: torch.Tensor, t: LogitTransform, out: torch.Tensor) -> torch.Tensor:
    """z [n, V] (softcapped logits) -> out = 1 − tanh² = 1 − (z / cap_scale)², the elementwise factor of dz."""
    return torch.div(z, t.cap_scale, out=out).square_().neg_().add_(1.0)


# Below this probability the target's own probability cannot give its logprob accurately (fp32 underflows near
# 1e-38); grpo_single_pass recomputes those rows.
_TINY = 1e-30


def softmax_tile(z: torch.Tensor, targets: torch.Tensor, p_out: torch.Tensor):
    """z [n, V] fp32 (kept) -> p_out = softmax(z); returns the row max m [n], s = log Σ exp(z − m) [n] and the
    targets' logprobs (z_y − m) − s [n] (the split log-sum-exp of the README's contract).

    ATen's fused softmax (one max pass, one exp-and-sum pass, one scaling pass) is ~3× faster on a CPU than the
    same steps as separate tensor ops. It does not return its max and sum, so a read-only max pass over z finds m,
    and s = −log max_j p_j: the leading column's probability is exp(0)/Σ = 1/Σ (one rounding), so s keeps fp32
    precision of s itself (small on peaked rows, where a single lse ≈ 70 would carry ulp(70) ≈ 7.6e-6).
    """
    m = z.amax(dim=1)  # [n]
    torch.ops.aten._softmax.out(z, 1, False, out=p_out)
    s = p_out.amax(dim=1).log_().neg_()  # [n]
    z_y = z.gather(1, targets[:, None].long()).squeeze(1)
    return m, s, (z_y - m) - s


def row_entropy_(z: torch.Tensor, m: torch.Tensor, s: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """−Σ_j p_j log p_j = s − Σ_j p_j (z_j − m) per row, overwriting z with p·(z − m) (no [n, V] temporary).
    Both terms are ≥ 0 (no cancellation, unlike lse − Σ p·z), and torch.sum's cascaded summation keeps fp32
    error at PyTorch's own level (a batched dot product here was ~10× less accurate at V = 40k)."""
    return s - z.sub_(m[:, None]).mul_(p).sum(dim=1)


def forward_sweep(hidden, weight, targets, bias, logits: LogitTransform, with_entropy: bool):
    """hidden [N, H], weight [V, H], targets [N] -> lse [2, N] (row max m, log Σ exp(z − m)), logp [N],
    entropy [N] | None (all fp32). See kernels/README.md."""
    n_rows, vocab = hidden.shape[0], weight.shape[0]
    lse = torch.empty(2, n_rows, dtype=torch.float32, device=hidden.device)
    logp = torch.empty(n_rows, dtype=torch.float32, device=hidden.device)
    entropy = torch.empty_like(logp) if with_entropy else None
    if not whole_rows_fit(n_rows, vocab, TILE_ELEMENTS):
        chunked_forward_sweep(hidden, weight, targets, bias, logits, chunk_shape(n_rows, vocab), lse, logp, entropy)
        return lse, logp, entropy
    rows = rows_per_tile(n_rows, vocab)
    z_buf, p_buf = (torch.empty(rows, vocab, dtype=torch.float32, device=hidden.device) for _ in range(2))
    for s in range(0, n_rows, rows):
        e = min(s + rows, n_rows)
        z = logits_tile(hidden[s:e], weight, bias, logits, z_buf[: e - s])  # [n, V]
        p = p_buf[: e - s]
        lse[0, s:e], lse[1, s:e], logp[s:e] = softmax_tile(z, targets[s:e], p)
        if with_entropy:
            entropy[s:e] = row_entropy_(z, lse[0, s:e], lse[1, s:e], p)
    return lse, logp, entropy


def fp32_chunk(weight, bias, c: int, d: int):
    """Rows c:d of the head as fp32 (weight [d − c, H], bias [d − c] | None): a view when already fp32."""
    return weight[c:d].float(), None if bias is None else bias[c:d].float()


def chunked_forward_sweep(hidden, weight, targets, bias, t: LogitTransform, shape, lse, logp, entropy) -> None:
    """forward_sweep over [rows, cols] tiles (shape from chunk_shape), writing lse, logp, entropy.

    Per row, across the vocabulary chunks: the running max m, S = Σ exp(z − m) and, for the entropy,
    T = Σ exp(z − m)·(z − m) ≤ 0; a chunk that raises the max to m' rescales both by α = exp(m − m')
    (T' = α·(T + (m − m')·S)). At the end s = log S, logp = (z_y − m) − s and entropy = s − T/S (two terms ≥ 0)."""
    n_rows, vocab = hidden.shape[0], weight.shape[0]
    rows, cols = shape
    z_buf = torch.empty(rows, cols, dtype=torch.float32, device=hidden.device)
    e_buf = torch.empty_like(z_buf) if entropy is not None else None
    for a in range(0, n_rows, rows):
        b = min(a + rows, n_rows)
        h32, y = hidden[a:b].float(), targets[a:b].long()  # [n, H] upcast once per block, [n]
        z_y = torch.empty(b - a, dtype=torch.float32, device=hidden.device)  # the targets' logits
        m = big_s = big_t = None
        for c in range(0, vocab, cols):
            d = min(c + cols, vocab)
            z = logits_tile(h32, *fp32_chunk(weight, bias, c, d), t, z_buf[: b - a, : d - c])
            hit = ((y >= c) & (y < d)).nonzero().squeeze(1)  # rows whose target is in this chunk
            z_y[hit] = z[hit, y[hit] - c]
            m_new = z.amax(dim=1) if m is None else torch.maximum(m, z.amax(dim=1))  # [n]
            z.sub_(m_new[:, None])  # z − m'
            if e_buf is None:
                s_c, t_c = z.exp_().sum(dim=1), None
            else:
                ex = torch.exp(z, out=e_buf[: b - a, : d - c])
                s_c, t_c = ex.sum(dim=1), z.mul_(ex).sum(dim=1)
            if m is None:
                big_s, big_t = s_c, t_c
            else:
                alpha = torch.exp(m - m_new)
                if t_c is not None:
                    big_t = alpha * (big_t + (m - m_new) * big_s) + t_c
                big_s = alpha * big_s + s_c
            m = m_new
        s = big_s.log()
        lse[0, a:b], lse[1, a:b], logp[a:b] = m, s, (z_y - m) - s
        if entropy is not None:
            entropy[a:b] = s - big_t / big_s
