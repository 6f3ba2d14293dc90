"""Per-phase step times of a training run, the same categories for fastrl and TRL (the e2e suite's breakdown).

fastrl times its own phases (fastrl.phase_times, logged as `time/<phase>`); TRL's GRPOTrainer is timed from
outside by wrapping the methods each phase runs in (TRL 1.16's names), each call's time counted exclusive of the
wrapped calls inside it:

    _generate                              -> generation
    _calculate_rewards                     -> rewards
    _get_per_token_logps_and_entropies     -> old/ref logprobs (called while scoring a batch) or policy forward
                                              (called by compute_loss: the decoder, then logits + log_softmax)
    compute_loss (less the forward above)  -> loss
    training_step (less everything above)  -> backward (accelerate's backward, and the step's small glue)
    torch optimizer steps                  -> optimizer (a global optimizer hook; fastrl's includes clipping)

A step runs from the end of one optimizer step to the end of the next (the first from train()'s start), for
both trainers; `other` is what no phase covers (batch assembly, clipping in TRL, logging).
"""
from __future__ import annotations

import contextlib
import functools
import time

CATEGORIES = ("generation", "weight push", "rewards", "old/ref logprobs", "policy forward", "loss", "backward",
              "optimizer", "other")
FASTRL = {"generation": "generation", "weight_push": "weight push", "rewards": "rewards",
          "old_logprobs": "old/ref logprobs", "ref_logprobs": "old/ref logprobs", "forward": "policy forward",
          "loss": "loss", "backward": "backward", "optimizer": "optimizer"}  # fastrl.phase_times.PHASES -> category


class StepPhases:
    """Records optimizer-step ends (both trainers) and, for TRL, the exclusive time of each wrapped call."""

    def __init__(self):
        self.step_ends: list[float] = []
        self.calls: list[tuple[str, float, float]] = []  # (category, end time, exclusive seconds)
        self._stack: list[list[float]] = []  # per open call: [start, seconds of nested wrapped calls]
        self._in_loss = False
        self.started = time.perf_counter()

    @contextlib.contextmanager
    def optimizer_steps(self):
        """Note the end of every torch optimizer step taken inside the block (a global post-step hook)."""
        from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

        def pre(*_):
            self._stack.append([time.perf_counter(), 0.0])

        def post(*_):
            self._close("optimizer")
            self.step_ends.append(time.perf_counter())

        handles = [register_optimizer_step_pre_hook(pre), register_optimizer_step_post_hook(post)]
        self.started = time.perf_counter()
        try:
            yield self
        finally:
            for h in handles:
                h.remove()

    def _close(self, category: str) -> None:
        start, nested = self._stack.pop()
        total = time.perf_counter() - start
        if self._stack:
            self._stack[-1][1] += total
        self.calls.append((category, start + total, total - nested))

    def _wrap(self, obj, name: str, category) -> None:
        inner = getattr(obj, name)

        @functools.wraps(inner)
        def timed(*args, **kwargs):
            self._stack.append([time.perf_counter(), 0.0])
            try:
                return inner(*args, **kwargs)
            finally:
                self._close(category() if callable(category) else category)

        setattr(obj, name, timed)

    def wrap_trl(self, trainer) -> None:
        """Time TRL's GRPOTrainer phases on this instance (see the module docstring)."""
        compute_loss = trainer.compute_loss

        def loss_then_flag(*args, **kwargs):
            self._in_loss = True
            try:
                return compute_loss(*args, **kwargs)
            finally:
                self._in_loss = False

        trainer.compute_loss = loss_then_flag
        self._wrap(trainer, "compute_loss", "loss")
        self._wrap(trainer, "_generate", "generation")
        self._wrap(trainer, "_calculate_rewards", "rewards")
        self._wrap(trainer, "_get_per_token_logps_and_entropies",
                   lambda: "policy forward" if self._in_loss else "old/ref logprobs")
        self._wrap(trainer, "training_step", "backward")

    def per_step(self, fastrl_log: list[dict] | None = None) -> list[dict[str, float]]:
        """One {category: seconds} per optimizer step, `other` included; phases from fastrl's `time/<phase>` log
        entries when given (fastrl), else from the wrapped calls (TRL)."""
        bounds = [self.started] + self.step_ends
        steps = []
        for i, (start, end) in enumerate(zip(bounds, bounds[1:])):
            seconds = dict.fromkeys(CATEGORIES, 0.0)
            if fastrl_log is not None:
                for key, value in fastrl_log[i].items():
                    if key.startswith("time/"):
                        seconds[FASTRL[key[len("time/"):]]] += value
            else:
                for category, at, exclusive in self.calls:
                    if start < at <= end:
                        seconds[category] += exclusive
            seconds["other"] = max(0.0, (end - start) - sum(seconds.values()))
            steps.append({"step_s": end - start, **seconds})
        return steps


def write_phase_chart(rows: list[dict], path: str) -> str | None:
    """A stacked bar per (case, trainer) of the p50 milliseconds of each phase (the e2e rows' `phase/<category>`
    metrics) -> PNG at `path`; None when the rows hold no phases."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bars: dict[tuple[str, str], dict[str, float]] = {}
    for r in rows:
        if r["metric"].startswith("phase/") and r["p50"] is not None:
            bars.setdefault((r["config"].get("size", ""), r["provider"]), {})[r["metric"][len("phase/"):]] = r["p50"]
    if not bars:
        return None
    labels = [f"{size}\n{trainer}" for size, trainer in bars]
    fig, ax = plt.subplots(figsize=(9, 1.9 + 0.55 * len(bars)))
    left = [0.0] * len(bars)
    colors = plt.get_cmap("tab10")
    for i, category in enumerate(CATEGORIES):
        widths = [phases.get(category, 0.0) / 1e3 for phases in bars.values()]
        ax.barh(labels, widths, left=left, label=category, color=colors(i))
        left = [a + b for a, b in zip(left, widths)]
    ax.invert_yaxis()
    ax.set_xlabel("seconds per step (p50 of the timed steps)")
    ax.legend(ncol=5, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.45 if len(bars) < 3 else -0.2))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
