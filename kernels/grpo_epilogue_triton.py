"""Phase 2 in Triton: the GRPO loss, g = dL/dlogp in closed form, and TRL's metrics, in one launch.

One program per completion (grid = B) walks its rows cu_seqlens[b]:cu_seqlens[b+1] of the packed [N] inputs in
blocks of BLOCK_T (a padded [B, T] batch is the case cu_seqlens = T·arange(B + 1)):
  pass 1  Σ_t m and Σ_t m·(logp − old): the per-sequence normalizer max(1, Σ m) of grpo/sapo and the
          sequence-level log importance weight s = Σ m·(logp − old) / max(1, Σ m); with VESPO its log weight
          log w = Σ m·clamp(logp − old, ±20) + Σ m·clamp(log is_ratio, log 1e-8, 20), with the off-policy mask
          Σ m·(sampling − logp) (NaN as 0): per-sequence scalars φ and keep (closed forms below);
  pass 2  per token: loss, metric sums, and (token level) g; at sequence level also C = Σ_t w·m·∂L_t/∂r;
  pass 3  (sequence level only) g_t = w·m·∂L_t/∂logp_t|_r fixed + C·r·m_t / max(1, Σ m), since r = exp(s)
          depends on every logp_t of the sequence.
Each program writes its loss and metric sums to a [B, 9] partials buffer that the host sums (a fixed order, so
the loss is deterministic). The normalizer's global token count Σ m is one device reduction before the launch
(no host sync), as are the top-entropy threshold (`torch.nanquantile`, as TRL's quantile) and the entropy bonus's
token count Σ m'. With the bonus, pass 2 also writes dL/dH = −c·m'/max(1, Σ m') and sums m'·H.

Closed forms (w = the loss_type's per-token weight, a = advantage, r = ratio, β·KL with k3 = e^d − d − 1,
d = ref − logp, dk3/dlogp = 1 − e^d), for grpo/bnpo/dr_grpo/dapo with L = −min(r₁·a, clip(r)·a), r₁ = min(r, δ):
∂L/∂r = −a·(∂r₁/∂r if r₁·a < clip(r)·a, ∂clip/∂r if greater, their mean on a tie; torch.minimum splits ties);
cispo: L = −sg(min(r, ε_high))·a·logp, so ∂L/∂logp = −min(r, ε_high)·a and nothing flows through r;
sapo: L = −σ(t(r−1))·4/t·a, so ∂L/∂r = −4·a·σ·(1 − σ);
vespo: L = −sg(φ)·a·logp with φ = exp(λ + k·log w − λ·w) per sequence (k, λ by sign of a; φ non-finite -> 0), so
∂L/∂logp = −φ·a and nothing flows through r (is_ratio enters w, not L);
off-policy mask: the policy terms times keep = [a ≥ 0 or Σ m·(sampling − logp) / max(1, Σ m) ≤ threshold].
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .grpo_epilogue import check_epilogue_inputs, entropy_keep_mask, entropy_threshold
from .loss_spec import SEQUENCE_MEAN
from .params import VESPO_LAMBDA_MIN, VESPO_LOG_RATIO_MAX, VESPO_LOG_W_MIN, GRPOLossParams

OBJECTIVE_KIND = {"clip": 0, "cispo": 1, "sapo": 2, "vespo": 3}  # the LOSS constexpr, per loss_spec.OBJECTIVES
NORM_PER_SEQUENCE, NORM_MASK_TOTAL, NORM_CONSTANT = 0, 1, 2
# columns of the [B, 9] partials (the kernel's stores follow this order)
PARTIALS = ("loss", "kl", "entropy", "low", "high", "region", "cispo", "bonus", "phi")
# VESPO's clamps (params.py) as the kernel's compile-time constants, and fp32's largest finite value
LOG_RATIO_MAX, LOG_W_MIN = tl.constexpr(VESPO_LOG_RATIO_MAX), tl.constexpr(VESPO_LOG_W_MIN)
LAMBDA_MIN, FLT_MAX_C = tl.constexpr(VESPO_LAMBDA_MIN), tl.constexpr(3.4028234663852886e38)
# BLOCK_T: the next power of two ≥ 16 of the mean completion length N / B (known on the host without reading
# cu_seqlens), at most 1024; longer completions loop over blocks, shorter ones mask the tail of one.
# 1024 positions over 8 warps (256 threads) = 4 values per thread per live vector: 96-101 registers, 0 spills on
# sm_80/sm_90 (40-48 when rows started at multiples of a padded T: a packed sequence starts at any row, so each
# value gets its own 64-bit address instead of one 16-byte vector load). With 4 warps (8 values per thread)
# sm_90's ptxas spilled 16 bytes in the sequence-level variant of the padded kernel.
MAX_BLOCK_T = 1024
NUM_WARPS = 8


@triton.jit
def _policy_terms(b_lp, b_r, a, eps_low, eps_high, delta, t_pos, t_neg, phi,
                  LOSS: tl.constexpr, HAS_DELTA: tl.constexpr):
    """Per token: (L, ∂L/∂logp with r held fixed, ∂L/∂r) of the policy loss, all [BT]."""
    zero = tl.zeros_like(b_lp)
    if LOSS == 3:  # vespo: φ is the sequence's constant weight
        b_l, b_dlp, b_dr = -phi * a * b_lp, -phi * a + zero, zero
    elif LOSS == 1:  # cispo
        coef = tl.minimum(b_r, eps_high)
        b_l, b_dlp, b_dr = -coef * a * b_lp, -coef * a + zero, zero
    elif LOSS == 2:  # sapo
        t = tl.where(a > 0, t_pos, t_neg)
        sig = tl.sigmoid(t * (b_r - 1.0))
        b_l, b_dlp, b_dr = -sig * 4.0 / t * a, zero, -4.0 * a * sig * (1.0 - sig)
    else:  # grpo, bnpo, dr_grpo, dapo
        b_clip = tl.minimum(tl.maximum(b_r, 1.0 - eps_low), 1.0 + eps_high)
        d_clip = tl.where((b_r >= 1.0 - eps_low) & (b_r <= 1.0 + eps_high), 1.0, 0.0)
        b_r1 = b_r
        d_r1 = 1.0 + zero
        if HAS_DELTA:
            b_r1 = tl.minimum(b_r, delta)
            d_r1 = tl.where(b_r <= delta, 1.0, 0.0)
        l1, l2 = b_r1 * a, b_clip * a
        d_min = tl.where(l1 < l2, d_r1, tl.where(l2 < l1, d_clip, 0.5 * (d_r1 + d_clip)))
        b_l, b_dlp, b_dr = -tl.minimum(l1, l2), zero, -a * d_min
    return b_l, b_dlp, b_dr


@triton.jit
def _entropy_keep(b_ent, b_m, ent_thr, ENT_MASK: tl.constexpr):
    """TRL's get_high_entropy_mask times the mask, [BT]: (entropy·m ≥ threshold) & m (the mask without it)."""
    if ENT_MASK:
        return tl.where((b_ent * b_m >= ent_thr) & (b_m != 0), 1.0, 0.0)
    return b_m


