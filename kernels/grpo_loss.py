"""`fused_linear_grpo_loss`: the GRPO loss straight from hidden states and the lm_head, forward and backward.

The loss is the last op in training, so its gradient is computed inside `forward` (phase 3 runs right after the
epilogue) and `backward` only scales the stored gradients, in place, by the incoming scalar.
"""
from __future__ import annotations

from dataclasses import replace

import torch

from .advantages import normalized_advantages
from .backend import phases, resolve_backend
from .checks import validate_grpo_inputs
from .grpo_single_pass import grpo_single_pass, single_pass_fits


def _three_phase(impl, hidden, weight, targets, bias, inputs, advantages, mask, cu_seqlens, needs):
    """Phase 1, the epilogue and phase 3 over the N packed rows. hidden [N, H]; mask [N]."""
    p = inputs.params
    lse, logp, entropy = impl.forward_sweep(hidden, weight, targets, bias, p.logits, True)
    loss, g, g_entropy, metrics = impl.grpo_epilogue(logp, mask, advantages, inputs.old_logprobs,
                                                     inputs.ref_logprobs, inputs.is_ratio, entropy, cu_seqlens, p,
                                                     inputs.sampling_logprobs)
    grads = (None, None, None)
    if any(needs):  # with an entropy bonus its dL/dH joins dL/dlogp in the same sweep (none at coefficient 0)
        grads = impl.grad_sweep(hidden, weight, targets, bias, p.logits, lse, g, g_entropy if p.entropy_coef else None,
                                logp, entropy, *needs)
    return loss, metrics, grads


class FusedLinearGRPOLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, mask, advantages, inputs, cu_seqlens, backend, metrics_out):
        # hidden [B, T, H] or packed [N, H] -> rows [N, H]; targets, mask and inputs' per-token tensors [N];
        # cu_seqlens [B + 1] places the sequences among the rows; advantages [B] fp32
        rows, ids = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2])
        p = inputs.params
        if backend == "torch" and p.token_local and single_pass_fits(rows, weight, p.logits):
            loss, metrics, *grads = grpo_single_pass(rows, weight, ids, bias, mask, advantages, inputs.old_logprobs,
                                                     inputs.ref_logprobs, inputs.is_ratio, p, *needs,
                                                     cu_seqlens=cu_seqlens)
        else:
            loss, metrics, grads = _three_phase(phases(backend), rows, weight, ids, bias, inputs, advantages, mask,
                                                cu_seqlens, needs)
        metrics_out.update(metrics)
        dh, dw, db = grads
        ctx.save_for_backward(*(g if g is not None else torch.empty(0) for g in grads))
        ctx.has = tuple(g is not None for g in grads)
        ctx.applied = None  # the factor backward has scaled the stored gradients by
        ctx.shapes_dtypes = ((hidden.shape, hidden.dtype), (weight.shape, weight.dtype),
                             None if bias is None else (bias.shape, bias.dtype))
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        # The gradients were computed in forward for an incoming 1. Scaling them out of place would hold a second
        # dW [V, H] and dh [N, H] at the peak, so they are scaled in place and returned as they are. A repeated
        # backward (retain_graph) rescales by the ratio to the factor applied last time (`ctx.applied`); after
        # a backward with grad_loss = 0 the stored gradients are gone, so a further backward is not supported.
        # On CUDA the factor stays on the device (no sync); on the CPU a factor of exactly 1 skips the pass.
        factor = grad_loss if ctx.applied is None else grad_loss / ctx.applied
        ctx.applied = grad_loss.detach().clone()
        skip = factor.device.type == "cpu" and float(factor) == 1.0
        out = []
        for g, has, sd in zip(ctx.saved_tensors, ctx.has, ctx.shapes_dtypes):
            if not has:
                out.append(None)
                continue
            if not skip:
                g.data.mul_(factor)  # .data: its own version counter, so a retained graph can unpack g again
            out.append(g.view(sd[0]).to(sd[1]))
        return (*out, None, None, None, None, None, None, None)


