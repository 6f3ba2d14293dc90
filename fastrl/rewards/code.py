"""Code rewards: run the completion's program against the row's tests, in the sandbox.

`code_reward(completions, tests, **kwargs)` takes the last fenced Python block of each completion (a block
tagged python, py or python3, or an untagged one; blocks in other languages are skipped) and runs it, followed by
each test, in the sandbox (`fastrl.rewards.sandbox`). `tests` is the dataset column: per row, one string of
Python test code (reward 1.0 or 0.0) or a list of them (reward = the fraction that pass: partial credit). A
test passes when the program and then the test run to their end without an exception, within the limits.

- no code block in the completion: 0.0;
- no tests for the row (None or an empty list): None, so the trainer leaves the row out of this reward.

Each (completion, test) pair is its own sandboxed process, so one test's infinite loop or crash cannot take the
others down; pairs run in parallel on `max_workers` threads (default: the CPU count), so a batch costs at most
ceil(pairs / max_workers) x timeout in the worst case and about 0.1 s per pair per worker in the usual one.
"""
from __future__ import annotations

import os
import re
from concurrent.futures import ThreadPoolExecutor

from .sandbox import ISOLATIONS, SandboxLimits, run_python
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
        jobs: list[tuple[int, list[str]]] = []  # (row, [program, test])
        for row, (completion, row_tests) in enumerate(zip(completions, per_row)):
            program = extract_code(message_text(completion))
            if row_tests is not None and program is not None:
                jobs.extend((row, [program, test]) for test in row_tests)
        passes = [0] * len(completions)
        for (row, _), passed in zip(jobs, self._run_all([sources for _, sources in jobs])):
            passes[row] += passed
        return [None if row_tests is None else passes[row] / len(row_tests) for row, row_tests in enumerate(per_row)]

    def _run_all(self, programs: list[list[str]]) -> list[bool]:
        if not programs:
            return []
        with ThreadPoolExecutor(max_workers=min(self.max_workers, len(programs))) as pool:
            results = pool.map(lambda sources: run_python(sources, self.limits, self.isolation), programs)
            return [result.passed for result in results]


code_reward = CodeReward()