@triton.jit
def _token_terms(b_lp, b_m, b_ref, b_isr, b_keep, b_r, a, beta, eps_low, eps_high, delta, t_pos, t_neg, phi,
                 seq_keep, LOSS: tl.constexpr, HAS_DELTA: tl.constexpr, HAS_KL: tl.constexpr, BIAS_KL: tl.constexpr,
                 HAS_IS: tl.constexpr, ENT_MASK: tl.constexpr):
    """Per token [BT]: (L, ∂L/∂logp with r fixed, ∂L/∂r, k3 KL as logged) before the mask and the weight.
    b_keep: the entropy keep (ENT_MASK); seq_keep: the off-policy mask's 0/1 for the sequence (1 when off)."""
    b_l, b_dlp, b_dr = _policy_terms(b_lp, b_r, a, eps_low, eps_high, delta, t_pos, t_neg, phi, LOSS, HAS_DELTA)
    b_l, b_dlp, b_dr = b_l * seq_keep, b_dlp * seq_keep, b_dr * seq_keep
    if ENT_MASK:
        b_l, b_dlp, b_dr = b_l * b_keep, b_dlp * b_keep, b_dr * b_keep
    if HAS_IS and LOSS != 3:  # VESPO folds the ratios into φ
        b_l, b_dlp, b_dr = b_l * b_isr, b_dlp * b_isr, b_dr * b_isr
    b_kl = tl.zeros_like(b_lp)
    if HAS_KL:
        d = b_ref - b_lp
        b_kl = tl.exp(d) - d - 1.0
        dkl = 1.0 - tl.exp(d)
        if BIAS_KL:  # KL·r
            b_dlp += beta * dkl * b_r
            b_dr += beta * b_kl
            b_kl = b_kl * b_r
        else:
            b_dlp += beta * dkl
        b_l += beta * b_kl
    return b_l, b_dlp, b_dr, b_kl