def _as_rows(mask, inputs):
    """A padded batch's per-token mask, old/ref logprobs and is_ratio [B, T] -> rows [B·T] ([B, 1] stays), and
    its cu_seqlens = T·arange(B + 1): from here on the padded batch is the packed case with equal lengths."""
    batch, length = mask.shape
    flat = lambda t: None if t is None else t.reshape(-1)  # noqa: E731
    isr = inputs.is_ratio
    is_ratio = isr if isr is None or isr.shape[-1] == 1 else flat(isr)
    cu_seqlens = torch.arange(batch + 1, device=mask.device) * length
    return flat(mask), replace(inputs, old_logprobs=flat(inputs.old_logprobs), ref_logprobs=flat(inputs.ref_logprobs),
                               is_ratio=is_ratio, sampling_logprobs=flat(inputs.sampling_logprobs)), cu_seqlens


def fused_linear_grpo_loss(hidden, weight, targets, mask, advantages=None, *, rewards=None, num_generations=None,
                           scale_rewards="group", old_logprobs=None, ref_logprobs=None, bias=None, beta=0.0,
                           epsilon=0.2, epsilon_high=None, delta=None, temperature=1.0, loss_type="dapo",
                           importance_sampling_level="token", use_bias_correction_kl=False,
                           max_completion_length=None, num_items_in_batch=None, is_ratio=None,
                           top_entropy_quantile=1.0, logit_transform=None, cu_seqlens=None, sampling_logprobs=None,
                           off_policy_mask_threshold=None, entropy_coef=None, vespo_k_pos=2.0, vespo_lambda_pos=3.0,
                           vespo_k_neg=3.0, vespo_lambda_neg=2.0, backend="auto"):
    """GRPO loss of completions from the policy's final hidden states, never materializing [B·T, V] logits.

    Padded: hidden [B, T, H] (aligned with targets [B, T]: no shift inside), mask [B, T]. Packed (padding-free):
    hidden [N, H] holds only the completions' rows, sequence b's at cu_seqlens[b]:cu_seqlens[b+1]; targets,
    mask, old/ref logprobs and is_ratio are [N] (is_ratio may be [B, 1]); no padding row is swept. weight [V, H];
    advantages [B], or rewards [B] with num_generations (group-normalized here, TRL's rule). Semantics, argument
    names and metric names follow TRL's GRPOTrainer._compute_loss (see kernels/grpo_epilogue.py). Returns
    (loss, metrics) with metrics a dict of detached scalars: entropy, kl (beta != 0), clip_ratio/low_mean,
    /high_mean, /region_mean (cispo_clip_ratio; vespo/phi_seq_mean). logit_transform: the model's logit
    post-processing (a LogitTransform: scales, softcap), None = plain h·Wᵀ + b.
    TRL's loss-side options: vespo_* (loss_type="vespo"'s gamma weight; is_ratio enters it); off_policy_mask_threshold
    (drops A < 0 sequences whose mean sampling_logprobs − logp, or old_logprobs − logp without them, exceeds it);
    entropy_coef c (None = off): loss −= c·(token-mean entropy over the policy term's tokens), its gradient through
    the entropy in the same sweep, metrics policy_loss (before the bonus), entropy_bonus/entropy and /tokens.
    """
    inputs = validate_grpo_inputs(
        hidden, weight, targets, mask, advantages, rewards=rewards, num_generations=num_generations,
        scale_rewards=scale_rewards, old_logprobs=old_logprobs, ref_logprobs=ref_logprobs, bias=bias, beta=beta,
        epsilon=epsilon, epsilon_high=epsilon_high, delta=delta, temperature=temperature, loss_type=loss_type,
        importance_sampling_level=importance_sampling_level, use_bias_correction_kl=use_bias_correction_kl,
        max_completion_length=max_completion_length, num_items_in_batch=num_items_in_batch, is_ratio=is_ratio,
        top_entropy_quantile=top_entropy_quantile, logit_transform=logit_transform, cu_seqlens=cu_seqlens,
        sampling_logprobs=sampling_logprobs, off_policy_mask_threshold=off_policy_mask_threshold,
        entropy_coef=entropy_coef, vespo_k_pos=vespo_k_pos, vespo_lambda_pos=vespo_lambda_pos,
        vespo_k_neg=vespo_k_neg, vespo_lambda_neg=vespo_lambda_neg)
    if advantages is None:
        advantages = normalized_advantages(rewards, num_generations, scale_rewards)  # checked above
    if cu_seqlens is None:
        mask, inputs, cu_seqlens = _as_rows(mask, inputs)
    metrics: dict = {}
    loss = FusedLinearGRPOLoss.apply(hidden, weight, bias, targets, mask.float(), advantages.float(), inputs,
                                     cu_seqlens.long(), resolve_backend(backend, hidden.device), metrics)
    return loss, metrics
