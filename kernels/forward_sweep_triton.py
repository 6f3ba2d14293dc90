"""Phase 1 in Triton: one sweep over the vocabulary giving the split lse (row max m, log Σ exp(z − m)), the target
logprob and (optionally) the entropy.

Each program owns BLOCK_N rows of `hidden`. It walks the vocabulary in tiles of BLOCK_V; for each tile it forms
z = (h Wᵀ + b) / τ (or the logits of a LogitTransform: scales, tanh softcap) as a [BLOCK_N, BLOCK_V] fp32 tile by
looping over H in chunks of BLOCK_H (`tl.dot`, tensor cores, fp32 accumulator), then folds the tile into a running
max / sum-exp (online log-sum-exp), picks the target logit if it falls in the tile, and, when asked, keeps a
running Σ exp(z − max)·(z − max) for the entropy
(entropy = log Σ exp(z − max) − Σ exp(z − max)·(z − max) / Σ exp(z − max): both terms ≥ 0, so unlike
lse − Σ p·z it does not cancel when the logits are large). Nothing of size N×V is ever written.

Numerics: operands enter `tl.dot` in the input dtype (bf16/fp16 products are exact in fp32) and accumulate in
fp32; every other quantity is fp32. fp32 inputs use IEEE fp32 dots (FMA units, smaller tiles) unless torch allows
TF32 (`torch.get_float32_matmul_precision() != "highest"`, then tensor cores), as cut-cross-entropy does.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl


@dataclass(frozen=True)
class SweepConfig:
    """Tile sizes and launch settings of one sweep kernel (shared with `report.py`, which compiles them)."""

    block_n: int
    block_v: int
    block_h: int
    num_warps: int
    num_stages: int


# BLOCK_N 64, BLOCK_V 128, 8 warps (256 threads): the fp32 z tile is 64·128 / 256 = 32 registers per thread, plus
# the exp tile and 4 running row vectors: ~180 registers on sm_80, ~145 on sm_90, 0 spills. 128×128 also compiles
# without spills but at the 255-register ceiling (no headroom for the bias/entropy variants); 128×256 spills.
# BLOCK_H 64: one pipeline stage holds (64 + 128)·64 bf16 = 24 KiB of operands; 3 stages ≈ 48-73 KiB, within
# sm_80's 164 KiB and sm_90's 227 KiB. W (V·H·2 bytes) is streamed N/64 times, from L2 when rows blocks run together.
FORWARD_CONFIG = SweepConfig(block_n=64, block_v=128, block_h=64, num_warps=8, num_stages=3)
# fp32 inputs under torch's default "highest" matmul precision take IEEE fp32 dots: FMA units, no tensor cores, and
# the operand fragments live in registers. The tiles above then spilled 792 bytes on sm_80; 64×64 tiles over
# 32-wide H chunks (64·64 / 256 = 16 accumulator registers per thread) compile to ≤ 242 registers, 0 spills.
FORWARD_CONFIG_FP32_IEEE = SweepConfig(block_n=64, block_v=64, block_h=32, num_warps=8, num_stages=2)


def forward_config(dtype: torch.dtype, precision: str) -> SweepConfig:
    """The forward sweep's tiles for these inputs (`precision` from `dot_settings`)."""
    return FORWARD_CONFIG_FP32_IEEE if dtype == torch.float32 and precision == "ieee" else FORWARD_CONFIG


def interpreting() -> bool:
    """True under TRITON_INTERPRET=1, whose tl.dot reads bf16 operands as raw bit patterns (wrong results)."""
    return bool(triton.knobs.runtime.interpret)


def dot_settings(dtype: torch.dtype) -> tuple[bool, str]:
    """(DOT_FP32, DOT_PRECISION): upcast dot operands only where the interpreter needs it; TF32 only if allowed."""
    dot_fp32 = interpreting() and dtype == torch.bfloat16
    precision = "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"
    return dot_fp32, precision


@triton.jit
def tanh(x):
    """tanh from one exp (no tanh in triton.language): sign(x)·(1 − e)/(1 + e), e = exp(−2|x|) ≤ 1, never
    overflowing; absolute error ~1e-7 (the cancellation in 1 − e near 0 is absolute, not relative)."""
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def logit_tile(p_h, p_w, p_b, o_n, m_n, o_v, m_v, H, stride_hn, stride_wv, z_scale, bias_scale, cap_scale,
               HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr):
    """The logits of a LogitTransform for rows o_n and vocab columns o_v: [BLOCK_N, BLOCK_V] fp32, −inf in
    columns ≥ V. u = z_scale·h Wᵀ + bias_scale·b (its gemm_scale, bias_scale), then z = cap_scale·tanh(u) when
    SOFTCAP, else z = u (1/τ already inside the scales)."""
    b_acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        o_h = h0 + tl.arange(0, BLOCK_H).to(tl.int64)
        m_h = o_h < H
        # [BN, BH]
        b_h = tl.load(p_h + o_n[:, None] * stride_hn + o_h[None, :], mask=m_n[:, None] & m_h[None, :], other=0.0)
        # [BV, BH]
        b_w = tl.load(p_w + o_v[:, None] * stride_wv + o_h[None, :], mask=m_v[:, None] & m_h[None, :], other=0.0)
        if DOT_FP32:
            b_h = b_h.to(tl.float32)
            b_w = b_w.to(tl.float32)
        # [BN, BH] @ [BH, BV] -> [BN, BV]
        b_acc = tl.dot(b_h, tl.trans(b_w), b_acc, input_precision=DOT_PRECISION)
    b_z = b_acc * z_scale
    if HAS_BIAS:
        # [BV]
        b_bias = tl.load(p_b + o_v, mask=m_v, other=0.0).to(tl.float32)
        b_z += b_bias[None, :] * bias_scale
    if SOFTCAP:
        b_z = tanh(b_z) * cap_scale
    return tl.where(m_v[None, :], b_z, float("-inf"))