@triton.jit
def _clip_flags(r, a, eps_low, eps_high):
    """TRL's clip indicators as 0/1 floats, on the uncapped ratio: (low, high, cispo)."""
    low = tl.where(a < 0, tl.where(r < 1.0 - eps_low, 1.0, 0.0), 0.0)
    high = tl.where(a > 0, tl.where(r > 1.0 + eps_high, 1.0, 0.0), 0.0)
    cispo = tl.where(a > 0, tl.where(r > eps_high, 1.0, 0.0), 0.0)
    return low, high, cispo


@triton.jit
def _load_block(p_logp, p_mask, p_old, p_ref, p_isr, p_ent, row, o_t, m_t, i_b, stride_isr_b, stride_isr_t,
                HAS_OLD: tl.constexpr, HAS_KL: tl.constexpr, HAS_IS: tl.constexpr, HAS_ENT: tl.constexpr):
    """[BT] blocks of logp, mask, old, ref, is_ratio, entropy at rows row + o_t (sequence i_b's), fp32."""
    b_lp = tl.load(p_logp + row + o_t, mask=m_t, other=0.0).to(tl.float32)
    b_m = tl.load(p_mask + row + o_t, mask=m_t, other=0.0).to(tl.float32)
    b_old = b_lp
    if HAS_OLD:
        b_old = tl.load(p_old + row + o_t, mask=m_t, other=0.0).to(tl.float32)
    b_ref = b_lp
    if HAS_KL:
        b_ref = tl.load(p_ref + row + o_t, mask=m_t, other=0.0).to(tl.float32)
    b_isr = b_m
    if HAS_IS:
        # is_ratio per row (stride_isr_b 0, stride_isr_t 1) or per sequence (1, 0)
        b_isr = tl.load(p_isr + i_b * stride_isr_b + (row + o_t) * stride_isr_t, mask=m_t, other=0.0).to(tl.float32)
    b_ent = b_m
    if HAS_ENT:
        b_ent = tl.load(p_ent + row + o_t, mask=m_t, other=0.0).to(tl.float32)
    return b_lp, b_m, b_old, b_ref, b_isr, b_ent


