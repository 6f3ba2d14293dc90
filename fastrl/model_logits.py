"""How each model family turns its head's output into logits, and the check that the fused path reproduces them.

The fused kernels compute logits from the decoder's final hidden state and the lm_head weight. Some families
post-process: `logit_transform` reads which factors a model applies (from its config, in its forward's order)
into a `LogitTransform` the kernels fold into every logits tile. `check_fused_logits` then compares the fused
path with the model's own forward on a small probe batch, so a family nobody has mapped can not train on the
wrong logits: it stops with a ValueError naming the model class and the size of the error.

The check runs once, when the trainer is built, and is not repeated during training: what it tests (which
post-processing the forward applies, and that the decoder's last hidden state is what the head reads) belongs
to the architecture and config, which training does not change, while the weights it does change enter both paths
alike; generator/trainer agreement as the weights move is watched every step by the vLLM backend's
`rollout/logprob_abs_diff`. Its blind spot: post-processing that is nearly the identity at the probe's logits (a
softcap far above them, on a freshly initialised model) passes, and at such logits it also barely matters.
"""
from __future__ import annotations

import math

import torch

from fastrl.kernels import LogitTransform, fused_linear_logprobs
from fastrl.kernels.forward_sweep import logits_tile

# model_type -> the factors its causal LM's forward applies after the decoder (read from transformers 5.24's
# modeling files; kernels/README.md has the table). Only these families: a config attribute a family's forward
# does not read (a Llama config given final_logit_softcapping, say) must not change fastrl's logits either.
_GRANITE = lambda c: {"logit_scale": 1.0 / c.logits_scaling}  # noqa: E731  logits / logits_scaling
_GEMMA_CAP = lambda c: {"softcap": c.final_logit_softcapping}  # noqa: E731  c·tanh(logits / c), c None = off
FAMILY_FACTORS = {
    **{t: _GEMMA_CAP for t in ("beam", "gemma2", "gemma3_text", "gemma3n", "gemma3n_text", "gemma4", "gemma4_text",
                               "gemma4_unified", "gemma4_unified_text", "nanochat", "vaultgemma")},
    "recurrent_gemma": lambda c: {"softcap": c.logits_soft_cap},
    **{t: _GRANITE for t in ("granite", "granite_swa", "granitemoe", "granitemoe_swa", "granitemoehybrid",
                             "granitemoeshared")},
    "hyperclovax": lambda c: {"logit_scale": c.logits_scaling},  # logits * logits_scaling (MuP)
    **{t: (lambda c: {"logit_scale": c.logit_scale}) for t in ("cohere", "cohere2", "cohere2_moe")},
    "cohere_compass_text": lambda c: {"logit_scale": c.logit_scale if c.logit_scale is not None else 1.0},
    "falcon_h1": lambda c: {"logit_scale": c.lm_head_multiplier},  # lm_head(h) * lm_head_multiplier
    "minicpm3": lambda c: {"hidden_scale": 1.0 / c.logits_scaling},  # lm_head(h / logits_scaling)
    "inkling_text": lambda c: {"hidden_scale": 1.0 / c.logits_mup_width_multiplier},
}


def logit_transform(model: torch.nn.Module) -> LogitTransform:
    """The LogitTransform (temperature 1) of a transformers causal LM, or of the model under a PEFT wrapper (a
    multimodal family's text config for those that nest one)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = inner.config.get_text_config(decoder=True) if hasattr(inner.config, "get_text_config") else inner.config
    factors = FAMILY_FACTORS.get(config.model_type, lambda c: {})(config)
    return LogitTransform(**{k: float(v) for k, v in factors.items() if v is not None})


# The check's tolerance: fp32 differences between the two paths (GEMM blocking, attention kernels) measured here
# are ≤ 1e-5 nats at logits of std 8; a missed factor or softcap moves logprobs by nats. In 16-bit the model's own
# logits are rounded at the dtype's epsilon relative to their size, so the bound grows with it.
FP32_TOLERANCE = 1e-3


def _tolerance(dtype: torch.dtype, logit_size: float) -> float:
    if dtype in (torch.float32, torch.float64):
        return FP32_TOLERANCE
    return FP32_TOLERANCE + 4 * torch.finfo(dtype).eps * (1.0 + logit_size)


def _probe_ids(vocab: int, device, batch: int = 2, length: int = 12) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab, (batch, length), generator=g).to(device)  # [B, L]


@torch.no_grad()
def check_fused_logits(model: torch.nn.Module, head, hidden_fn) -> float:
    """Fused logprobs (and one logits tile) vs log_softmax of the model's own forward on a probe batch; returns the
    largest logprob error, raises ValueError beyond the tolerance. `head` = (weight [V, H], bias), `hidden_fn(model,
    ids, mask, prompt_width)` the trainer's hidden-state function (policy.completion_hidden)."""
    name = type(model.get_base_model() if hasattr(model, "get_base_model") else model).__name__
    was_training = model.training
    model.eval()  # no dropout in either path
    try:
        ids = _probe_ids(head.weight.shape[0], head.weight.device)
        mask = torch.ones_like(ids)
        try:
            hidden = hidden_fn(model, ids, mask, 1)  # [B, L-1, H]: positions 0 .. L-2
        except Exception as e:  # noqa: BLE001 - whatever stops the fused path's decoder call, named for the user
            raise ValueError(f"model: {name} does not give fastrl its decoder's final hidden states "
                             f"({type(e).__name__}: {e})") from e
        if hidden.shape[-1] != head.weight.shape[1]:  # e.g. ELECTRA: a projection between decoder and head
            raise ValueError(f"model: {name} does not give fastrl its decoder's final hidden states (width "
                             f"{hidden.shape[-1]}, its head reads {head.weight.shape[1]})")
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=False).logits
    finally:
        model.train(was_training)
    logits = logits[:, :-1].float()  # [B, L-1, V]
    t = logit_transform(model)
    targets = ids[:, 1:]
    ours = fused_linear_logprobs(hidden, head.weight.to(hidden.dtype), targets, logit_transform=t,
                                 bias=None if head.bias is None else head.bias.to(hidden.dtype))
    theirs = torch.log_softmax(logits, -1).gather(-1, targets[..., None]).squeeze(-1)
    rows = hidden.reshape(-1, hidden.shape[-1])
    tile = logits_tile(rows, head.weight.to(rows.dtype), None if head.bias is None else head.bias.to(rows.dtype), t,
                       torch.empty(rows.shape[0], head.weight.shape[0], device=rows.device))  # [B·(L-1), V]
    size = float(logits.abs().max())
    tol = _tolerance(hidden.dtype, size)
    logp_err = float((ours - theirs).abs().max())
    logit_err = float((tile - logits.reshape(tile.shape)).abs().max())
    if not (logp_err <= tol and logit_err <= tol * max(1.0, size)) or not math.isfinite(logp_err):
        raise ValueError(
            f"model: {name}'s own logits differ from the fused path's (max |Δ logprob| = {logp_err:.3g}, max |Δ logit|"
            f" = {logit_err:.3g}, tolerance {tol:.2g} at logits up to {size:.3g}; {t}): its forward post-processes "
            "the logits in a way fastrl does not know (add it to fastrl.model_logits.FAMILY_FACTORS), or its "
            "decoder's last hidden state is not what its head reads")
    return logp_err
