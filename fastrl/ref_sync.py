"""Reference-model resets (TR-DPO, arXiv:2404.09656), with TRL's names and semantics.

With `sync_ref_model=True`, after every `ref_model_sync_steps`-th optimizer step (global_step divisible by it,
as TRL's SyncRefModelCallback checks in `on_step_end`), the reference model moves towards the policy:

    ref ← alpha · policy + (1 − alpha) · ref        (alpha = ref_model_mixup_alpha; 1.0 = a hard reset)

The mixing is done in place, parameter by parameter, in the reference's dtype. Only meaningful with beta > 0
(GRPOConfig refuses it otherwise, as TRL does) and without PEFT (the policy and its reference would not hold the
same parameters; TRL refuses that too).

The mixed reference is no longer the initial policy, so it cannot be rebuilt on resume: the trainer saves its
weights in each checkpoint (`reference_state(ref)` / `load_reference_state`).
"""
from __future__ import annotations

import os

import torch

REFERENCE_FILE = "reference_model.pt"


def mix_into_reference(policy: torch.nn.Module, ref: torch.nn.Module, alpha: float) -> None:
    """ref ← alpha · policy + (1 − alpha) · ref, for every parameter pair (same architecture required)."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"ref_model_mixup_alpha: expected a number in [0, 1], got {alpha!r}")
    ref_params, params = list(ref.named_parameters()), list(policy.named_parameters())
    if [n for n, _ in ref_params] != [n for n, _ in params]:
        raise ValueError("sync_ref_model: the policy and the reference model have different parameters")
    with torch.no_grad():
        for (name, ref_param), (_, param) in zip(ref_params, params):
            if ref_param.shape != param.shape:
                raise ValueError(f"sync_ref_model: parameter {name} has shape {tuple(param.shape)} in the policy "
                                 f"but {tuple(ref_param.shape)} in the reference model")
            ref_local, local = _local(ref_param), _local(param)  # FSDP2: both sharded alike, each rank its shard
            ref_local.mul_(1.0 - alpha).add_(local.to(ref_local.device, ref_local.dtype), alpha=alpha)


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of an FSDP2 parameter (a DTensor; possibly in host memory), else the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


def sync_due(args, global_step: int) -> bool:
    """TRL's rule: a sync after optimizer step `global_step` when sync_ref_model and the step is a multiple."""
    return bool(args.sync_ref_model) and global_step > 0 and global_step % args.ref_model_sync_steps == 0


def maybe_sync_reference(args, global_step: int, policy: torch.nn.Module, ref: torch.nn.Module | None) -> bool:
    """Mix the policy into the reference if a sync is due after `global_step`; returns whether it did."""
    if not sync_due(args, global_step) or ref is None:
        return False
    mix_into_reference(policy, ref, args.ref_model_mixup_alpha)
    return True


def check_sync_supported(args, peft_config) -> None:
    if args.sync_ref_model and peft_config is not None:
        raise ValueError("sync_ref_model=True is not supported with peft_config: a PEFT policy has no separate "
                         "reference model to mix into (TRL refuses it too)")


def reference_state(ref: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().clone() for n, p in ref.named_parameters()}


def restore_reference(checkpoint_dir: str, ref: torch.nn.Module | None) -> None:
    """Load the reference weights a checkpoint holds; a checkpoint without them (written before any sync
    setting) leaves the reference as built: the initial policy."""
    path = os.path.join(checkpoint_dir, REFERENCE_FILE)
    if ref is not None and os.path.isfile(path):
        load_reference_state(ref, torch.load(path, map_location="cpu"))


def load_reference_state(ref: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    params = dict(ref.named_parameters())
    if set(params) != set(state):
        raise ValueError("resume_from_checkpoint: the saved reference model does not match this model's parameters")
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)
