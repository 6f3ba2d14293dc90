"""Code rewards: run the completion's program against the row's tests, in the sandbox.

`code_reward(completions, tests, **kwargs)` takes the last fenced Python block of each completion (a block
tagged python, py or python3, or an untagged one; blocks in other languages are skipped) and runs it, followed by
each test, in the sandbox (`fastrl.rewards.sandbox`). `tests` is the dataset column: per row, one string of
Python test code (reward 1.0 or 0.0) or a list of them (reward = the fraction that pass: partial credit). A
test passes when the program and then the test run to their end without an exception, within the limits.

- no code block in the completion: 0.0;
- no tests for the row (None or an empty list): None, so the trainer leaves the row out of this reward.

Each (completion, test) pair runs in its own freshly isolated process, so one test's infinite loop or crash
cannot take the others down. The tests of one completion share one interpreter start-up (most of the cost of a
run), and completions run in parallel on `max_workers` threads (default: the CPU count); when there are fewer
completions than workers, their tests are split across workers. The worst case for a completion is
(number of tests) x timeout.
"""
from __future__ import annotations

import os
import re
from concurrent.futures import ThreadPoolExecutor

from .sandbox import ISOLATIONS, SandboxLimits, run_python_batch
from .text import check_same_length, message_text

PYTHON_TAGS = ("python", "py", "python3", "")
# ```tag <anything to end of line> newline <body> ```   (the body is non-greedy: blocks do not merge)
_FENCED_BLOCK = re.compile(r"```[ \t]*([\w+-]*)[^\n]*\n(.*?)```", re.DOTALL)


def extract_code(text: str) -> str | None:
    """The body of the last fenced Python block in `text`, or None if there is none."""
    blocks = [body for tag, body in _FENCED_BLOCK.findall(text) if tag.lower() in PYTHON_TAGS]
    return blocks[-1] if blocks else None


def _row_tests(tests, row: int) -> list[str] | None:
    if tests is None:
        return None
    if isinstance(tests, str):
        return [tests]
    if isinstance(tests, (list, tuple)) and all(isinstance(t, str) for t in tests):
        return list(tests) or None
    raise ValueError(f"tests[{row}] must be a string of Python test code or a list of them, "
                     f"got {type(tests).__name__}")


class CodeReward:
    """A reward function with its own sandbox limits and parallelism (`code_reward` is the default one)."""

    __name__ = "code_reward"

    def __init__(self, limits: SandboxLimits | None = None, max_workers: int | None = None,
                 isolation: str = "auto"):
        if max_workers is not None and (not isinstance(max_workers, int) or max_workers < 1):
            raise ValueError(f"max_workers must be a positive int or None, got {max_workers!r}")
        if isolation not in ISOLATIONS:
            raise ValueError(f"isolation must be one of {ISOLATIONS}, got {isolation!r}")
        self.limits = limits or SandboxLimits()
        self.max_workers = max_workers or os.cpu_count() or 1
        self.isolation = isolation

    def __call__(self, completions, tests=None, **kwargs) -> list[float | None]:
        check_same_length(completions, tests, "tests")
        per_row = [_row_tests(row_tests, row) for row, row_tests in enumerate(tests)]
        batches: list[tuple[int, list[list[str]]]] = []  # (row, runs); a run is [program, test]
        for row, (completion, row_tests) in enumerate(zip(completions, per_row)):
            program = extract_code(message_text(completion))
            if row_tests is not None and program is not None:
                batches.append((row, [[program, test] for test in row_tests]))
        passes = [0] * len(completions)
        for row, results in self._run_all(_split_to_fill(batches, self.max_workers)):
            passes[row] += sum(result.passed for result in results)
        return [None if row_tests is None else passes[row] / len(row_tests) for row, row_tests in enumerate(per_row)]

    def _run_all(self, batches):
        if not batches:
            return []
        with ThreadPoolExecutor(max_workers=min(self.max_workers, len(batches))) as pool:
            results = pool.map(lambda batch: run_python_batch(batch[1], self.limits, self.isolation), batches)
            return [(row, row_results) for (row, _), row_results in zip(batches, results)]


def _split_to_fill(batches: list, workers: int) -> list:
    """One batch per completion (one interpreter start for all its tests), split in halves, largest first,
    while there are fewer batches than workers, so a few completions with many tests still use every core."""
    batches = list(batches)
    while len(batches) < workers:
        largest = max(range(len(batches)), key=lambda i: len(batches[i][1]), default=None)
        if largest is None or len(batches[largest][1]) < 2:
            break
        row, runs = batches.pop(largest)
        half = len(runs) // 2
        batches += [(row, runs[:half]), (row, runs[half:])]
    return batches


code_reward = CodeReward()
