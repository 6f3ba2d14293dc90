"""Phase 2 in PyTorch: the GRPO loss from token logprobs, its gradient dL/dlogp, and TRL's metrics.

Everything here is O(N) on packed rows: sequence b owns rows cu_seqlens[b]:cu_seqlens[b+1] (a padded [B, T]
batch is the case cu_seqlens = T·arange(B + 1)), and per-sequence quantities (grpo's mean, the sequence-level
ratio) are segment sums over those rows (`Sequences`). The loss is written once, as `objective_terms`, on rows,
so the same code serves the whole batch (this module's `grpo_epilogue`) and row tiles (`grpo_single_pass`);
autograd on a detached copy of logp gives g = dL/dlogp. Semantics are TRL's `GRPOTrainer._compute_loss`
(trl 1.16):
    L = −min(r·A, clip(r, 1−ε_low, 1+ε_high)·A)      (r capped at delta in the first term when set)
    cispo: L = −sg(min(r, ε_high))·A·logp;  sapo: L = −σ(t(r−1))·4/t·A, t = t_pos if A > 0 else t_neg
    vespo: L = −sg(φ)·A·logp, φ the sequence's gamma weight (`gamma_weights`; is_ratio enters φ, not L)
    L *= off-policy sequence mask (`off_policy_keep`), L *= entropy mask (top_entropy_quantile), L *= is_ratio,
    L += β·k3(ref, logp) (·r if use_bias_correction_kl)
and the reduction per loss_type is a per-token weight w, so that loss = Σ w·L (see `token_weights`). The entropy
bonus, loss −= c·Σ m'·H / max(1, Σ m') over the policy term's tokens m' (`entropy_bonus`), gives dL/dH.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from .loss_spec import SEQUENCE_MEAN
from .params import VESPO_LAMBDA_MIN, VESPO_LOG_RATIO_MAX, VESPO_LOG_W_MIN, GRPOLossParams


class Sequences(NamedTuple):
    """Which sequence each packed row belongs to: rows cu_seqlens[b]:cu_seqlens[b+1] are sequence b's."""
    cu_seqlens: torch.Tensor  # [B + 1] int64
    index: torch.Tensor  # [N] int64, the sequence of each row

    @classmethod
    def from_cu_seqlens(cls, cu_seqlens: torch.Tensor, n_rows: int) -> "Sequences":
        """n_rows = cu_seqlens[-1], passed in so that no value is read back from the device."""
        cu = cu_seqlens.long()
        seq = torch.arange(cu.numel() - 1, device=cu.device)
        return cls(cu, torch.repeat_interleave(seq, cu.diff(), output_size=n_rows))

    @property
    def count(self) -> int:
        return self.cu_seqlens.numel() - 1

    def sums(self, rows: torch.Tensor) -> torch.Tensor:
        """[N] -> [B]: each sequence's sum (differentiable in rows)."""
        return torch.zeros(self.count, dtype=rows.dtype, device=rows.device).index_add(0, self.index, rows)


def token_weights(mask: torch.Tensor, seqs: Sequences, p: GRPOLossParams) -> torch.Tensor:
    """mask [N] -> w [N] with loss = Σ w·L, encoding the loss type's reduction (loss_spec.py)."""
    mask = mask.float()
    if p.rule.reduction == SEQUENCE_MEAN:
        return mask / seqs.sums(mask).clamp(min=1.0)[seqs.index] / seqs.count
    divisor = p.fixed_divisor(seqs.count)
    return mask / (mask.sum().clamp(min=1.0) if divisor is None else divisor)


