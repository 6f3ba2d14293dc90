"""Phase 3 in Triton: the gradient sweep, dh, dW and db from dL/dlogp (and dL/dentropy) without the logits.

A 2-D grid: program (i_n, i_v) owns rows [i_n·BLOCK_N, +BLOCK_N) and vocab columns [i_v·BLOCK_V, +BLOCK_V).
It recomputes its z tile (the same `logit_tile` as the forward sweep), forms
    p  = exp((z − m) − s)                 # m, s = lse[0], lse[1]: row max and log Σ exp(z − m)
    dz = [g_logp·(1[j = y] − p) − g_entropy·p·(log p + entropy)] / τ        # [BLOCK_N, BLOCK_V], fp32
(with a LogitTransform: times its grad_scale instead of 1/τ, and by 1 − (z / cap_scale)² with a softcap)
once, then walks H in chunks of BLOCK_H and adds its share into the fp32 outputs with `tl.atomic_add`:
    dh[rows, chunk] += dz @ W[cols, chunk]        dW[cols, chunk] += dzᵀ @ h[rows, chunk]        db[cols] += Σ_rows dz
Constexpr flags drop the dh, dW or db work entirely when that gradient is not needed (a frozen or LoRA-wrapped
lm_head needs no dW: that half of the matmul work disappears) and the entropy term when g_entropy is None.

Determinism: every output element receives one atomic add per program along the other grid axis (dh from each
vocab block, dW from each row block). On a GPU those adds land in an unspecified order, so dh, dW and db can
differ between runs in the last bits of fp32 (relative ~1e-7 per addition; the accumulation is always fp32).
`deterministic=True` trades speed for bit-identical runs: two ordered sweeps, one program per row block owning its
dh rows (vocab tiles added in order) and one per vocab block owning its dW rows and db (row blocks added in order),
plain loads and stores instead of atomics. Each recomputes dz, so the z product runs twice: 10·N·H·V matmul flops
instead of 8, and each sweep has fewer, longer programs (N/64 and V/128 of them).

Numerics: dz is rounded to the input dtype before the two products (tensor cores take bf16/fp16 operands, as in
the materializing path whose logits' gradient is in the input dtype), products accumulate in fp32.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .forward_sweep_triton import SweepConfig, dot_settings, forward_config, logit_scalars, logit_tile

# BLOCK_N 64, BLOCK_V 128, 8 warps (256 threads): the fp32 z/dz tile is 64·128 / 256 = 32 registers per thread,
# and it stays live through the whole H loop (both products reuse it). BLOCK_H 32: the per-chunk fp32 results are
# dh 64·32 / 256 = 8 and dW 128·32 / 256 = 16 registers; with BLOCK_H 64 they double and sm_80 sits at the
# 255-register ceiling (spilling as soon as the bias/entropy terms are on), with 32 it compiles to ~160 registers,
# 0 spills, on both archs, in every flag combination (`python -m fastrl.kernels.report`). Shared memory per stage:
# h 64·32 + W 128·32 bf16 = 12 KiB, plus dz in bf16 64·128·2 = 16 KiB; 2 stages ≈ 44 KiB (sm_80) / 73 KiB (sm_90).
# Atomic traffic: each dh element receives V/128 adds and each dW element N/64 adds, all fp32.
# The z tile itself is recomputed with the forward's BLOCK_H (BLOCK_HZ = 64), so it is summed over H in the same
# chunks as the forward's z: exp((z − m) − s) then sees exactly the forward's z, not a second rounding of it (on
# peaked fp32 rows, |z| ≈ 70, a different chunking tripled the error of dh).
GRAD_CONFIG = SweepConfig(block_n=64, block_v=128, block_h=32, num_warps=8, num_stages=2)
# IEEE fp32 dots (fp32 inputs, torch's default "highest" precision) run on FMA units with register-resident
# operands: the tiles above spilled 912 bytes on sm_80. 64×64 tiles: 0 spills in all four kernels, the dh-only
# (frozen head) variant with 1 stage (see atomic_num_stages).
GRAD_CONFIG_FP32_IEEE = SweepConfig(block_n=64, block_v=64, block_h=32, num_warps=8, num_stages=2)


def grad_config(dtype: torch.dtype, precision: str) -> SweepConfig:
    """The gradient sweep's tiles for these inputs (`precision` from `dot_settings`)."""
    return GRAD_CONFIG_FP32_IEEE if dtype == torch.float32 and precision == "ieee" else GRAD_CONFIG


