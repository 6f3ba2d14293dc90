"""The one home of the GRPO loss rules: each loss type's objective and reduction, and a run's loss spec.

Semantics are TRL 1.16's (`trl/trainer/grpo_trainer.py`, `_compute_loss`). With m the mask, L the per-token
loss and B the micro-batch's sequences, a reduction normalises Σ m·L of one micro-batch as:
    SEQUENCE_MEAN      mean over sequences of Σ_t m·L / max(1, Σ_t m)
    MASK_TOTAL         Σ m·L / max(1, Σ m)
    COMPLETION_BUDGET  Σ m·L / (B · max_completion_length)
    SEQUENCE_SUM       Σ m·L / B                            (mean over sequences of each one's token sum)
    ITEMS              Σ m·L / max(1, num_items_in_batch)   (Σ m when num_items_in_batch is not given)
and the trainer then divides by gradient_accumulation_steps for every reduction but ITEMS, whose
num_items_in_batch already is one accumulation window's token count (`LossSpec`).

Adding a loss type is one row of `LOSS_RULES` (and, if it brings a new objective, that objective in both
epilogues). The float64 reference (reference.py) states the same math again on purpose, without importing it.
No torch here: `fastrl.config` reads LOSS_TYPES without importing torch.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

SEQUENCE_MEAN, MASK_TOTAL, COMPLETION_BUDGET, ITEMS = "sequence_mean", "mask_total", "completion_budget", "items"
SEQUENCE_SUM = "sequence_sum"
# The per-token loss L: "clip" is PPO's −min(r·A, clip(r)·A); "cispo" −sg(min(r, ε_high))·A·logp;
# "sapo" −σ(t(r−1))·4/t·A; "vespo" −sg(φ(w))·A·logp with φ VESPO's per-sequence gamma weight
# (grpo_epilogue.policy_loss and the Triton epilogue's _policy_terms).
OBJECTIVES = ("clip", "cispo", "sapo", "vespo")


@dataclass(frozen=True)
class LossRule:
    objective: str  # one of OBJECTIVES
    reduction: str  # SEQUENCE_MEAN, MASK_TOTAL, COMPLETION_BUDGET or ITEMS


LOSS_RULES = {
    "grpo": LossRule("clip", SEQUENCE_MEAN),
    "bnpo": LossRule("clip", MASK_TOTAL),
    "dr_grpo": LossRule("clip", COMPLETION_BUDGET),
    "dapo": LossRule("clip", ITEMS),
    "cispo": LossRule("cispo", ITEMS),
    "sapo": LossRule("sapo", SEQUENCE_MEAN),
    "luspo": LossRule("clip", SEQUENCE_SUM),  # TRL 1.16: (per_token_loss * mask).sum(-1).mean()
    "vespo": LossRule("vespo", ITEMS),
}
LOSS_TYPES = tuple(LOSS_RULES)


def fixed_divisor(rule: LossRule, n_seq: int, max_completion_length: int | None,
                  num_items_in_batch: float | None) -> float | None:
    """The divisor of Σ m·L when it does not depend on the mask, else None (SEQUENCE_MEAN normalises per
    sequence; MASK_TOTAL, and ITEMS without num_items_in_batch, divide by max(1, Σ m), which the caller sums)."""
    if rule.reduction == COMPLETION_BUDGET:
        return float(n_seq * max_completion_length)
    if rule.reduction == SEQUENCE_SUM:
        return float(n_seq)
    if rule.reduction == ITEMS and num_items_in_batch is not None:
        return max(1.0, float(num_items_in_batch))
    return None


@dataclass(frozen=True)
class LossSpec:
    """A run's loss, built once from a GRPOConfig (and the world size): the keyword arguments of
    `fused_linear_grpo_loss` and the scaling of each micro-batch's loss for gradient accumulation."""

    loss_type: str = "dapo"
    beta: float = 0.0
    epsilon: float = 0.2
    epsilon_high: float | None = None
    delta: float | None = None
    temperature: float = 1.0
    importance_sampling_level: str = "token"
    use_bias_correction_kl: bool = False
    top_entropy_quantile: float = 1.0
    max_completion_length: int | None = None
    off_policy_mask_threshold: float | None = None
    vespo_k_pos: float = 2.0
    vespo_lambda_pos: float = 3.0
    vespo_k_neg: float = 3.0
    vespo_lambda_neg: float = 2.0
    gradient_accumulation_steps: int = 1
    steps_per_generation: int = 1
    world_size: int = 1

    @classmethod
    def from_config(cls, args, world_size: int | None = None) -> "LossSpec":
        """From GRPOConfig's fields of the same names; world_size defaults to args.world_size."""
        values = {f.name: getattr(args, f.name) for f in fields(cls) if f.name != "world_size"}
        return cls(**values, world_size=args.world_size if world_size is None else world_size)

    @property
    def rule(self) -> LossRule:
        return LOSS_RULES[self.loss_type]

    def num_items_in_batch(self, generation_tokens: float) -> float | None:
        """ITEMS: TRL's normaliser from the generation batch's global loss-token count, per process and rescaled
        to one accumulation window (× gradient_accumulation_steps / steps_per_generation); clamped at 1 first,
        as TRL does, so an all-masked batch gives a zero loss. None for the other reductions."""
        if self.rule.reduction != ITEMS:
            return None
        tokens = max(1.0, float(generation_tokens)) / self.world_size
        return tokens * self.gradient_accumulation_steps / self.steps_per_generation

    @property
    def micro_batch_scale(self) -> float:
        """The factor on each micro-batch's loss: 1 / gradient_accumulation_steps (TRL), 1 for ITEMS."""
        return 1.0 if self.rule.reduction == ITEMS else 1.0 / self.gradient_accumulation_steps

    def token_budget_scale(self, micro: tuple[int, float], window: tuple[int, float]) -> float:
        """The factor on one token-budget micro-batch's loss, (sequences, loss tokens) of it and of the optimizer
        step's window, making the step's loss independent of how the window was grouped into micro-batches:
        SEQUENCE_MEAN, COMPLETION_BUDGET, SEQUENCE_SUM
                                          micro sequences / window sequences: a mean over the window's sequences,
                                          TRL's 1 / gradient_accumulation_steps when micro-batches are equal;
        MASK_TOTAL                        max(1, micro tokens) / max(1, window tokens): bnpo over the window
                                          (TRL's bnpo divides by each micro-batch's own count, which depends on the
                                          grouping; the two agree when micro-batches hold equal token counts);
        ITEMS                             1: num_items_in_batch is the same for every micro-batch already."""
        reduction = self.rule.reduction
        if reduction in (SEQUENCE_MEAN, COMPLETION_BUDGET, SEQUENCE_SUM):
            return micro[0] / window[0]
        if reduction == MASK_TOTAL:
            return max(1.0, micro[1]) / max(1.0, window[1])
        return 1.0

    @property
    def micro_batch_entropy_scale(self) -> float:
        """The factor on each micro-batch's entropy bonus: 1 / gradient_accumulation_steps for every loss type
        (TRL: the bonus is a token mean, never normalised like the policy term)."""
        return 1.0 / self.gradient_accumulation_steps

    @staticmethod
    def token_budget_entropy_scale(micro: tuple[int, float], window: tuple[int, float]) -> float:
        """The factor on one token-budget micro-batch's entropy bonus, (sequences, loss tokens) of it and of the
        window: max(1, micro tokens) / max(1, window tokens). The step's bonus is then the micro-batches' bonus
        means weighted by their loss tokens (the window's token mean; TRL's mean of micro-batch means when the
        micro-batches hold equal token counts)."""
        return max(1.0, micro[1]) / max(1.0, window[1])

    def loss_kwargs(self, generation_tokens: float, entropy_coef: float | None = None, loss_scale: float = 1.0,
                    entropy_scale: float = 1.0) -> dict:
        """Keyword arguments of `fused_linear_grpo_loss` for a micro-batch of this generation batch. With an
        entropy bonus (entropy_coef, None = off), the kernel's coefficient makes loss × loss_scale carry
        entropy_coef × entropy_scale × the micro-batch's token-mean entropy (TRL: loss − coef·H / accumulation)."""
        kwargs = {f.name: getattr(self, f.name) for f in fields(self)
                  if f.name not in ("gradient_accumulation_steps", "steps_per_generation", "world_size")}
        coef = None if entropy_coef is None else entropy_coef * entropy_scale / loss_scale
        return {**kwargs, "num_items_in_batch": self.num_items_in_batch(generation_tokens), "entropy_coef": coef}