@triton.jit
def _sequence_sums(p_logp, p_mask, p_old, p_isr, p_samp, row, T, i_b, stride_isr_b, stride_isr_t,
                   HAS_OLD: tl.constexpr, HAS_IS: tl.constexpr, VESPO: tl.constexpr, OPSM: tl.constexpr,
                   HAS_SAMP: tl.constexpr, BLOCK_T: tl.constexpr):
    """Of the sequence at rows row:row + T: (Σ m, Σ m·(logp − old), VESPO's log w before its final clamp,
    Σ m·(sampling − logp) with NaN as 0); the last two 0 unless asked for."""
    m_sum = 0.0
    lr_sum = 0.0
    log_w = 0.0
    kl_sum = 0.0
    for t0 in range(0, T, BLOCK_T):
        o_t = t0 + tl.arange(0, BLOCK_T).to(tl.int64)
        m_t = o_t < T
        # [BT]
        b_lp = tl.load(p_logp + row + o_t, mask=m_t, other=0.0)
        b_m = tl.load(p_mask + row + o_t, mask=m_t, other=0.0)
        m_sum += tl.sum(b_m, axis=0)
        if HAS_OLD:
            b_old = tl.load(p_old + row + o_t, mask=m_t, other=0.0)
            lr_sum += tl.sum(b_m * (b_lp - b_old), axis=0)
            if VESPO:
                b_lr = tl.minimum(tl.maximum(b_lp - b_old, -LOG_RATIO_MAX), LOG_RATIO_MAX)
                log_w += tl.sum(b_m * b_lr, axis=0)
        if VESPO and HAS_IS:
            b_isr = tl.load(p_isr + i_b * stride_isr_b + (row + o_t) * stride_isr_t, mask=m_t, other=1.0)
            log_w += tl.sum(b_m * tl.minimum(tl.maximum(tl.log(b_isr), LOG_W_MIN), LOG_RATIO_MAX), axis=0)
        if OPSM and HAS_SAMP:
            b_d = tl.load(p_samp + row + o_t, mask=m_t, other=0.0) - b_lp
            kl_sum += tl.sum(b_m * tl.where(b_d != b_d, 0.0, b_d), axis=0)  # NaN: an unscored token
    return m_sum, lr_sum, log_w, kl_sum


@triton.jit
def _gamma_weight(log_w, a, k_pos, lam_pos, k_neg, lam_neg):
    """VESPO's φ(w) = exp(λ + k·log w − λ·w), log w clamped to [log 1e-8, 20], k and λ by the sign of a
    (λ ≥ 1e-4); a non-finite φ is 0 (TRL's nan_to_num)."""
    log_w = tl.minimum(tl.maximum(log_w, LOG_W_MIN), LOG_RATIO_MAX)
    k = tl.where(a >= 0, k_pos, k_neg)
    lam = tl.maximum(tl.where(a >= 0, lam_pos, lam_neg), LAMBDA_MIN)
    phi = tl.exp(lam + k * log_w - lam * tl.exp(log_w))
    return tl.where((phi == phi) & (phi <= FLT_MAX_C), phi, 0.0)