def atomic_num_stages(cfg: SweepConfig, need_weight_grad: bool, entropy_grad: bool = False) -> int:
    """Pipeline stages of the atomic kernel. Its dh-only variant with IEEE fp32 dots spilled 16 bytes on sm_80 with
    2 stages once the lse became two loads (max and log-sum); with 1 none. With the entropy gradient on it spilled
    12 bytes with 1 stage and 16 with 2, none with 3 (sm_80, 184 registers; sm_90 0 in each). The dh + dW variant
    spills ~490 bytes with 1 stage and none with 2 (ptxas allocates the two differently), so it keeps the config's."""
    if cfg is GRAD_CONFIG_FP32_IEEE and not need_weight_grad:
        return 3 if entropy_grad else 1
    return cfg.num_stages


def ordered_num_stages(dtype: torch.dtype) -> int:
    """Pipeline stages of the deterministic kernels: the read-modify-write dW tile (128·32 fp32) stays live across
    the H loop; with fp32 operands and 2 stages sm_80 ran out of registers (64 bytes spilled), with 1 none spill."""
    return 1 if dtype == torch.float32 else GRAD_CONFIG.num_stages  # GRAD_CONFIG_FP32_IEEE: 1 as well


@triton.jit
def _dz_tile(p_h, p_w, p_b, p_y, p_lse, p_g, p_ge, p_ent, o_n, m_n, o_v, m_v, N, H, stride_hn, stride_wv,
             z_scale, bias_scale, cap_scale, grad_scale, HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr,
             HAS_ENTROPY_GRAD: tl.constexpr,
             DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
             BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_HZ: tl.constexpr):
    """dL/d(h Wᵀ) = dL/dz · ∂z/∂(h Wᵀ) for rows o_n and columns o_v: [BLOCK_N, BLOCK_V] fp32, 0 outside
    [0, N) × [0, V)."""
    # [BN, BV]
    b_z = logit_tile(p_h, p_w, p_b, o_n, m_n, o_v, m_v, H, stride_hn, stride_wv, z_scale, bias_scale, cap_scale,
                     HAS_BIAS, SOFTCAP, DOT_FP32, DOT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_HZ)
    # [BN] the row max m and s = log Σ exp(z − m), lse = m + s kept as two fp32 numbers (p_lse is [2, N])
    b_m = tl.load(p_lse + o_n, mask=m_n, other=0.0)
    b_s = tl.load(p_lse + N + o_n, mask=m_n, other=0.0)
    b_g = tl.load(p_g + o_n, mask=m_n, other=0.0)
    b_y = tl.load(p_y + o_n, mask=m_n, other=-1)
    # [BN, BV] log p = (z − m) − s: z − m is exact near the max, and s is small on peaked rows, so p of the
    # leading column keeps fp32 precision (z − lse with one fp32 lse ≈ 70 would be off by up to ulp(70)/2)
    b_logp = tl.where(m_v[None, :], (b_z - b_m[:, None]) - b_s[:, None], 0.0)  # 0 in columns ≥ V
    # (the target column's log p is the forward's logp bit for bit: the same z_y, m and s in the same order)
    b_p = tl.where(m_v[None, :], tl.exp(b_logp), 0.0)
    b_dz = b_g[:, None] * (tl.where(o_v[None, :] == b_y[:, None], 1.0, 0.0) - b_p)
    if HAS_ENTROPY_GRAD:
        # [BN]
        b_ge = tl.load(p_ge + o_n, mask=m_n, other=0.0)
        b_ent = tl.load(p_ent + o_n, mask=m_n, other=0.0)
        b_dz -= b_ge[:, None] * b_p * (b_logp + b_ent[:, None])
    if SOFTCAP:
        # tanh(u), 0 in columns ≥ V (z = −inf there). A multiply by the reciprocal: the IEEE division spilled
        # 16 bytes in the fp32-fma ordered dW kernel on sm_80
        b_t = tl.where(m_v[None, :], b_z * (1.0 / cap_scale), 0.0)
        b_dz *= 1.0 - b_t * b_t
    return tl.where(m_n[:, None] & m_v[None, :], b_dz, 0.0) * grad_scale


