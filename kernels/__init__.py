"""Fused linear GRPO kernels: token logprobs and the GRPO loss from hidden states, never holding the logits.

Installed as `fastrl.kernels`. See README.md in this folder for the layout and the internal contract.
The public functions are imported on first use, so `fastrl.config` can read `loss_spec` without importing torch.
"""
import importlib

_PUBLIC = {"fused_linear_logprobs": ".logprobs", "group_advantages": ".advantages",
           "fused_linear_grpo_loss": ".grpo_loss", "LogitTransform": ".params"}


def __getattr__(name):
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = list(_PUBLIC)