@triton.jit
def _grpo_epilogue_kernel(p_logp, p_mask, p_adv, p_old, p_ref, p_isr, p_ent, p_samp, p_cu, p_mask_total, p_g,
                          p_gent, p_part, stride_isr_b, stride_isr_t, n_seq, norm_const, beta, eps_low, eps_high,
                          delta, t_pos, t_neg, p_ent_thr, k_pos, lam_pos, k_neg, lam_neg, opsm_thr, ent_coef,
                          p_bonus_tokens,
                          LOSS: tl.constexpr, NORM: tl.constexpr, SEQ_LEVEL: tl.constexpr, HAS_OLD: tl.constexpr,
                          HAS_KL: tl.constexpr, BIAS_KL: tl.constexpr, HAS_DELTA: tl.constexpr,
                          HAS_IS: tl.constexpr, HAS_ENT: tl.constexpr, ENT_MASK: tl.constexpr, OPSM: tl.constexpr,
                          HAS_SAMP: tl.constexpr, BONUS: tl.constexpr, BLOCK_T: tl.constexpr):
    i_b = tl.program_id(0).to(tl.int64)
    row = tl.load(p_cu + i_b)  # the sequence's first row, int64
    T = tl.load(p_cu + i_b + 1) - row  # its length
    a = tl.load(p_adv + i_b).to(tl.float32)
    ent_thr = 0.0
    if ENT_MASK:
        ent_thr = tl.load(p_ent_thr)  # the entropy quantile, computed on the device (no host read)
    m_sum, lr_sum, log_w, kl_sum_seq = _sequence_sums(p_logp, p_mask, p_old, p_isr, p_samp, row, T, i_b,
                                                      stride_isr_b, stride_isr_t, HAS_OLD, HAS_IS, LOSS == 3, OPSM,
                                                      HAS_SAMP, BLOCK_T)  # pass 1
    den = tl.maximum(m_sum, 1.0)
    r_seq = tl.exp(lr_sum / den)
    phi = 1.0
    if LOSS == 3:
        phi = _gamma_weight(log_w, a, k_pos, lam_pos, k_neg, lam_neg)
    seq_keep = 1.0
    if OPSM:  # TRL's off-policy sequence mask: keep A ≥ 0, or a mean KL at most the threshold
        seq_keep = tl.where((a >= 0) | (kl_sum_seq / den <= opsm_thr), 1.0, 0.0)
    if NORM == 0:  # SEQUENCE_MEAN (grpo, sapo): mean over sequences of the per-sequence masked mean
        w = 1.0 / (den * n_seq)
    elif NORM == 1:  # MASK_TOTAL, ITEMS without num_items_in_batch: the batch's token count
        w = 1.0 / tl.maximum(tl.load(p_mask_total), 1.0)
    else:  # COMPLETION_BUDGET, ITEMS with num_items_in_batch: the host's fixed divisor
        w = 1.0 / norm_const
    w_bonus = 0.0
    if BONUS:  # dL/dH per bonus token: −c / max(1, Σ m')
        w_bonus = -ent_coef / tl.maximum(tl.load(p_bonus_tokens), 1.0)
    # pass 2: loss, metric sums, g (token level) and C = Σ w·m·∂L/∂r (sequence level)
    loss_sum = 0.0
    kl_sum = 0.0
    ent_sum = 0.0
    bonus_sum = 0.0
    low_sum = 0.0
    high_sum = 0.0
    region_sum = 0.0
    cispo_sum = 0.0
    c_seq = 0.0
    for t0 in range(0, T, BLOCK_T):
        o_t = t0 + tl.arange(0, BLOCK_T).to(tl.int64)
        m_t = o_t < T
        b_lp, b_m, b_old, b_ref, b_isr, b_ent = _load_block(p_logp, p_mask, p_old, p_ref, p_isr, p_ent, row, o_t,
                                                            m_t, i_b, stride_isr_b, stride_isr_t,
                                                            HAS_OLD, HAS_KL, HAS_IS, HAS_ENT)
        if SEQ_LEVEL:
            b_r = r_seq + tl.zeros_like(b_lp)
        else:
            b_r = tl.exp(b_lp - b_old)
        b_keep = _entropy_keep(b_ent, b_m, ent_thr, ENT_MASK)
        b_l, b_dlp, b_dr, b_kl = _token_terms(b_lp, b_m, b_ref, b_isr, b_keep, b_r, a, beta, eps_low, eps_high,
                                              delta, t_pos, t_neg, phi, seq_keep,
                                              LOSS, HAS_DELTA, HAS_KL, BIAS_KL, HAS_IS, ENT_MASK)
        b_wm = w * b_m
        loss_sum += tl.sum(b_wm * b_l, axis=0)
        kl_sum += tl.sum(b_m * b_kl, axis=0)
        if HAS_ENT:
            ent_sum += tl.sum(b_m * b_ent, axis=0)
        if BONUS:  # the bonus's tokens m' are the policy term's: the mask times the entropy keep
            bonus_sum += tl.sum(b_keep * b_ent, axis=0)
            tl.store(p_gent + row + o_t, w_bonus * b_keep, mask=m_t)
        if SEQ_LEVEL:
            c_seq += tl.sum(b_wm * b_dr, axis=0)
        else:
            tl.store(p_g + row + o_t, b_wm * (b_dlp + b_dr * b_r), mask=m_t)
            low, high, cispo = _clip_flags(b_r, a, eps_low, eps_high)
            low_sum += tl.sum(b_m * low, axis=0)
            high_sum += tl.sum(b_m * high, axis=0)
            region_sum += tl.sum(b_m * tl.maximum(low, high), axis=0)
            cispo_sum += tl.sum(b_m * cispo, axis=0)
    if SEQ_LEVEL:  # TRL: a [B, 1] ratio gives one clip flag per sequence, averaged over sequences
        low_sum, high_sum, cispo_sum = _clip_flags(r_seq, a, eps_low, eps_high)
        region_sum = tl.maximum(low_sum, high_sum)
        # pass 3: g_t = w·m·∂L_t/∂logp_t + C·r·m_t / den
        for t0 in range(0, T, BLOCK_T):
            o_t = t0 + tl.arange(0, BLOCK_T).to(tl.int64)
            m_t = o_t < T
            b_lp, b_m, b_old, b_ref, b_isr, b_ent = _load_block(p_logp, p_mask, p_old, p_ref, p_isr, p_ent, row,
                                                                o_t, m_t, i_b, stride_isr_b, stride_isr_t,
                                                                HAS_OLD, HAS_KL, HAS_IS, HAS_ENT)
            b_r = r_seq + tl.zeros_like(b_lp)
            b_keep = _entropy_keep(b_ent, b_m, ent_thr, ENT_MASK)
            _, b_dlp, _, _ = _token_terms(b_lp, b_m, b_ref, b_isr, b_keep, b_r, a, beta, eps_low, eps_high, delta,
                                          t_pos, t_neg, phi, seq_keep, LOSS, HAS_DELTA, HAS_KL, BIAS_KL, HAS_IS,
                                          ENT_MASK)
            tl.store(p_g + row + o_t, w * b_m * b_dlp + c_seq * r_seq * b_m / den, mask=m_t)
    p_out = p_part + i_b * 9  # one row of PARTIALS
    tl.store(p_out + 0, loss_sum)
    tl.store(p_out + 1, kl_sum)
    tl.store(p_out + 2, ent_sum)
    tl.store(p_out + 3, low_sum)
    tl.store(p_out + 4, high_sum)
    tl.store(p_out + 5, region_sum)
    tl.store(p_out + 6, cispo_sum)
    tl.store(p_out + 7, bonus_sum)
    tl.store(p_out + 8, phi)