@triton.jit
def _dot_operand(b_x, p_like, DOT_FP32: tl.constexpr):
    """A tile rounded to the input dtype for the tensor cores (upcast again only under the interpreter)."""
    b_x = b_x.to(p_like.dtype.element_ty)
    if DOT_FP32:
        b_x = b_x.to(tl.float32)
    return b_x


@triton.jit
def _grad_sweep_kernel(p_h, p_w, p_b, p_y, p_lse, p_g, p_ge, p_ent, p_dh, p_dw, p_db,
                       N, H, V, stride_hn, stride_wv, z_scale, bias_scale, cap_scale, grad_scale,
                       HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, HAS_ENTROPY_GRAD: tl.constexpr,
                       NEED_DH: tl.constexpr, NEED_DW: tl.constexpr, NEED_DB: tl.constexpr,
                       DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                       BLOCK_HZ: tl.constexpr):
    """2-D grid (row block, vocab block): one dz tile, its products added into dh, dW, db with fp32 atomics."""
    i_n, i_v = tl.program_id(0), tl.program_id(1)
    o_n = i_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    o_v = i_v.to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    m_n, m_v = o_n < N, o_v < V
    # [BN, BV]
    b_dz = _dz_tile(p_h, p_w, p_b, p_y, p_lse, p_g, p_ge, p_ent, o_n, m_n, o_v, m_v, N, H, stride_hn,
                    stride_wv, z_scale, bias_scale, cap_scale, grad_scale, HAS_BIAS, SOFTCAP, HAS_ENTROPY_GRAD,
                    DOT_FP32, DOT_PRECISION,
                    BLOCK_N, BLOCK_V, BLOCK_HZ)
    if NEED_DB:
        tl.atomic_add(p_db + o_v, tl.sum(b_dz, axis=0), mask=m_v)
    b_dz_op = _dot_operand(b_dz, p_h, DOT_FP32)
    for h0 in range(0, H, BLOCK_H):
        o_h = h0 + tl.arange(0, BLOCK_H).to(tl.int64)
        m_h = o_h < H
        if NEED_DH:
            # [BV, BH]
            b_w = tl.load(p_w + o_v[:, None] * stride_wv + o_h[None, :], mask=m_v[:, None] & m_h[None, :],
                          other=0.0)
            if DOT_FP32:
                b_w = b_w.to(tl.float32)
            # [BN, BV] @ [BV, BH] -> [BN, BH]
            b_dh = tl.dot(b_dz_op, b_w, input_precision=DOT_PRECISION)
            tl.atomic_add(p_dh + o_n[:, None] * H + o_h[None, :], b_dh, mask=m_n[:, None] & m_h[None, :])
        if NEED_DW:
            # [BN, BH]
            b_h = tl.load(p_h + o_n[:, None] * stride_hn + o_h[None, :], mask=m_n[:, None] & m_h[None, :],
                          other=0.0)
            if DOT_FP32:
                b_h = b_h.to(tl.float32)
            # [BV, BN] @ [BN, BH] -> [BV, BH]
            b_dw = tl.dot(tl.trans(b_dz_op), b_h, input_precision=DOT_PRECISION)
            tl.atomic_add(p_dw + o_v[:, None] * H + o_h[None, :], b_dw, mask=m_v[:, None] & m_h[None, :])


