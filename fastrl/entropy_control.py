"""The entropy bonus's coefficient over a run: static (`entropy_coef`) or Skywork-OR1's adaptive controller
(`use_adaptive_entropy`), with TRL 1.16's semantics (`GRPOTrainer._compute_loss`, `_save_checkpoint`):

- the bonus is on when entropy_coef != 0 or the controller is on (it stays on at a coefficient of 0, to recover);
- every micro-batch of a step applies the coefficient set at the end of the previous step, and the controller
  applies it only while the last measured entropy is at or below entropy_target (inf before the first step: off);
- at the end of each training step the window's entropy (Σ H·m over every micro-batch and process / Σ m, m the
  bonus's tokens) moves the coefficient by entropy_coef_delta: up when at or below the target, down otherwise,
  kept in [entropy_coef_min, entropy_coef_max];
- its state (TRL's entropy_ctrl_state.json keys) is saved with each checkpoint's trainer state.
Evaluation applies the coefficient and never updates it.
"""
from __future__ import annotations

import math


class EntropyControl:
    def __init__(self, args):
        self.args = args
        self.coef = float(args.entropy_coef)
        self.last_entropy = math.inf  # the window entropy of the last step: none measured yet
        self._window = [0.0, 0.0]  # this step's Σ H·m and Σ m

    @property
    def enabled(self) -> bool:
        return self.args.entropy_coef != 0.0 or self.args.use_adaptive_entropy

    def applied_coef(self) -> float | None:
        """The coefficient this micro-batch's loss carries; None when the bonus is off for the run."""
        if not self.enabled:
            return None
        if self.args.use_adaptive_entropy and not self.last_entropy <= self.args.entropy_target:
            return 0.0
        return self.coef

    def observe(self, entropy_sum: float, tokens: float) -> None:
        """One micro-batch's bonus tokens: Σ H·m and Σ m (this process's)."""
        self._window[0] += entropy_sum
        self._window[1] += tokens

    def end_step(self, world_sum: float, world_tokens: float) -> None:
        """The step's window totals over every process -> the next step's coefficient (adaptive only)."""
        self._window = [0.0, 0.0]
        if not self.args.use_adaptive_entropy:
            return
        a = self.args
        entropy = world_sum / max(1.0, world_tokens)
        if entropy <= a.entropy_target:
            self.coef = min(self.coef + a.entropy_coef_delta, a.entropy_coef_max)
        else:
            self.coef = max(self.coef - a.entropy_coef_delta, a.entropy_coef_min)
        self.last_entropy = entropy

    @property
    def window(self) -> tuple[float, float]:
        return self._window[0], self._window[1]

    def state_dict(self) -> dict:
        """TRL's entropy_ctrl_state.json keys; fastrl keeps them in the checkpoint's trainer state."""
        return {"entropy_coef": self.coef, "last_world_entropy": self.last_entropy}

    def load_state_dict(self, state: dict | None) -> None:
        if state is not None:
            self.coef, self.last_entropy = float(state["entropy_coef"]), float(state["last_world_entropy"])
