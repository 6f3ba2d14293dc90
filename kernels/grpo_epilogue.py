"""Phase 2 in PyTorch: the GRPO loss from token logprobs, its gradient dL/dlogp, and TRL's metrics.

Everything here is O(N) on packed rows: sequence b owns rows cu_seqlens[b]:cu_seqlens[b+1] (a padded [B, T]
batch is the case cu_seqlens = T·arange(B + 1)), and per-sequence quantities (grpo's mean, the sequence-level
ratio) are segment sums over those rows (`Sequences`). The loss is written once, as `objective_terms`, on rows,
so the same code serves the whole batch (this module's `grpo_epilogue`) and row tiles (`grpo_single_pass`);
autograd on a detached copy of logp gives g = dL/dlogp. Semantics are TRL's `GRPOTrainer._compute_loss`
(trl 1.16):
    L = −min(r·A, clip(r, 1−ε_low, 1+ε_high)·A)      (r capped at delta in the first term when set)
    cispo: L = −sg(min(r, ε_high))·A·logp;  sapo: L = −σ(t(r−1))·4/t·A, t = t_pos if A > 0 else t_neg
    L *= entropy mask (top_entropy_quantile), L *= is_ratio, L += β·k3(ref, logp) (·r if use_bias_correction_kl)
and the reduction per loss_type is a per-token weight w, so that loss = Σ w·L (see `token_weights`).
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from .loss_spec import SEQUENCE_MEAN
from .params import GRPOLossParams


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


def policy_loss(logp, ratio, adv, p: GRPOLossParams) -> torch.Tensor:
    """Per-token policy loss before masks and KL. ratio and adv broadcast against logp."""
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
    if p.rule.objective == "sapo":
        return {}
    low = (ratio < 1 - p.epsilon_low) & (adv < 0)
    high = (ratio > 1 + p.epsilon_high) & (adv > 0)
    return {"clip_ratio/low_mean": low.float(), "clip_ratio/high_mean": high.float(),
            "clip_ratio/region_mean": (low | high).float()}


def objective_terms(logp, log_ratio, adv, ref, is_ratio, keep, w, mask, p: GRPOLossParams):
    """Σ w·L (differentiable in logp) and the masked KL sum (detached).

    All [n] rows (a tile of tokens, or the batch); keep, ref, is_ratio may be None.
    Returns (loss_sum, sums) with sums["kl"] = Σ m·KL when β ≠ 0.
    """
    ratio = torch.exp(log_ratio)
    per_token = policy_loss(logp, ratio, adv, p)
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


def entropy_keep_mask(entropy, mask, quantile: float):
    """TRL's get_high_entropy_mask: 1 for tokens at or above the (1 − quantile) entropy quantile."""
    if quantile >= 1.0:
        return None
    return ((entropy * mask >= entropy_threshold(entropy, mask, quantile)) & mask.bool()).float()


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


def row_is_ratio(is_ratio, seqs: Sequences):
    """is_ratio [N] or per sequence [B, 1] -> [N] fp32 (None stays None)."""
    if is_ratio is None:
        return None
    return is_ratio.float().reshape(-1)[seqs.index] if is_ratio.dim() == 2 else is_ratio.float()


def grpo_epilogue(logp, mask, advantages, old_logp, ref_logp, is_ratio, entropy, cu_seqlens, p: GRPOLossParams):
    """logp [N] fp32 on packed rows (sequence b at cu_seqlens[b]:cu_seqlens[b+1]) -> (loss 0-d fp32,
    g_logp [N] fp32, metrics). mask, old_logp, ref_logp, entropy [N]; is_ratio [N] or [B, 1]; advantages [B].
    See kernels/README.md."""
    check_epilogue_inputs(ref_logp, entropy, p)
    seqs = Sequences.from_cu_seqlens(cu_seqlens, logp.shape[0])
    mask = mask.float()
    adv = advantages.float()  # [B]
    keep = entropy_keep_mask(entropy, mask, p.top_entropy_quantile)
    ref = None if ref_logp is None else ref_logp.float()
    sequence_level = p.importance_sampling_level == "sequence"
    with torch.enable_grad():  # also inside autograd.Function.forward, where grad mode is off
        leaf = logp.detach().float().requires_grad_(True)
        old = leaf.detach() if old_logp is None else old_logp.float()
        log_ratio = leaf - old  # [N]
        if sequence_level:
            seq_log_ratio = seqs.sums(log_ratio * mask) / seqs.sums(mask).clamp(min=1.0)  # [B]
            log_ratio = seq_log_ratio[seqs.index]  # [N]
        loss, sums = objective_terms(leaf, log_ratio, adv[seqs.index], ref, row_is_ratio(is_ratio, seqs), keep,
                                     token_weights(mask, seqs, p), mask, p)
        (g,) = torch.autograd.grad(loss, leaf)
    if sequence_level:
        sums.update(flag_sums(torch.exp(seq_log_ratio), adv, 1.0, p))
    else:
        sums.update(flag_sums(torch.exp(log_ratio), adv[seqs.index], mask, p))
    entropy_sum = None if entropy is None else (entropy.float() * mask).sum()
    metrics = finish_metrics(sums, mask.sum(), seqs.count, sequence_level, entropy_sum)
    return loss.detach(), g, metrics