@triton.jit
def _grad_hidden_ordered_kernel(p_h, p_w, p_b, p_y, p_lse, p_g, p_ge, p_ent, p_dh,
                                N, H, V, stride_hn, stride_wv, z_scale, bias_scale, cap_scale, grad_scale,
                                HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, HAS_ENTROPY_GRAD: tl.constexpr,
                                DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
                                BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                                BLOCK_HZ: tl.constexpr):
    """Deterministic dh: one program per row block owns its dh rows and adds the vocab tiles in order."""
    i_n = tl.program_id(0)
    o_n = i_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_n = o_n < N
    for v0 in range(0, V, BLOCK_V):
        o_v = v0 + tl.arange(0, BLOCK_V).to(tl.int64)
        m_v = o_v < V
        # [BN, BV]
        b_dz = _dz_tile(p_h, p_w, p_b, p_y, p_lse, p_g, p_ge, p_ent, o_n, m_n, o_v, m_v, N, H, stride_hn,
                        stride_wv, z_scale, bias_scale, cap_scale, grad_scale, HAS_BIAS, SOFTCAP, HAS_ENTROPY_GRAD,
                    DOT_FP32, DOT_PRECISION,
                        BLOCK_N, BLOCK_V, BLOCK_HZ)
        b_dz_op = _dot_operand(b_dz, p_h, DOT_FP32)
        for h0 in range(0, H, BLOCK_H):
            o_h = h0 + tl.arange(0, BLOCK_H).to(tl.int64)
            m_h = o_h < H
            p_out = p_dh + o_n[:, None] * H + o_h[None, :]
            m_out = m_n[:, None] & m_h[None, :]
            # [BV, BH]
            b_w = tl.load(p_w + o_v[:, None] * stride_wv + o_h[None, :], mask=m_v[:, None] & m_h[None, :],
                          other=0.0)
            if DOT_FP32:
                b_w = b_w.to(tl.float32)
            # [BN, BV] @ [BV, BH] -> [BN, BH], added to this program's own rows: no other program writes them
            b_dh = tl.dot(b_dz_op, b_w, tl.load(p_out, mask=m_out, other=0.0), input_precision=DOT_PRECISION)
            tl.store(p_out, b_dh, mask=m_out)
        tl.debug_barrier()  # the next vocab tile reads back what every thread just stored


