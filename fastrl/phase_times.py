"""Where an optimizer step's time goes: wall seconds per phase, logged with every step as `time/<phase>`.

Always on rather than behind a switch: a phase costs two `time.perf_counter()` calls (~0.1 µs each) and is
entered a few times per micro-batch, against steps of milliseconds (a tiny model) to minutes (a 0.5B model on
CPU); a switch would only add a second code path. On an accelerator, kernels run after the host has moved on, so
each phase ends with a device synchronize there (a handful per micro-batch, where the loop already waits once per
micro-batch for the loss value); without it the time would land in whichever later phase first waits.

PHASES lists every name the trainer times; a step that has no such phase (no reference model, no generation
this step) logs no key for it. Times of one step add up to its `step_time` less the bookkeeping between phases.
"""
from __future__ import annotations

import contextlib
import time
from collections import defaultdict

import torch

PHASES = ("weight_push", "generation", "rewards", "old_logprobs", "ref_logprobs", "forward", "loss", "backward",
          "optimizer")


class PhaseTimes:
    def __init__(self, device: torch.device):
        self._sync = torch.cuda.synchronize if device.type == "cuda" else None
        self.seconds: dict[str, float] = defaultdict(float)

    @contextlib.contextmanager
    def phase(self, name: str):
        """Add the wall time of the `with` body to phase `name` (one of PHASES)."""
        if name not in PHASES:
            raise ValueError(f"phase: expected one of {PHASES}, got {name!r}")
        start = time.perf_counter()
        try:
            yield
        finally:
            if self._sync is not None:
                self._sync()
            self.seconds[name] += time.perf_counter() - start

    def reset(self) -> None:
        self.seconds = defaultdict(float)

    def metrics(self) -> dict[str, float]:
        """{"time/<phase>": seconds} for the phases timed since the last reset, in PHASES order."""
        return {f"time/{name}": self.seconds[name] for name in PHASES if name in self.seconds}
