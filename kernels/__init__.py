"""Fused linear GRPO kernels: token logprobs and the GRPO loss from hidden states, never holding the logits.

Installed as `fastrl.kernels`. See README.md in this folder for the layout and the internal contract.
"""
from .advantages import group_advantages
from .grpo_loss import fused_linear_grpo_loss
from .logprobs import fused_linear_logprobs

__all__ = ["fused_linear_logprobs", "group_advantages", "fused_linear_grpo_loss"]