def policy_loss(logp, ratio, adv, p: GRPOLossParams, phi=None) -> torch.Tensor:
    """Per-token policy loss before masks and KL. ratio, adv and VESPO's φ broadcast against logp."""
    if p.rule.objective == "vespo":
        return -phi * adv * logp
    if p.rule.objective == "cispo":
        return -torch.clamp(ratio, max=p.epsilon_high).detach() * adv * logp
    if p.rule.objective == "sapo":
        t = torch.where(adv > 0, p.sapo_temperature_pos, p.sapo_temperature_neg)
        return -torch.sigmoid(t * (ratio - 1)) * (4.0 / t) * adv
    clipped = torch.clamp(ratio, 1 - p.epsilon_low, 1 + p.epsilon_high)
    capped = ratio if p.delta is None else torch.clamp(ratio, max=p.delta)
    return -torch.minimum(capped * adv, clipped * adv)


def clip_flags(ratio, adv, p: GRPOLossParams) -> dict[str, torch.Tensor]:
    """TRL's clip indicators (on the uncapped ratio), as float tensors shaped like ratio·adv."""
    if p.rule.objective == "cispo":
        return {"cispo_clip_ratio": ((ratio > p.epsilon_high) & (adv > 0)).float()}
    if p.rule.objective in ("sapo", "vespo"):
        return {}
    low = (ratio < 1 - p.epsilon_low) & (adv < 0)
    high = (ratio > 1 + p.epsilon_high) & (adv > 0)
    return {"clip_ratio/low_mean": low.float(), "clip_ratio/high_mean": high.float(),
            "clip_ratio/region_mean": (low | high).float()}


def objective_terms(logp, log_ratio, adv, ref, is_ratio, keep, w, mask, p: GRPOLossParams, phi=None):
    """Σ w·L (differentiable in logp) and the masked KL sum (detached).

    All [n] rows (a tile of tokens, or the batch); keep, ref, is_ratio, phi (VESPO's, per row) may be None.
    Returns (loss_sum, sums) with sums["kl"] = Σ m·KL when β ≠ 0.
    """
    ratio = torch.exp(log_ratio)
    per_token = policy_loss(logp, ratio, adv, p, phi)
    if keep is not None:
        per_token = per_token * keep
    if is_ratio is not None:
        per_token = per_token * is_ratio
    sums = {}
    if p.beta != 0.0:
        d = ref - logp
        kl = torch.exp(d) - d - 1
        if p.use_bias_correction_kl:
            kl = kl * ratio
        per_token = per_token + p.beta * kl
        sums["kl"] = (kl.detach() * mask).sum()
    return (w * per_token).sum(), sums


def flag_sums(ratio, adv, weight, p: GRPOLossParams) -> dict[str, torch.Tensor]:
    """Σ weight·flag for each of TRL's clip indicators: per token (weight = the mask) or, at sequence level, per
    sequence (ratio, adv [B], weight 1: TRL averages a [B, 1] ratio's flags over all sequences)."""
    return {name: (f * weight).sum() for name, f in clip_flags(ratio.detach(), adv, p).items()}


def entropy_threshold(entropy, mask, quantile: float) -> torch.Tensor:
    """TRL's get_high_entropy_mask threshold: the (1 − quantile) quantile of the masked entropies, a [1] tensor
    computed without a host read (masked-out entries are NaN, which nanquantile skips; with none left it is NaN,
    and `entropy >= NaN` keeps no token)."""
    values = torch.where(mask.bool(), entropy.float(), torch.nan)  # [N]
    return torch.nanquantile(values.reshape(-1), 1.0 - quantile).reshape(1)


def entropy_keep_mask(entropy, mask, quantile: float, threshold=None):
    """TRL's get_high_entropy_mask: 1 for tokens at or above the (1 − quantile) entropy quantile (`threshold`, the
    [1] entropy_threshold, when the caller has it)."""
    if quantile >= 1.0:
        return None
    threshold = entropy_threshold(entropy, mask, quantile) if threshold is None else threshold
    return ((entropy * mask >= threshold) & mask.bool()).float()


