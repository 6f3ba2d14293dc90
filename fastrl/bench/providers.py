"""Who is measured: fastrl and its peers, each a function of the same inputs (cases.make_inputs).

A provider turns (case, inputs) into the scalar that forward computes and backward differentiates:
- logprobs: token logprobs and entropy of hidden @ weight.T / τ; the scalar is Σ logp (entropy is computed, as
  trainers log it, but carries no gradient).
- grpo_loss: the GRPO loss (case.loss_type, beta, epsilon, epsilon_high; token-level importance sampling).

`unavailable(case, device)` returns why a provider cannot run here (it is then listed as skipped with that
reason); `applies(operation)` says whether the provider implements an operation at all (no row if not).
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Callable

import torch

from .cases import KernelCase


# ---------------------------------------------------------------------------------------------------------------
# The materializing path, what TRL does without kernels: the whole [N, V] logits in the input dtype.

def materialized_logprobs(hidden, weight, targets, temperature: float = 1.0, bias=None):
    """logp [..] and entropy [..] (no grad) through the full logits, in the input dtype."""
    logits = hidden @ weight.T  # [B, T, H] @ [H, V] -> [B, T, V]
    if bias is not None:
        logits = logits + bias
    logits = logits / temperature
    logps = torch.log_softmax(logits, dim=-1)  # [B, T, V]
    logp = logps.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    with torch.no_grad():
        entropy = -(logps.exp() * logps).sum(-1)
    return logp, entropy


def grpo_loss_from_logprobs(logp, mask, advantages, old_logprobs, ref_logprobs, *, beta, epsilon, epsilon_high,
                            loss_type, max_completion_length=None):
    """TRL's token-level GRPO loss (GRPOTrainer._compute_loss) from per-token logprobs [B, T], in logp's dtype.
    Returns (loss, metrics)."""
    old = logp.detach() if old_logprobs is None else old_logprobs.to(logp.dtype)
    ratio = torch.exp(logp - old)  # [B, T]
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + epsilon_high)
    adv = advantages.to(logp.dtype).unsqueeze(1)  # [B, 1]
    per_token = -torch.min(ratio * adv, clipped * adv)
    metrics = {}
    if beta != 0.0:
        d = ref_logprobs.to(logp.dtype) - logp
        kl = torch.exp(d) - d - 1
        per_token = per_token + beta * kl
        metrics["kl"] = ((kl * mask).sum() / mask.sum().clamp(min=1)).detach()
    m = mask.to(per_token.dtype)
    if loss_type == "grpo":
        loss = ((per_token * m).sum(-1) / m.sum(-1).clamp(min=1)).mean()
    elif loss_type in ("bnpo", "dapo"):
        loss = (per_token * m).sum() / m.sum().clamp(min=1)
    elif loss_type == "dr_grpo":
        loss = (per_token * m).sum() / (per_token.shape[0] * max_completion_length)
    else:
        raise ValueError(f"loss_type: the materializing baseline implements grpo, bnpo, dapo, dr_grpo; got "
                         f"{loss_type!r}")
    with torch.no_grad():
        low = (ratio < 1 - epsilon) & (adv < 0)
        high = (ratio > 1 + epsilon_high) & (adv > 0)
        denom = mask.sum().clamp(min=1)
        metrics["clip_ratio/low_mean"] = (low * mask).sum() / denom
        metrics["clip_ratio/high_mean"] = (high * mask).sum() / denom
        metrics["clip_ratio/region_mean"] = ((low | high) * mask).sum() / denom
    return loss, metrics


def _grpo_kwargs(case: KernelCase) -> dict:
    return dict(beta=case.beta, epsilon=case.epsilon, epsilon_high=case.epsilon_high, loss_type=case.loss_type,
                max_completion_length=case.T)


# ---------------------------------------------------------------------------------------------------------------
# Providers

@dataclass(frozen=True)
class Provider:
    name: str
    operations: tuple[str, ...]
    build: Callable[[KernelCase], Callable[[dict], torch.Tensor]]  # case -> (inputs -> scalar)
    check: Callable[[KernelCase, torch.device], str | None]  # reason it cannot run here, or None
    note: str = ""

    def applies(self, operation: str) -> bool:
        return operation in self.operations

    def unavailable(self, case: KernelCase, device) -> str | None:
        return self.check(case, torch.device(device))


def _missing(module: str) -> str | None:
    return None if importlib.util.find_spec(module) is not None else f"{module} is not installed"


def _fastrl(backend: str):
    def build(case: KernelCase):
        from fastrl.kernels import fused_linear_grpo_loss, fused_linear_logprobs

        if case.operation == "logprobs":
            def run(x):
                logp, _entropy = fused_linear_logprobs(x["hidden"], x["weight"], x["targets"],
                                                       temperature=case.temperature, with_entropy=True,
                                                       backend=backend)
                return logp.sum()
            return run

        def run(x):
            loss, _metrics = fused_linear_grpo_loss(
                x["hidden"], x["weight"], x["targets"], x["mask"], x["advantages"], old_logprobs=x["old_logprobs"],
                ref_logprobs=x["ref_logprobs"], beta=case.beta, epsilon=case.epsilon,
                epsilon_high=case.epsilon_high, temperature=case.temperature, loss_type=case.loss_type,
                max_completion_length=case.T, backend=backend)
            return loss
        return run
    return build


def _check_triton(case, device):
    if device.type != "cuda":
        return "needs a CUDA device (the Triton interpreter on CPU checks correctness, it is not a timing)"
    return _missing("triton")


def _materialize(case: KernelCase):
    def run(x):
        logp, _entropy = materialized_logprobs(x["hidden"], x["weight"], x["targets"], case.temperature)
        if case.operation == "logprobs":
            return logp.sum()
        loss, _metrics = grpo_loss_from_logprobs(logp, x["mask"], x["advantages"], x["old_logprobs"],
                                                 x["ref_logprobs"], **_grpo_kwargs(case))
        return loss
    return run


def _trl_chunked(case: KernelCase):
    """TRL's own path in GRPOTrainer (trl 1.16 `fused_lm_head`): ChunkedLogProbFunction over [4096, 32768] tiles
    (Triton on CUDA, its torch fallback elsewhere) for logp + entropy, then the loss in torch."""
    from trl.kernels import ChunkedLogProbFunction

    chunk = trl_chunk_size()

    def logprobs(x):
        h = x["hidden"]
        logp, entropy, *_ = ChunkedLogProbFunction.apply(h.reshape(-1, h.shape[-1]), x["weight"], None,
                                                         x["targets"].reshape(-1), case.temperature, chunk, None,
                                                         1.0, ("entropy",))
        return logp.view(x["targets"].shape), entropy

    def run(x):
        logp, _entropy = logprobs(x)
        if case.operation == "logprobs":
            return logp.sum()
        loss, _metrics = grpo_loss_from_logprobs(logp, x["mask"], x["advantages"], x["old_logprobs"],
                                                 x["ref_logprobs"], **_grpo_kwargs(case))
        return loss
    return run


def trl_chunk_size() -> int:
    """The vocabulary tile TRL's GRPOTrainer passes to ChunkedLogProbFunction (`_CHUNKED_LOGPROB_CHUNK_SIZE` in
    trl/trainer/utils.py), read from the installed source: importing trl.trainer.utils pulls in transformers and
    accelerate, which would add ~10 s to every worker process."""
    import ast
    import importlib.util

    spec = importlib.util.find_spec("trl.trainer.utils")
    if spec is not None and spec.origin:
        with open(spec.origin) as f:
            for node in ast.parse(f.read()).body:
                if (isinstance(node, ast.Assign) and len(node.targets) == 1
                        and getattr(node.targets[0], "id", None) == "_CHUNKED_LOGPROB_CHUNK_SIZE"
                        and isinstance(node.value, ast.Constant)):
                    return int(node.value.value)
    from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE

    return int(_CHUNKED_LOGPROB_CHUNK_SIZE)


def _check_trl(case, device):
    return _missing("trl")


def _liger(compiled: bool):
    def build(case: KernelCase):
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

        module = LigerFusedLinearGRPOLoss(
            beta=case.beta, compiled=compiled, use_ref_model=case.beta != 0.0, epsilon_low=case.epsilon,
            epsilon_high=case.epsilon_high, loss_type=case.loss_type, max_completion_length=case.T,
            temperature=case.temperature)

        def run(x):
            out = module(x["hidden"], x["weight"], x["targets"], x["mask"], x["advantages"],
                         ref_per_token_logps=x["ref_logprobs"], old_per_token_logps=x["old_logprobs"])
            return out[0] if isinstance(out, tuple) else out
        return run
    return build


def _check_liger(case, device):
    return _missing("liger_kernel")


def _cce(case: KernelCase):
    """Cut Cross Entropy's own kernels (impl="cce"): per-token cross entropy = -logp; no entropy output."""
    from cut_cross_entropy import linear_cross_entropy

    def run(x):
        h = x["hidden"] / case.temperature if case.temperature != 1.0 else x["hidden"]
        nll = linear_cross_entropy(h, x["weight"], x["targets"], reduction="none", impl="cce")
        return -nll.sum()
    return run


