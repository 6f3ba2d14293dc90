"""Ground truth: the materializing computation in float64, written the obvious way.

It holds the full [N, V] logits and lets autograd do the calculus, so it shares no code with the fused paths it
checks (forward_sweep/grad_sweep/grpo_epilogue and their Triton twins). It reads its keyword arguments itself
(`_settings`: defaults, epsilon_high, the normalizer's inputs); the kernels' validate_grpo_inputs only makes bad
input fail here as it fails there, its result unused. Use it on small inputs only.
With `dtype=` set to the inputs' own dtype it is also "PyTorch's plain materializing path at that precision",
the baseline low-precision tests compare the fused paths' error against.
"""
from __future__ import annotations

import math
from dataclasses import replace

import torch

from .checks import validate_grpo_inputs
from .params import GRPOLossParams, LogitTransform, VespoParams


def _logits(hidden, weight, bias, t: LogitTransform, dtype):
    """The model's order: hidden scale, head, logit scale, softcap, then 1/τ. [N, H] @ [H, V] -> [N, V] in dtype."""
    z = (hidden.to(dtype) * t.hidden_scale) @ weight.to(dtype).T
    if bias is not None:
        z = z + bias.to(dtype)
    z = z * t.logit_scale
    if t.softcap is not None:
        z = t.softcap * torch.tanh(z / t.softcap)
    return z / t.temperature


def reference_logprobs(hidden, weight, targets, bias=None, temperature=1.0, with_entropy=False,
                       dtype=torch.float64, logit_transform=None):
    """log softmax(z) at `targets` (and the entropy), z = (h Wᵀ + b)/τ or the logits of `logit_transform` at
    temperature τ, computed in `dtype`, differentiable."""
    t = replace(logit_transform or LogitTransform(), temperature=float(temperature))
    logp_all = torch.log_softmax(_logits(hidden, weight, bias, t, dtype), dim=-1)  # [..., V]
    logp = logp_all.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)
    if not with_entropy:
        return logp
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy


def _nanstd_unbiased(x: torch.Tensor, dim=None) -> torch.Tensor:
    mean = torch.nanmean(x, dim=dim, keepdim=True)
    count = (~torch.isnan(x)).sum(dim=dim, keepdim=True)
    var = torch.nansum((x - mean) ** 2, dim=dim, keepdim=True) / (count - 1)
    return var.sqrt().squeeze(dim) if dim is not None else var.sqrt().reshape(())


def reference_group_advantages(rewards, num_generations, scale_rewards="group", eps=1e-4):
    """(r − group mean) / (std + eps), NaN rewards excluded and given advantage 0; Bessel-corrected std (TRL)."""
    r = rewards.double()
    groups = r.view(-1, num_generations)  # [P, G]
    centered = (groups - torch.nanmean(groups, dim=1, keepdim=True)).reshape(-1)
    if scale_rewards == "group":
        std = _nanstd_unbiased(groups, dim=1).repeat_interleave(num_generations)
    elif scale_rewards == "batch":
        std = _nanstd_unbiased(r).expand_as(r)
    else:
        std = None
    adv = centered if std is None else centered / (std + eps)
    return torch.nan_to_num(adv, nan=0.0)


def _gamma_weights(log_ratio, adv, mask, is_ratio, p: GRPOLossParams):
    """VESPO's φ(w) per sequence [B, 1], TRL's get_gamma_weights restated (detached): w = exp of the masked sum of
    per-token log ratios (each clamped to ±20) plus the log importance-sampling ratios, clamped to
    [log 1e-8, 20]; φ = exp(λ + k·log w − λ·w), k and λ by the sign of A (A ≥ 0: pos), non-finite φ -> 0."""
    log_ratio = log_ratio.detach()
    seq = (torch.clamp(log_ratio, -20.0, 20.0) * mask).sum(-1, keepdim=True)  # [B, 1]
    if is_ratio is not None:  # TRL sums over every position; padding carries ratio 1 there (log 0), here mask 0
        seq = seq + (torch.clamp(torch.log(is_ratio), math.log(1e-8), 20.0) * mask).sum(-1, keepdim=True)
    log_w = torch.clamp(seq, math.log(1e-8), 20.0)
    v, a = p.vespo, adv.unsqueeze(-1)
    k = torch.where(a >= 0, v.k_pos, v.k_neg)
    lam = torch.where(a >= 0, v.lambda_pos, v.lambda_neg).clamp(min=1e-4)
    return torch.exp(lam + k * log_w - lam * torch.exp(log_w)).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)


def _off_policy_mask(logp, sampling, adv, mask, threshold):
    """TRL's get_off_policy_mask (DeepSeek-V3.2's off-policy sequence mask) [B, 1]: keep a sequence when A ≥ 0 or
    its masked mean of (sampling − logp), NaN counted as 0, is at most the threshold."""
    kl = torch.nan_to_num(sampling - logp.detach(), nan=0.0)
    mean_kl = (kl * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1.0)
    return ((adv.unsqueeze(-1) >= 0) | (mean_kl <= threshold)).to(mask.dtype)