def finish_metrics(sums: dict, mask_sum: torch.Tensor, n_seq: int, sequence_level: bool,
                   entropy_sum=None) -> dict:
    """Masked sums -> TRL's masked means (per token; per sequence for sequence-level clip flags). mask_sum is a
    0-d tensor: the means stay on the device (no host read)."""
    token_count = mask_sum.clamp(min=1.0)
    out = {}
    for name, total in sums.items():
        per_seq = sequence_level and name != "kl"
        out[name] = (total / (n_seq if per_seq else token_count)).detach()
    if entropy_sum is not None:
        out["entropy"] = (entropy_sum / token_count).detach()
    return out


def check_epilogue_inputs(ref_logp, entropy, p: GRPOLossParams) -> None:
    """What both epilogues (this one and the Triton one) refuse alike: the KL term needs the reference logprobs,
    and TRL's top-entropy mask needs the entropies (callers compute them in the forward sweep; skipping the mask
    without them would silently train on every token)."""
    if p.beta != 0.0 and ref_logp is None:
        raise ValueError("ref_logp: needed ([N]) when beta != 0")
    if p.top_entropy_quantile < 1.0 and entropy is None:
        raise ValueError("entropy: needed ([N]) when top_entropy_quantile < 1")
    if p.entropy_coef is not None and entropy is None:
        raise ValueError("entropy: needed ([N]) for the entropy bonus (entropy_coef)")


def gamma_weights(log_ratio, adv, mask, is_ratio, seqs: Sequences, p: GRPOLossParams) -> torch.Tensor:
    """VESPO's φ(w) per sequence [B], TRL's get_gamma_weights (a coefficient: no gradient). log w is the masked
    sum of the per-token log ratios (each clamped to ±20) plus the clamped log importance-sampling ratios
    (is_ratio [N] or None), clamped to [log 1e-8, 20]; φ = exp(λ + k·log w − λ·w), non-finite φ -> 0."""
    log_w = seqs.sums(log_ratio.detach().clamp(-VESPO_LOG_RATIO_MAX, VESPO_LOG_RATIO_MAX) * mask)  # [B]
    if is_ratio is not None:
        log_w = log_w + seqs.sums(torch.log(is_ratio).clamp(VESPO_LOG_W_MIN, VESPO_LOG_RATIO_MAX) * mask)
    log_w = log_w.clamp(VESPO_LOG_W_MIN, VESPO_LOG_RATIO_MAX)
    v, pos = p.vespo, adv >= 0
    k = torch.where(pos, v.k_pos, v.k_neg)
    lam = torch.where(pos, v.lambda_pos, v.lambda_neg).clamp(min=VESPO_LAMBDA_MIN)
    return torch.nan_to_num(torch.exp(lam + k * log_w - lam * torch.exp(log_w)), nan=0.0, posinf=0.0, neginf=0.0)


def off_policy_keep(logp, sampling_logp, adv, mask, seqs: Sequences, threshold: float) -> torch.Tensor:
    """TRL's off-policy sequence mask (DeepSeek-V3.2) [B]: 1 where A ≥ 0 or the sequence's masked mean of
    sampling − logp (NaN, an unscored token, counted as 0) is at most the threshold, else 0."""
    kl = torch.nan_to_num(sampling_logp - logp.detach(), nan=0.0)  # [N]
    mean_kl = seqs.sums(kl * mask) / seqs.sums(mask).clamp(min=1.0)  # [B]
    return ((adv >= 0) | (mean_kl <= threshold)).float()


def entropy_bonus(entropy, tokens, coef: float):
    """TRL's entropy bonus over its tokens m' [N] (the policy term's: the mask, times the entropy quantile's keep)
    -> (c·H̄ with H̄ = Σ m'·H / max(1, Σ m'), dL/dH = −c·m' / max(1, Σ m') [N] for loss −= c·H̄, and H̄ and Σ m' as
    metrics, which the adaptive controller reads)."""
    count = tokens.sum()
    mean = (entropy.float() * tokens).sum() / count.clamp(min=1.0)
    return coef * mean, -coef * tokens / count.clamp(min=1.0), {"entropy_bonus/entropy": mean,
                                                                 "entropy_bonus/tokens": count}


