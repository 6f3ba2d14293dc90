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