def logit_scalars(t) -> tuple[float, float, float]:
    """(z_scale, bias_scale, cap_scale) of a LogitTransform, as `logit_tile` takes them."""
    return t.gemm_scale, t.bias_scale, t.cap_scale if t.softcap is not None else 1.0


@triton.jit
def _forward_sweep_kernel(p_h, p_w, p_b, p_y, p_lse, p_logp, p_ent, N, H, V, stride_hn, stride_wv, z_scale,
                          bias_scale, cap_scale, HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr,
                          WITH_ENTROPY: tl.constexpr, DOT_FP32: tl.constexpr,
                          DOT_PRECISION: tl.constexpr,
                          BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr):
    i_n = tl.program_id(0)
    o_n = i_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_n = o_n < N
    # [BN]
    b_y = tl.load(p_y + o_n, mask=m_n, other=-1)
    b_max = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    b_sum = tl.zeros((BLOCK_N,), dtype=tl.float32)  # Σ exp(z − max)
    b_q = tl.zeros((BLOCK_N,), dtype=tl.float32)  # Σ exp(z − max)·(z − max) ≤ 0, for the entropy
    b_target = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for v0 in range(0, V, BLOCK_V):
        o_v = v0 + tl.arange(0, BLOCK_V).to(tl.int64)
        m_v = o_v < V
        # [BN, BV]
        b_z = logit_tile(p_h, p_w, p_b, o_n, m_n, o_v, m_v, H, stride_hn, stride_wv, z_scale, bias_scale, cap_scale,
                         HAS_BIAS, SOFTCAP, DOT_FP32, DOT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_H)
        b_new = tl.maximum(b_max, tl.max(b_z, axis=1))  # finite: every tile has at least one column < V
        b_scale = tl.exp(b_max - b_new)
        b_e = tl.exp(b_z - b_new[:, None])  # 0 in columns ≥ V
        if WITH_ENTROPY:
            # rebase Σ e·(z − max) onto the new max: e scales by b_scale, (z − max) shifts by (old − new)
            b_shift = tl.where(b_sum > 0, b_max - b_new, 0.0)
            b_zc = tl.where(m_v[None, :], b_z - b_new[:, None], 0.0)  # [BN, BV] z − max, 0 in columns ≥ V
            b_q = (b_q + b_sum * b_shift) * b_scale + tl.sum(b_e * b_zc, axis=1)
        b_sum = b_sum * b_scale + tl.sum(b_e, axis=1)
        b_target += tl.sum(tl.where(o_v[None, :] == b_y[:, None], b_z, 0.0), axis=1)
        b_max = b_new
    # lse as two fp32 numbers (README's contract): m at p_lse[0, n], s = log Σ exp(z − m) at p_lse[1, n]. One lse
    # ≈ 70 on a peaked row would round at ulp(70) ≈ 7.6e-6, and the gradient's 1 − p_y would carry it
    tl.store(p_lse + o_n, b_max, mask=m_n)
    tl.store(p_lse + N + o_n, tl.log(b_sum), mask=m_n)
    # (z_y − max) − log Σe, not z_y − lse: z_y and max are both large when the row is peaked, and their
    # difference is exact only before log Σe is added (the same order PyTorch's log_softmax uses)
    tl.store(p_logp + o_n, (b_target - b_max) - tl.log(b_sum), mask=m_n)
    if WITH_ENTROPY:
        # −Σ p·log p with log p = (z − max) − log Σe: two non-negative terms, no cancellation for large |z|
        tl.store(p_ent + o_n, tl.log(b_sum) - b_q / b_sum, mask=m_n)


def forward_sweep(hidden, weight, targets, bias, logits, with_entropy):
    """lse [2, N] (row max m, s = log Σ exp(z − m)), logp [N] (and entropy [N] or None), all fp32, from
    hidden [N, H], weight [V, H], targets [N] and `logits` (a LogitTransform)."""
    hidden, weight = hidden.contiguous(), weight.contiguous()
    n, h = hidden.shape
    v = weight.shape[0]
    dot_fp32, precision = dot_settings(hidden.dtype)
    cfg = forward_config(hidden.dtype, precision)
    lse = torch.empty(2, n, dtype=torch.float32, device=hidden.device)
    logp = torch.empty(n, dtype=torch.float32, device=hidden.device)
    entropy = torch.empty(n, dtype=torch.float32, device=hidden.device) if with_entropy else None
    if n == 0:
        return lse, logp, entropy
    grid = (triton.cdiv(n, cfg.block_n),)
    _forward_sweep_kernel[grid](
        hidden, weight, bias.contiguous() if bias is not None else hidden, targets.contiguous(), lse, logp,
        entropy if with_entropy else logp, n, h, v, hidden.stride(0), weight.stride(0), *logit_scalars(logits),
        HAS_BIAS=bias is not None, SOFTCAP=logits.softcap is not None, WITH_ENTROPY=with_entropy,
        DOT_FP32=dot_fp32, DOT_PRECISION=precision,
        BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_H=cfg.block_h,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return lse, logp, entropy
