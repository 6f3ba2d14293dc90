"""`fused_linear_grpo_loss`: the GRPO loss straight from hidden states and the lm_head, forward and backward.

The loss is the last op in training, so its gradient is computed inside `forward` (phase 3 runs right after the
epilogue) and `backward` only scales the stored gradients, in place, by the incoming scalar.
"""
from __future__ import annotations

from dataclasses import replace
from typing import NamedTuple

import torch

from .advantages import normalized_advantages
from .backend import phases, resolve_backend
from .checks import validate_grpo_inputs
from .grpo_single_pass import grpo_single_pass


class RowLayout(NamedTuple):
    """Where the rows the sweeps visit sit in the epilogue's [B, T] layout: row i is entry index[i] of the
    flattened [B, T] (index None: the rows are all of [B, T], in order, as in the padded form)."""
    shape: tuple[int, int]
    index: torch.Tensor | None  # [N] int64

    def to_padded(self, rows: torch.Tensor) -> torch.Tensor:
        """[N] per-row values -> [B, T], zeros where no row sits (padding, which the mask excludes)."""
        if self.index is None:
            return rows.view(self.shape)
        out = torch.zeros(self.shape[0] * self.shape[1], dtype=rows.dtype, device=rows.device)
        return out.index_copy_(0, self.index, rows).view(self.shape)

    def to_rows(self, padded: torch.Tensor) -> torch.Tensor:
        """[B, T] -> [N] at the rows' places."""
        return padded.reshape(-1) if self.index is None else padded.reshape(-1)[self.index]


def packed_layout(cu_seqlens: torch.Tensor) -> RowLayout:
    """Packed rows (sequence b owns rows cu_seqlens[b]:cu_seqlens[b+1]) placed at [b, row − cu_seqlens[b]] of a
    [B, T] layout, T the longest sequence."""
    cu = cu_seqlens.long()
    lengths = cu.diff()  # [B]
    width = max(1, int(lengths.max())) if lengths.numel() else 1
    seq = torch.repeat_interleave(torch.arange(lengths.numel(), device=cu.device), lengths)  # [N]
    return RowLayout((lengths.numel(), width), seq * width + torch.arange(seq.numel(), device=cu.device) - cu[seq])


def _three_phase(impl, hidden, weight, targets, bias, inputs, advantages, mask, layout, needs):
    """Phase 1 over the N rows, phase 2 over the [B, T] layout, phase 3 over the N rows. hidden [N, H]."""
    p = inputs.params
    lse, logp, entropy = impl.forward_sweep(hidden, weight, targets, bias, p.logits, True)
    loss, g, metrics = impl.grpo_epilogue(layout.to_padded(logp), mask, advantages, inputs.old_logprobs,
                                          inputs.ref_logprobs, inputs.is_ratio, layout.to_padded(entropy), p)
    grads = (None, None, None)
    if any(needs):
        grads = impl.grad_sweep(hidden, weight, targets, bias, p.logits, lse, layout.to_rows(g).contiguous(),
                                None, logp, entropy, *needs)
    return loss, metrics, grads


class FusedLinearGRPOLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, mask, advantages, inputs, layout, backend, metrics_out):
        # hidden [B, T, H] or packed [N, H] -> rows [N, H], targets -> [N]; mask [B, T] (the epilogue's layout,
        # `layout` places the rows in it); advantages [B] fp32
        rows, ids = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2])
        p = inputs.params
        if backend == "torch" and p.importance_sampling_level == "token" and p.top_entropy_quantile >= 1.0:
            loss, metrics, *grads = grpo_single_pass(rows, weight, ids, bias, mask, advantages, inputs.old_logprobs,
                                                     inputs.ref_logprobs, inputs.is_ratio, p, *needs,
                                                     index=layout.index)
        else:
            loss, metrics, grads = _three_phase(phases(backend), rows, weight, ids, bias, inputs, advantages, mask,
                                                layout, needs)
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


def _padded_token_inputs(mask, inputs, layout: RowLayout):
    """Packed per-row mask, old/ref logprobs and is_ratio [N] -> the epilogue's [B, T] layout ([B, 1] stays)."""
    pad = lambda t: None if t is None else layout.to_padded(t)  # noqa: E731
    isr = inputs.is_ratio
    return pad(mask.float()), replace(inputs, old_logprobs=pad(inputs.old_logprobs),
                                      ref_logprobs=pad(inputs.ref_logprobs),
                                      is_ratio=isr if isr is None or isr.dim() == 2 else pad(isr))


def fused_linear_grpo_loss(hidden, weight, targets, mask, advantages=None, *, rewards=None, num_generations=None,
                           scale_rewards="group", old_logprobs=None, ref_logprobs=None, bias=None, beta=0.0,
                           epsilon=0.2, epsilon_high=None, delta=None, temperature=1.0, loss_type="dapo",
                           importance_sampling_level="token", use_bias_correction_kl=False,
                           max_completion_length=None, num_items_in_batch=None, is_ratio=None,
                           top_entropy_quantile=1.0, logit_transform=None, cu_seqlens=None, backend="auto"):
    """GRPO loss of completions from the policy's final hidden states, never materializing [B·T, V] logits.

    Padded: hidden [B, T, H] (aligned with targets [B, T]: no shift inside), mask [B, T]. Packed (padding-free):
    hidden [N, H] holds only the completions' rows, sequence b's at cu_seqlens[b]:cu_seqlens[b+1]; targets,
    mask, old/ref logprobs and is_ratio are [N] (is_ratio may be [B, 1]); no padding row is swept. weight [V, H];
    advantages [B], or rewards [B] with num_generations (group-normalized here, TRL's rule). Semantics, argument
    names and metric names follow TRL's GRPOTrainer._compute_loss (see kernels/grpo_epilogue.py). Returns
    (loss, metrics) with metrics a dict of detached scalars: entropy, kl (beta != 0), clip_ratio/low_mean,
    /high_mean, /region_mean. logit_transform: the model's logit post-processing (a LogitTransform: scales,
    softcap), None = plain h·Wᵀ + b.
    """
    inputs = validate_grpo_inputs(
        hidden, weight, targets, mask, advantages, rewards=rewards, num_generations=num_generations,
        scale_rewards=scale_rewards, old_logprobs=old_logprobs, ref_logprobs=ref_logprobs, bias=bias, beta=beta,
        epsilon=epsilon, epsilon_high=epsilon_high, delta=delta, temperature=temperature, loss_type=loss_type,
        importance_sampling_level=importance_sampling_level, use_bias_correction_kl=use_bias_correction_kl,
        max_completion_length=max_completion_length, num_items_in_batch=num_items_in_batch, is_ratio=is_ratio,
        top_entropy_quantile=top_entropy_quantile, logit_transform=logit_transform, cu_seqlens=cu_seqlens)
    if advantages is None:
        advantages = normalized_advantages(rewards, num_generations, scale_rewards)  # checked above
    if cu_seqlens is None:
        layout = RowLayout(tuple(mask.shape), None)
    else:
        layout = packed_layout(cu_seqlens)
        mask, inputs = _padded_token_inputs(mask, inputs, layout)
    metrics: dict = {}
    loss = FusedLinearGRPOLoss.apply(hidden, weight, bias, targets, mask.float(), advantages.float(), inputs,
                                     layout, resolve_backend(backend, hidden.device), metrics)
    return loss, metrics