def row_is_ratio(is_ratio, seqs: Sequences):
    """is_ratio [N] or per sequence [B, 1] -> [N] fp32 (None stays None)."""
    if is_ratio is None:
        return None
    return is_ratio.float().reshape(-1)[seqs.index] if is_ratio.dim() == 2 else is_ratio.float()


def _sequence_factors(logp, old, mask, adv, is_ratio, sampling_logp, seqs: Sequences, p: GRPOLossParams):
    """Per-sequence [B] factors of the policy term, or None: VESPO's φ and the off-policy mask (measured on the
    sampling logprobs when given, else on the old ones, as TRL does)."""
    phi = gamma_weights(logp - old, adv, mask, is_ratio, seqs, p) if p.rule.objective == "vespo" else None
    opsm = None
    if p.off_policy_mask_threshold is not None:
        sampling = old if sampling_logp is None else sampling_logp.float()
        opsm = off_policy_keep(logp, sampling, adv, mask, seqs, p.off_policy_mask_threshold)
    return phi, opsm


def grpo_epilogue(logp, mask, advantages, old_logp, ref_logp, is_ratio, entropy, cu_seqlens, p: GRPOLossParams,
                  sampling_logp=None):
    """logp [N] fp32 on packed rows (sequence b at cu_seqlens[b]:cu_seqlens[b+1]) -> (loss 0-d fp32,
    g_logp [N] fp32, g_entropy [N] fp32 or None (no entropy bonus), metrics). mask, old_logp, ref_logp, entropy,
    sampling_logp [N]; is_ratio [N] or [B, 1]; advantages [B]. See kernels/README.md."""
    check_epilogue_inputs(ref_logp, entropy, p)
    seqs = Sequences.from_cu_seqlens(cu_seqlens, logp.shape[0])
    mask = mask.float()
    adv = advantages.float()  # [B]
    keep = entropy_keep_mask(entropy, mask, p.top_entropy_quantile)
    ref = None if ref_logp is None else ref_logp.float()
    isr = row_is_ratio(is_ratio, seqs)
    sequence_level = p.importance_sampling_level == "sequence"
    with torch.enable_grad():  # also inside autograd.Function.forward, where grad mode is off
        leaf = logp.detach().float().requires_grad_(True)
        old = leaf.detach() if old_logp is None else old_logp.float()
        phi, opsm = _sequence_factors(leaf.detach(), old, mask, adv, isr, sampling_logp, seqs, p)  # [B] or None
        policy_keep = keep if opsm is None else opsm[seqs.index] * (1.0 if keep is None else keep)
        log_ratio = leaf - old  # [N]
        if sequence_level:
            seq_log_ratio = seqs.sums(log_ratio * mask) / seqs.sums(mask).clamp(min=1.0)  # [B]
            log_ratio = seq_log_ratio[seqs.index]  # [N]
        loss, sums = objective_terms(leaf, log_ratio, adv[seqs.index], ref, None if phi is not None else isr,
                                     policy_keep, token_weights(mask, seqs, p), mask, p,
                                     None if phi is None else phi[seqs.index])
        (g,) = torch.autograd.grad(loss, leaf)
    if sequence_level:
        sums.update(flag_sums(torch.exp(seq_log_ratio), adv, 1.0, p))
    else:
        sums.update(flag_sums(torch.exp(log_ratio), adv[seqs.index], mask, p))
    entropy_sum = None if entropy is None else (entropy.float() * mask).sum()
    metrics = finish_metrics(sums, mask.sum(), seqs.count, sequence_level, entropy_sum)
    if phi is not None:
        metrics["vespo/phi_seq_mean"] = phi.mean()  # TRL: over every sequence
    loss, g_entropy = loss.detach(), None
    if p.entropy_coef is not None:
        bonus, g_entropy, bonus_metrics = entropy_bonus(entropy, mask if keep is None else keep, p.entropy_coef)
        metrics.update({"policy_loss": loss, **bonus_metrics})
        loss = loss - bonus
    return loss, g, g_entropy, metrics
