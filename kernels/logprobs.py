"""`fused_linear_logprobs`: token logprobs (and entropy) from hidden states, differentiable, no [N, V] logits."""
from __future__ import annotations

import torch

from .backend import phases, resolve_backend
from .checks import check_linear_inputs, check_logit_transform


class FusedLinearLogprobs(torch.autograd.Function):
    """Forward: phase 1. Backward: phase 3 with the incoming dL/dlogp (and dL/dentropy)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, logits, with_entropy, backend):
        # hidden [N, H], weight [V, H], bias [V] | None, targets [N], logits: a LogitTransform
        impl = phases(backend)
        lse, logp, entropy = impl.forward_sweep(hidden, weight, targets, bias, logits, with_entropy)
        # lse [2, N]: row max and log Σ exp(z − max), kept apart (README: internal contract)
        ctx.save_for_backward(hidden, weight, bias, targets, lse, logp, entropy)
        ctx.logits, ctx.with_entropy, ctx.impl = logits, with_entropy, impl
        ctx.set_materialize_grads(False)  # an output nobody differentiates arrives as None, not as zeros
        return (logp, entropy) if with_entropy else logp

    @staticmethod
    def backward(ctx, *grads):
        # grads: (dL/dlogp,) or (dL/dlogp, dL/dentropy); None for an output the loss does not use, so the entropy
        # term of dL/dz (a pass over each [n, V] tile and its log p) is skipped unless the entropy is used.
        hidden, weight, bias, targets, lse, logp, entropy = ctx.saved_tensors
        g_logp = grads[0]
        g_entropy = grads[1] if ctx.with_entropy else None
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        if g_logp is None and g_entropy is None:
            return None, None, None, None, None, None, None
        if g_logp is None:
            g_logp = torch.zeros_like(logp)
        dh, dw, db = ctx.impl.grad_sweep(hidden, weight, targets, bias, ctx.logits, lse, g_logp.float(),
                                         None if g_entropy is None else g_entropy.float(), logp, entropy,
                                         need_h, need_w, need_b and bias is not None)
        cast = lambda g, like: None if g is None else g.to(like.dtype)  # noqa: E731
        return cast(dh, hidden), cast(dw, weight), cast(db, bias), None, None, None, None


def fused_linear_logprobs(hidden, weight, targets, *, bias=None, temperature=1.0, with_entropy=False,
                          logit_transform=None, backend="auto"):
    """log softmax((h Wᵀ + b) / τ)[targets] for hidden [..., H], weight [V, H], targets [...]; with a
    `logit_transform` (a LogitTransform: the model's scales and softcap) log softmax of its logits z instead.

    Returns logp [...] in float32 (and entropy [...] when with_entropy), differentiable in hidden, weight and
    bias. Targets are aligned with hidden (no shift inside). Memory beyond inputs and outputs is O(tile), never
    the [N, V] logits; the backward recomputes each logits tile.
    """
    check_linear_inputs(hidden, weight, targets, bias)
    logits = check_logit_transform(temperature, logit_transform)
    lead = hidden.shape[:-1]
    out = FusedLinearLogprobs.apply(hidden.reshape(-1, hidden.shape[-1]), weight, bias, targets.reshape(-1),
                                    logits, bool(with_entropy),
                                    resolve_backend(backend, hidden.device))
    if with_entropy:
        return out[0].view(lead), out[1].view(lead)
    return out.view(lead)
