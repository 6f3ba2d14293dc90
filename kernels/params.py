"""The scalar settings of the GRPO loss, carried into the kernels as one small dataclass."""
from __future__ import annotations

import math
from dataclasses import dataclass

from .loss_spec import LOSS_RULES, LossRule, fixed_divisor

IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")
SCALE_REWARDS = ("group", "batch", "none")

# SAPO's soft-gate temperatures, TRL's defaults (GRPOConfig.sapo_temperature_pos / _neg).
SAPO_TEMPERATURE_POS = 1.0
SAPO_TEMPERATURE_NEG = 1.05


@dataclass(frozen=True)
class LogitTransform:
    """How the logits a model samples from are made from the head's output h·Wᵀ, per element of a logits tile:

        u = s_l · (s_h · h·Wᵀ + b)            hidden_scale s_h, logit_scale s_l
        z = c · tanh(u / c) / τ               softcap c (None: z = u / τ), sampling temperature τ

    The order is the models' own (kernels/README.md maps each family to its factors): a scale on the hidden state
    before the head (MiniCPM3), a scale on the logits (Granite's 1/logits_scaling, Cohere's logit_scale,
    FalconH1's lm_head_multiplier), then tanh soft-capping (Gemma2/3), then TRL's division by the temperature.
    Without a softcap every factor folds into the logits GEMM's alpha/beta and the per-row gradient coefficient:
    no pass over a tile beyond the plain path's."""

    temperature: float = 1.0
    logit_scale: float = 1.0
    hidden_scale: float = 1.0
    softcap: float | None = None

    @property
    def gemm_scale(self) -> float:
        """Factor on h·Wᵀ in the tile's first form: z itself without a softcap, u / c with one."""
        return self.hidden_scale * self.logit_scale / (self.softcap or self.temperature)

    @property
    def bias_scale(self) -> float:
        """Factor on b in the tile's first form (as gemm_scale)."""
        return self.logit_scale / (self.softcap or self.temperature)

    @property
    def cap_scale(self) -> float:
        """c / τ: z = cap_scale · tanh(u / c) (softcap only)."""
        return self.softcap / self.temperature

    @property
    def grad_scale(self) -> float:
        """∂z/∂(h·Wᵀ) = s_h·s_l/τ, times 1 − tanh²(u/c) = 1 − (z/cap_scale)² per element (softcap)."""
        return self.hidden_scale * self.logit_scale / self.temperature

    def bias_grad_(self, grad_bias):
        """Sweeps form db with the h·Wᵀ chain factor grad_scale; b's own is s_l/τ = grad_scale / s_h."""
        if grad_bias is not None and self.hidden_scale != 1.0:
            grad_bias.div_(self.hidden_scale)
        return grad_bias


# VESPO's clamps, TRL's (GRPOTrainer.get_gamma_weights): per-token log ratios to ±20, the sequence's log weight
# and log importance-sampling ratios to [log 1e-8, 20], λ to ≥ 1e-4.
VESPO_LOG_RATIO_MAX = 20.0
VESPO_LOG_W_MIN = math.log(1e-8)
VESPO_LAMBDA_MIN = 1e-4


@dataclass(frozen=True)
class VespoParams:
    """VESPO's gamma weight φ(w) = e^λ · w^k · e^(−λw) (φ(1) = 1), k and λ by the sign of the advantage
    (A ≥ 0: pos); TRL's GRPOConfig.vespo_* defaults."""

    k_pos: float = 2.0
    lambda_pos: float = 3.0
    k_neg: float = 3.0
    lambda_neg: float = 2.0


@dataclass(frozen=True)
class GRPOLossParams:
    loss_type: str = "dapo"
    beta: float = 0.0
    epsilon_low: float = 0.2
    epsilon_high: float = 0.2
    delta: float | None = None  # cap on the unclipped ratio (two-sided clipping), None = off
    logits: LogitTransform = LogitTransform()  # temperature and the model's logit post-processing
    importance_sampling_level: str = "token"
    use_bias_correction_kl: bool = False
    max_completion_length: int | None = None  # dr_grpo's constant normalizer
    num_items_in_batch: float | None = None  # dapo/cispo normalizer; None = the mask's sum
    top_entropy_quantile: float = 1.0  # < 1 trains only on tokens at or above this entropy quantile (TRL)
    sapo_temperature_pos: float = SAPO_TEMPERATURE_POS
    sapo_temperature_neg: float = SAPO_TEMPERATURE_NEG
    vespo: VespoParams = VespoParams()
    off_policy_mask_threshold: float | None = None  # drop A < 0 sequences whose mean KL exceeds it (TRL's OPSM)
    entropy_coef: float | None = None  # loss −= coef · token-mean entropy (None: no bonus term, no bonus metrics)

    @property
    def token_local(self) -> bool:
        """Whether each token's dL/dlogp depends on that token alone (and no entropy gradient): the torch single
        pass's case. Sequence-level ratios, VESPO's weight and the off-policy mask need whole sequences, the
        entropy quantile the whole batch, the entropy bonus a gradient through the entropy."""
        return (self.importance_sampling_level == "token" and self.top_entropy_quantile >= 1.0
                and self.rule.objective != "vespo" and self.off_policy_mask_threshold is None
                and self.entropy_coef is None)

    @property
    def rule(self) -> LossRule:
        """The loss type's objective and reduction (loss_spec.LOSS_RULES)."""
        return LOSS_RULES[self.loss_type]

    def fixed_divisor(self, n_seq: int) -> float | None:
        """The divisor of Σ m·L when the mask does not set it (loss_spec.fixed_divisor)."""
        return fixed_divisor(self.rule, n_seq, self.max_completion_length, self.num_items_in_batch)
