"""The scalar settings of the GRPO loss, carried into the kernels as one small dataclass."""
from __future__ import annotations

from dataclasses import dataclass

from .loss_spec import LOSS_RULES, LossRule, fixed_divisor

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

    @property
    def rule(self) -> LossRule:
        """The loss type's objective and reduction (loss_spec.LOSS_RULES)."""
        return LOSS_RULES[self.loss_type]

    def fixed_divisor(self, n_seq: int) -> float | None:
        """The divisor of Σ m·L when the mask does not set it (loss_spec.fixed_divisor)."""
        return fixed_divisor(self.rule, n_seq, self.max_completion_length, self.num_items_in_batch)