def _normalizer(n_seq: int, p: GRPOLossParams) -> tuple[int, float]:
    """(NORM, norm_const) for the kernel, from the loss type's reduction (loss_spec.py)."""
    if p.rule.reduction == SEQUENCE_MEAN:
        return NORM_PER_SEQUENCE, 1.0
    divisor = p.fixed_divisor(n_seq)
    return (NORM_MASK_TOTAL, 1.0) if divisor is None else (NORM_CONSTANT, divisor)


def _metrics(sums, mask_total, n_seq: int, p: GRPOLossParams, has_entropy: bool) -> dict:
    """[9] summed partials -> TRL's metric names, masked means (per sequence for sequence-level clip flags)."""
    tokens = mask_total.clamp(min=1.0)
    flag_count = float(n_seq) if p.importance_sampling_level == "sequence" else tokens
    out = {}
    if p.beta != 0.0:
        out["kl"] = sums[1] / tokens
    if has_entropy:
        out["entropy"] = sums[2] / tokens
    if p.rule.objective == "clip":
        out["clip_ratio/low_mean"] = sums[3] / flag_count
        out["clip_ratio/high_mean"] = sums[4] / flag_count
        out["clip_ratio/region_mean"] = sums[5] / flag_count
    elif p.rule.objective == "cispo":
        out["cispo_clip_ratio"] = sums[6] / flag_count
    elif p.rule.objective == "vespo":
        out["vespo/phi_seq_mean"] = sums[8] / max(1, n_seq)  # TRL: over every sequence
    return out