@triton.jit
def _grad_weight_ordered_kernel(p_h, p_w, p_b, p_y, p_lse, p_g, p_ge, p_ent, p_dw, p_db,
                                N, H, V, stride_hn, stride_wv, z_scale, bias_scale, cap_scale, grad_scale,
                                HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, HAS_ENTROPY_GRAD: tl.constexpr,
                                NEED_DW: tl.constexpr, NEED_DB: tl.constexpr,
                                DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
                                BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                                BLOCK_HZ: tl.constexpr):
    """Deterministic dW, db: one program per vocab block owns its dW rows and adds the row blocks in order."""
    i_v = tl.program_id(0)
    o_v = i_v.to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    m_v = o_v < V
    b_db = tl.zeros((BLOCK_V,), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        o_n = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
        m_n = o_n < N
        # [BN, BV]
        b_dz = _dz_tile(p_h, p_w, p_b, p_y, p_lse, p_g, p_ge, p_ent, o_n, m_n, o_v, m_v, N, H, stride_hn,
                        stride_wv, z_scale, bias_scale, cap_scale, grad_scale, HAS_BIAS, SOFTCAP, HAS_ENTROPY_GRAD,
                    DOT_FP32, DOT_PRECISION,
                        BLOCK_N, BLOCK_V, BLOCK_HZ)
        b_db += tl.sum(b_dz, axis=0)
        if NEED_DW:
            b_dz_op = _dot_operand(b_dz, p_h, DOT_FP32)
            for h0 in range(0, H, BLOCK_H):
                o_h = h0 + tl.arange(0, BLOCK_H).to(tl.int64)
                m_h = o_h < H
                p_out = p_dw + o_v[:, None] * H + o_h[None, :]
                m_out = m_v[:, None] & m_h[None, :]
                # [BN, BH]
                b_h = tl.load(p_h + o_n[:, None] * stride_hn + o_h[None, :], mask=m_n[:, None] & m_h[None, :],
                              other=0.0)
                if DOT_FP32:
                    b_h = b_h.to(tl.float32)
                # [BV, BN] @ [BN, BH] -> [BV, BH], added to this program's own dW rows
                b_dw = tl.dot(tl.trans(b_dz_op), b_h, tl.load(p_out, mask=m_out, other=0.0),
                              input_precision=DOT_PRECISION)
                tl.store(p_out, b_dw, mask=m_out)
            tl.debug_barrier()  # the next row block reads back what every thread just stored
    if NEED_DB:
        tl.store(p_db + o_v, b_db, mask=m_v)


def grad_sweep(hidden, weight, targets, bias, logits, lse, g_logp, g_entropy, logp, entropy,
               need_hidden_grad, need_weight_grad, need_bias_grad, deterministic=False):
    """(grad_hidden [N, H] | None, grad_weight [V, H] | None, grad_bias [V] | None), fp32, carrying the
    LogitTransform `logits`' chain factors (1/τ, scales, softcap).

    `logp` is not read (the contract's argument): (z_y − m) − s recomputed here equals it bit for bit.
    `deterministic=True` replaces the atomics by two ordered sweeps (see the module docstring).
    """
    if g_entropy is not None and entropy is None:
        raise ValueError("entropy: needed (shape [N]) when g_entropy is given")
    hidden, weight = hidden.contiguous(), weight.contiguous()
    n, h = hidden.shape
    v = weight.shape[0]
    f32 = dict(dtype=torch.float32, device=hidden.device)
    grad_h = torch.zeros(n, h, **f32) if need_hidden_grad else None
    grad_w = torch.zeros(v, h, **f32) if need_weight_grad else None
    grad_b = torch.zeros(v, **f32) if need_bias_grad else None
    if n == 0 or not (need_hidden_grad or need_weight_grad or need_bias_grad):
        return grad_h, grad_w, grad_b
    dot_fp32, precision = dot_settings(hidden.dtype)
    cfg = grad_config(hidden.dtype, precision)
    has_ent = g_entropy is not None
    stand_in = lse  # any fp32 tensor, passed where an optional pointer is unused (its flag is off)
    inputs = (hidden, weight, bias.contiguous() if bias is not None else hidden, targets.contiguous(),
              lse.contiguous(), g_logp.contiguous(),
              g_entropy.contiguous() if has_ent else stand_in, entropy.contiguous() if has_ent else stand_in)
    sizes = (n, h, v, hidden.stride(0), weight.stride(0), *logit_scalars(logits), logits.grad_scale)
    flags = dict(HAS_BIAS=bias is not None, SOFTCAP=logits.softcap is not None, HAS_ENTROPY_GRAD=has_ent,
                 DOT_FP32=dot_fp32, DOT_PRECISION=precision, BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v,
                 BLOCK_H=cfg.block_h, BLOCK_HZ=forward_config(hidden.dtype, precision).block_h,
                 num_warps=cfg.num_warps)
    out = lambda t: t if t is not None else stand_in  # noqa: E731
    if not deterministic:
        grid = (triton.cdiv(n, cfg.block_n), triton.cdiv(v, cfg.block_v))
        _grad_sweep_kernel[grid](*inputs, out(grad_h), out(grad_w), out(grad_b), *sizes, NEED_DH=need_hidden_grad,
                                 NEED_DW=need_weight_grad, NEED_DB=need_bias_grad,
                                 num_stages=atomic_num_stages(cfg, need_weight_grad, has_ent),
                                 **flags)
        return grad_h, grad_w, logits.bias_grad_(grad_b)
    stages = ordered_num_stages(hidden.dtype)
    if need_hidden_grad:
        _grad_hidden_ordered_kernel[(triton.cdiv(n, cfg.block_n),)](*inputs, grad_h, *sizes, num_stages=stages,
                                                                     **flags)
    if need_weight_grad or need_bias_grad:
        _grad_weight_ordered_kernel[(triton.cdiv(v, cfg.block_v),)](
            *inputs, out(grad_w), out(grad_b), *sizes, NEED_DW=need_weight_grad, NEED_DB=need_bias_grad,
            num_stages=stages, **flags)
    return grad_h, grad_w, logits.bias_grad_(grad_b)
