"""Reward functions whose values depend only on the prompt's row, for tests of difficulty filtering and dynamic
sampling: pass rates and group variances are then exact and known before any sampling.

Importable from a config as "helpers_rowrate:<name>" when tests/ is on sys.path.
"""
from __future__ import annotations

import os


def _positions(ids) -> list[int]:
    """Position of each completion within its row's group: rows arrive as runs of k equal ids."""
    seen: dict = {}
    out = []
    for i in ids:
        out.append(seen.get(i, 0))
        seen[i] = out[-1] + 1
    return out


def row_rate_reward(completions, id, solved, **kwargs):
    """1.0 for the first `solved` completions of each row's group and 0.0 for the others, so a row's pass rate is
    exactly solved / k; None for every completion of a row with solved < 0 (unscorable).

    Test hooks (environment): FASTRL_TEST_SCORE_LOG names a file that gets one line per row scored;
    FASTRL_TEST_CRASH_AT_ID makes the call that would score that row raise before anything is logged."""
    crash_at = os.environ.get("FASTRL_TEST_CRASH_AT_ID")
    if crash_at is not None and int(crash_at) in set(id):
        raise RuntimeError(f"simulated crash at row id {crash_at}")
    log = os.environ.get("FASTRL_TEST_SCORE_LOG")
    if log:
        with open(log, "a") as f:
            f.write("".join(f"{i}\n" for i in dict.fromkeys(id)))
    return [None if s < 0 else float(p < s) for p, s in zip(_positions(id), solved)]


def constant_for_some_reward(completions, id, constant, **kwargs):
    """Rows with `constant` true score 0.5 for every completion (a zero-std group); the others score 0, 1, 0, 1,
    ... by position in their group (never zero std)."""
    return [0.5 if c else float(p % 2) for p, c in zip(_positions(id), constant)]