def grpo_epilogue(logp, mask, advantages, old_logp, ref_logp, is_ratio, entropy, cu_seqlens,
                  params: GRPOLossParams, sampling_logp=None):
    """logp [N] fp32 on packed rows (sequence b at cu_seqlens[b]:cu_seqlens[b+1]) -> (loss 0-d fp32,
    g_logp [N] fp32, g_entropy [N] fp32 or None (no entropy bonus), metrics: dict of 0-d fp32). mask, old/ref
    logprobs, entropy, sampling_logp [N]; is_ratio [N] or [B, 1]; advantages [B]. See kernels/README.md."""
    p = params
    check_epilogue_inputs(ref_logp, entropy, p)
    n_rows, n_seq = logp.shape[0], cu_seqlens.numel() - 1
    f32 = lambda t: None if t is None else t.float().contiguous()  # noqa: E731
    logp, mask, advantages, old_logp, ref_logp, entropy, isr = map(f32, (logp, mask, advantages, old_logp, ref_logp,
                                                                         entropy, is_ratio))
    # the off-policy mask measures the sampling logprobs when given, else the old ones (TRL), else nothing (0)
    samp = f32(sampling_logp) if sampling_logp is not None else old_logp
    isr_strides = (0, 0) if isr is None else (1, 0) if isr.dim() == 2 else (0, 1)  # [B, 1] or [N]
    mask_total = mask.sum().reshape(1)  # [1] device reduction, read by the kernel for bnpo/dapo/cispo
    norm, norm_const = _normalizer(n_seq, p)
    ent_mask, bonus = p.top_entropy_quantile < 1.0, p.entropy_coef is not None
    ent_thr = entropy_threshold(entropy, mask, p.top_entropy_quantile) if ent_mask else mask_total  # [1]
    bonus_tokens = mask_total  # [1] Σ m', the bonus's tokens: the policy term's
    if bonus and ent_mask:
        bonus_tokens = entropy_keep_mask(entropy, mask, p.top_entropy_quantile, ent_thr).sum().reshape(1)
    g = torch.empty_like(logp)
    g_entropy = torch.empty_like(logp) if bonus else None
    partials = torch.empty(n_seq, len(PARTIALS), dtype=torch.float32, device=logp.device)
    v = p.vespo
    if n_seq > 0:
        _grpo_epilogue_kernel[(n_seq,)](
            logp, mask, advantages, logp if old_logp is None else old_logp, logp if ref_logp is None else ref_logp,
            logp if isr is None else isr, logp if entropy is None else entropy, logp if samp is None else samp,
            cu_seqlens.long().contiguous(), mask_total, g, g if g_entropy is None else g_entropy, partials,
            *isr_strides, float(n_seq), norm_const, float(p.beta), float(p.epsilon_low),
            float(p.epsilon_high), float(p.delta) if p.delta is not None else 0.0, float(p.sapo_temperature_pos),
            float(p.sapo_temperature_neg), ent_thr, v.k_pos, v.lambda_pos, v.k_neg, v.lambda_neg,
            float(p.off_policy_mask_threshold or 0.0), float(p.entropy_coef or 0.0), bonus_tokens,
            LOSS=OBJECTIVE_KIND[p.rule.objective], NORM=norm, SEQ_LEVEL=p.importance_sampling_level == "sequence",
            HAS_OLD=old_logp is not None, HAS_KL=p.beta != 0.0, BIAS_KL=p.use_bias_correction_kl,
            HAS_DELTA=p.delta is not None, HAS_IS=isr is not None, HAS_ENT=entropy is not None, ENT_MASK=ent_mask,
            OPSM=p.off_policy_mask_threshold is not None, HAS_SAMP=samp is not None, BONUS=bonus,
            BLOCK_T=block_t(n_rows // n_seq), num_warps=NUM_WARPS,
        )
    sums = partials.sum(dim=0)  # [9], fixed order: deterministic
    loss, metrics = sums[0], _metrics(sums, mask_total[0], n_seq, p, entropy is not None)
    if bonus:
        mean = sums[7] / bonus_tokens[0].clamp(min=1.0)
        metrics.update({"policy_loss": loss, "entropy_bonus/entropy": mean, "entropy_bonus/tokens": bonus_tokens[0]})
        loss = loss - p.entropy_coef * mean
    return loss, g, g_entropy, metrics


def block_t(mean_length: int) -> int:
    return min(MAX_BLOCK_T, max(16, triton.next_power_of_2(mean_length)))