def _check_cce(case, device):
    missing = _missing("cut_cross_entropy")
    if missing:
        return missing
    if device.type != "cuda":
        return ("cut-cross-entropy's kernels are Triton, CUDA only; its other impl (torch_compile) materializes "
                "the logits, so it would not measure CCE")
    return None


PROVIDERS: dict[str, Provider] = {p.name: p for p in (
    Provider("fastrl-triton", ("logprobs", "grpo_loss"), _fastrl("triton"), _check_triton,
             "fastrl's Triton kernels"),
    Provider("fastrl-torch", ("logprobs", "grpo_loss"), _fastrl("torch"), lambda c, d: None,
             "fastrl's tiled PyTorch path (the CPU path)"),
    Provider("torch-materialize", ("logprobs", "grpo_loss"), lambda c: _materialize(c), lambda c, d: None,
             "full [N, V] logits in plain PyTorch: TRL without kernels"),
    Provider("trl-chunked", ("logprobs", "grpo_loss"), _trl_chunked, _check_trl,
             "trl.kernels.ChunkedLogProbFunction + TRL's loss in torch"),
    Provider("liger", ("grpo_loss",), _liger(False), _check_liger, "LigerFusedLinearGRPOLoss, eager"),
    Provider("liger-compiled", ("grpo_loss",), _liger(True), _check_liger,
             "LigerFusedLinearGRPOLoss(compiled=True): its loss math through torch.compile"),
    Provider("cce", ("logprobs",), _cce, _check_cce, "cut-cross-entropy (logprob only, no entropy)"),
)}


def providers_for(operation: str, names: list[str] | None = None) -> list[Provider]:
    chosen = [PROVIDERS[n] for n in names] if names else list(PROVIDERS.values())
    return [p for p in chosen if p.applies(operation)]