def _per_token_loss(logp, old, adv, mask, p: GRPOLossParams, is_ratio=None):
    """TRL's per-token policy loss, the ratio used for clip metrics and VESPO's φ [B, 1] (else None), in the
    obvious form."""
    log_ratio = logp - old
    phi = _gamma_weights(log_ratio, adv, mask, is_ratio, p) if p.loss_type == "vespo" else None
    if p.importance_sampling_level == "sequence":
        log_ratio = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    ratio = torch.exp(log_ratio)  # [B, T] or [B, 1]
    a = adv.unsqueeze(-1)
    if phi is not None:
        return -phi * a * logp, ratio, phi
    if p.loss_type == "cispo":
        return -torch.clamp(ratio, max=p.epsilon_high).detach() * a * logp, ratio, None
    if p.loss_type == "sapo":
        t = torch.where(a > 0, p.sapo_temperature_pos, p.sapo_temperature_neg)
        return -torch.sigmoid(t * (ratio - 1)) * 4 / t * a, ratio, None
    clipped = torch.clamp(ratio, 1 - p.epsilon_low, 1 + p.epsilon_high)
    capped = ratio if p.delta is None else torch.clamp(ratio, max=p.delta)
    return -torch.min(capped * a, clipped * a), ratio, None


def _reduce(per_token, mask, p: GRPOLossParams):
    """TRL's reduction per loss_type, written out here on purpose: the production code's single home of these
    rules (loss_spec.py) is what this checks, so it must not be imported."""
    total = (per_token * mask).sum()
    if p.loss_type in ("grpo", "sapo"):
        return ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    if p.loss_type == "bnpo":
        return total / mask.sum().clamp(min=1.0)
    if p.loss_type == "dr_grpo":
        return total / (mask.shape[0] * p.max_completion_length)
    if p.loss_type == "luspo":
        return (per_token * mask).sum(-1).mean()
    if p.loss_type in ("dapo", "cispo", "vespo"):
        items = mask.sum() if p.num_items_in_batch is None else mask.new_tensor(float(p.num_items_in_batch))
        return total / items.clamp(min=1.0)
    raise ValueError(f"loss_type: the reference does not know {p.loss_type!r}")


def _masked_mean(x, mask):
    if x.shape[-1] == 1:
        return x.mean()
    return (x * mask).sum() / mask.sum().clamp(min=1.0)


def _entropy_mask(entropy, mask, quantile):
    """TRL's get_high_entropy_mask: keep tokens at or above the (1 − quantile) quantile of masked entropies."""
    values = entropy[mask.bool()]
    if values.numel() == 0:
        return torch.zeros_like(mask)
    threshold = torch.quantile(values, 1 - quantile)
    return ((entropy * mask >= threshold) & mask.bool()).to(mask.dtype)


def _unpack(cu_seqlens, hidden, targets, mask, kwargs):
    """Packed rows (sequence b at cu_seqlens[b]:cu_seqlens[b+1]) -> right-padded [B, T] tensors, one sequence at a
    time; is_ratio [B, 1] stays. Padding gets mask 0."""
    bounds = cu_seqlens.tolist()
    width = max([1] + [e - s for s, e in zip(bounds, bounds[1:])])

    def pad(t):
        rows = [t[s:e] for s, e in zip(bounds, bounds[1:])]
        return torch.stack([torch.cat([r, r.new_zeros(width - len(r), *r.shape[1:])]) for r in rows])

    per_token = ("old_logprobs", "ref_logprobs", "sampling_logprobs")
    out = {k: pad(v) if k in per_token and v is not None else v for k, v in kwargs.items()}
    if out.get("is_ratio") is not None and out["is_ratio"].dim() == 1:
        out["is_ratio"] = pad(out["is_ratio"])
    return pad(hidden), pad(targets), pad(mask), out


