"""Phase 1 in PyTorch: per-row log-sum-exp, target logprob and entropy, over bounded row blocks.

On a CPU the best tile is a block of rows times the whole vocabulary: a GEMM of [n, H] @ [H, V] runs near the
machine's peak when V is long, the block's logits stay in cache for the softmax passes, and nothing is computed
twice. The block height n is chosen so a block holds about `TILE_ELEMENTS` logits, so memory does not grow with N
(it grows with V only once n reaches its floor of 16 rows).
"""
from __future__ import annotations

import torch

# 2^21 fp32 logits = 8 MiB per tile buffer: at V = 32768 that is 64 rows, a GEMM tall enough to run at full rate
# on a CPU core, and two such buffers (logits, probabilities) stay well under the 80 MiB working-memory goal.
TILE_ELEMENTS = 1 << 21
MIN_ROWS = 16


def rows_per_tile(n_rows: int, vocab: int) -> int:
    rows = max(MIN_ROWS, (TILE_ELEMENTS // vocab) // MIN_ROWS * MIN_ROWS)
    return min(rows, max(n_rows, 1))


def logits_tile(hidden: torch.Tensor, weight: torch.Tensor, bias, temperature: float) -> torch.Tensor:
    """[n, H] @ [H, V] (+ b) / τ -> [n, V] float32. The GEMM runs in the input dtype, the result is fp32."""
    z = hidden @ weight.T if bias is None else torch.addmm(bias, hidden, weight.T)
    z = z.float()
    if temperature != 1.0:
        z.div_(temperature)
    return z


def softmax_stats_(z: torch.Tensor, p_out: torch.Tensor):
    """In place: z [n, V] becomes log p; p_out gets p. Returns lse [n] (of the original z)."""
    m = z.amax(dim=1, keepdim=True)  # [n, 1]
    z.sub_(m)
    torch.exp(z, out=p_out)
    log_s = p_out.sum(dim=1, keepdim=True).log_()  # [n, 1]
    z.sub_(log_s)  # log p
    p_out.mul_(torch.exp(-log_s))  # p
    return (m + log_s).squeeze(1)


def row_entropy_(p: torch.Tensor, log_p: torch.Tensor) -> torch.Tensor:
    """−Σ_j p_j log p_j per row, overwriting log_p (no [n, V] temporary). torch.sum's cascaded summation keeps
    the fp32 error as small as PyTorch's own path; a dot-product kernel here was ~10× less accurate at V = 40k."""
    return log_p.mul_(p).sum(dim=1).neg_()


def forward_sweep(hidden, weight, targets, bias, temperature: float, with_entropy: bool):
    """hidden [N, H], weight [V, H], targets [N] -> lse [N], logp [N], entropy [N] | None (all fp32)."""
    n_rows, vocab = hidden.shape[0], weight.shape[0]
    lse = torch.empty(n_rows, dtype=torch.float32, device=hidden.device)
    logp = torch.empty_like(lse)
    entropy = torch.empty_like(lse) if with_entropy else None
    rows = rows_per_tile(n_rows, vocab)
    p_buf = torch.empty(rows, vocab, dtype=torch.float32, device=hidden.device)
    for s in range(0, n_rows, rows):
        e = min(s + rows, n_rows)
        z = logits_tile(hidden[s:e], weight, bias, temperature)  # [n, V]
        p = p_buf[: e - s]
        lse[s:e] = softmax_stats_(z, p)
        logp[s:e] = z.gather(1, targets[s:e, None].long()).squeeze(1)
        if with_entropy:
            entropy[s:e] = row_entropy_(p, z)  # z is not needed after the gather
    return lse, logp, entropy
