"""The scalar settings of the GRPO loss, carried into the kernels as one small dataclass."""
from __future__ import annotations

from dataclasses import dataclass

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo")
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")
SCALE_REWARDS = ("group", "batch", "none")

# SAPO's soft-gate temperatures, TRL's defaults (GRPOConfig.sapo_temperature_pos / _neg).
SAPO_TEMPERATURE_POS = 1.0
SAPO_TEMPERATURE_NEG = 1.05


@dataclass(frozen=True)
class GRPOLossParams:
    loss_type: str = "dapo"
    beta: float = 0.0
    epsilon_low: float = 0.2
    epsilon_high: float = 0.2
    delta: float | None = None  # cap on the unclipped ratio (two-sided clipping), None = off
    temperature: float = 1.0
    importance_sampling_level: str = "token"
    use_bias_correction_kl: bool = False
    max_completion_length: int | None = None  # dr_grpo's constant normalizer
    num_items_in_batch: float | None = None  # dapo/cispo normalizer; None = the mask's sum
    top_entropy_quantile: float = 1.0  # < 1 trains only on tokens at or above this entropy quantile (TRL)
    sapo_temperature_pos: float = SAPO_TEMPERATURE_POS
    sapo_temperature_neg: float = SAPO_TEMPERATURE_NEG

    def normalizer(self, mask_sum: float, batch_size: int) -> float:
        """The global divisor of Σ m·L for the loss types normalized over the whole batch (not grpo/sapo)."""
        if self.loss_type == "bnpo":
            return max(1.0, mask_sum)
        if self.loss_type == "dr_grpo":
            return float(batch_size * self.max_completion_length)
        if self.loss_type in ("dapo", "cispo"):
            n = self.num_items_in_batch if self.num_items_in_batch is not None else mask_sum
            return max(1.0, float(n))
        raise ValueError(f"loss_type {self.loss_type!r} is normalized per sequence, not globally")