def reference_grpo_loss(hidden, weight, targets, mask, advantages=None, dtype=torch.float64, **kwargs):
    """Same signature and semantics as `fused_linear_grpo_loss`, materializing in `dtype` (float64 by default).

    Returns (loss, metrics)."""
    kwargs.pop("backend", None)
    validate_grpo_inputs(hidden, weight, targets, mask, advantages, **kwargs)  # bad input fails as the kernels'
    cu_seqlens = kwargs.pop("cu_seqlens", None)
    if cu_seqlens is not None:  # packed rows: lay them out padded, then the padded computation
        hidden, targets, mask, kwargs = _unpack(cu_seqlens, hidden, targets, mask, kwargs)
    p, given = _settings(**kwargs)  # the settings as read here, not as the kernels' validation derives them
    adv = advantages
    if adv is None:
        adv = reference_group_advantages(given["rewards"], given["num_generations"], given["scale_rewards"])
    mask64 = mask.double()
    adv = adv.double()
    logp, entropy = reference_logprobs(hidden, weight, targets, given["bias"], p.logits.temperature, True, dtype,
                                       replace(p.logits, temperature=1.0))
    logp, entropy = logp.double(), entropy.double()  # the loss arithmetic itself is O(B·T): float64 always
    old = logp.detach() if given["old_logprobs"] is None else given["old_logprobs"].double()
    isr = None if given["is_ratio"] is None else given["is_ratio"].double()
    per_token, ratio, phi = _per_token_loss(logp, old, adv, mask64, p, isr)
    if p.off_policy_mask_threshold is not None:  # TRL: sampling logprobs when given, else the old ones
        sampling = old if given["sampling_logprobs"] is None else given["sampling_logprobs"].double()
        per_token = per_token * _off_policy_mask(logp, sampling, adv, mask64, p.off_policy_mask_threshold)
    keep = mask64
    if p.top_entropy_quantile < 1.0:
        keep = mask64 * _entropy_mask(entropy.detach(), mask64, p.top_entropy_quantile)
        per_token = per_token * keep
    if isr is not None and phi is None:  # VESPO folds the ratios into φ instead (TRL)
        per_token = per_token * isr
    metrics = {"entropy": _masked_mean(entropy.detach(), mask64)}
    if p.beta != 0.0:
        d = given["ref_logprobs"].double() - logp
        kl = torch.exp(d) - d - 1
        if p.use_bias_correction_kl:
            kl = kl * ratio
        per_token = per_token + p.beta * kl
        metrics["kl"] = _masked_mean(kl.detach(), mask64)
    loss = _reduce(per_token, mask64, p)
    metrics.update(_clip_metrics(ratio.detach(), adv, mask64, p))
    if phi is not None:
        metrics["vespo/phi_seq_mean"] = phi.mean()
    if p.entropy_coef is not None:  # TRL: loss − coef · (mean entropy over the policy term's tokens)
        bonus = (entropy * keep).sum() / keep.sum().clamp(min=1.0)
        metrics.update({"policy_loss": loss.detach(), "entropy_bonus/entropy": bonus.detach(),
                        "entropy_bonus/tokens": keep.sum()})
        loss = loss - p.entropy_coef * bonus
    return loss, metrics


def _settings(rewards=None, num_generations=None, scale_rewards="group", old_logprobs=None, ref_logprobs=None,
              bias=None, beta=0.0, epsilon=0.2, epsilon_high=None, delta=None, temperature=1.0, loss_type="dapo",
              importance_sampling_level="token", use_bias_correction_kl=False, max_completion_length=None,
              num_items_in_batch=None, is_ratio=None, top_entropy_quantile=1.0, logit_transform=None,
              sampling_logprobs=None, off_policy_mask_threshold=None, entropy_coef=None, vespo_k_pos=2.0,
              vespo_lambda_pos=3.0, vespo_k_neg=3.0, vespo_lambda_neg=2.0,
              backend=None) -> tuple[GRPOLossParams, dict]:
    """fused_linear_grpo_loss's keyword arguments and defaults, read here (not through its validation) ->
    (the scalar settings, the tensors)."""
    params = GRPOLossParams(
        loss_type=loss_type, beta=float(beta), epsilon_low=float(epsilon),
        epsilon_high=float(epsilon if epsilon_high is None else epsilon_high), delta=delta,
        logits=replace(logit_transform or LogitTransform(), temperature=float(temperature)),
        importance_sampling_level=importance_sampling_level, use_bias_correction_kl=bool(use_bias_correction_kl),
        max_completion_length=max_completion_length,
        num_items_in_batch=None if num_items_in_batch is None else float(num_items_in_batch),
        top_entropy_quantile=float(top_entropy_quantile),
        vespo=VespoParams(float(vespo_k_pos), float(vespo_lambda_pos), float(vespo_k_neg), float(vespo_lambda_neg)),
        off_policy_mask_threshold=off_policy_mask_threshold,
        entropy_coef=None if entropy_coef is None else float(entropy_coef))
    return params, {"rewards": rewards, "num_generations": num_generations, "scale_rewards": scale_rewards,
                    "old_logprobs": old_logprobs, "ref_logprobs": ref_logprobs, "bias": bias, "is_ratio": is_ratio,
                    "sampling_logprobs": sampling_logprobs}


def _clip_metrics(ratio, adv, mask, p: GRPOLossParams):
    a = adv.unsqueeze(-1)
    if p.loss_type == "cispo":
        return {"cispo_clip_ratio": _masked_mean(((ratio > p.epsilon_high) & (a > 0)).double(), mask)}
    if p.loss_type in ("sapo", "vespo"):
        return {}
    low = (ratio < 1 - p.epsilon_low) & (a < 0)
    high = (ratio > 1 + p.epsilon_high) & (a > 0)
    return {
        "clip_ratio/low_mean": _masked_mean(low.double(), mask),
        "clip_ratio/high_mean": _masked_mean(high.double(), mask),
        "clip_ratio/region_mean": _masked_mean((low | high).double(), mask),
    }
