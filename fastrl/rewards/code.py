"""Code rewards a policy cannot talk into passing: the program runs in the sandbox, the verdict is decided here.

`code_reward(completions, tests, **kwargs)` takes the last fenced Python block of each completion (tagged
python, py or python3, or untagged; blocks in other languages are skipped) and runs it on the row's test cases
(formats: fastrl.rewards.code_cases). Reward = the fraction of cases passed:

- stdin/stdout cases: the program reads the input on stdin; the case passes when it exits with status 0 within
  the limits and its stdout matches the expected output (`output_match`, `float_tolerance`);
- function-call cases: after the program, the sandbox evaluates the call and sends back the value as JSON; the
  case passes when that parses as plain data equal to the expected value. An object whose `__eq__` always says
  yes, a patched `compile`, or a forged token cannot pass: nothing inside the sandbox decides.
- no code block: 0.0; no tests for the row (None or empty): None, so the trainer leaves the row out.

Free-form assert tests run inside the sandbox only with `trust_tests_in_process=True`, whose verdict the program
can forge (it runs in the same interpreter as the test): never for training on a policy's output.

One sandbox session per completion (its cases share one interpreter start), completions in parallel on
`max_workers` threads (default: the CPU count). The worst case for a completion is cases x timeout.
"""
from __future__ import annotations

import os
import re
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache

from .code_cases import OUTPUT_MATCHES, Cases, output_matches, parse_tests, value_matches
from .sandbox import ISOLATIONS, CaseResult, SandboxLimits, check_isolation, run_cases
from .text import check_same_length, message_text

PYTHON_TAGS = ("python", "py", "python3", "")
# ```tag <anything to end of line> newline <body> ```   (the body is non-greedy: blocks do not merge)
_FENCED_BLOCK = re.compile(r"```[ \t]*([\w+-]*)[^\n]*\n(.*?)```", re.DOTALL)


def extract_code(text: str) -> str | None:
    """The body of the last fenced Python block in `text`, or None if there is none."""
    blocks = [body for tag, body in _FENCED_BLOCK.findall(text) if tag.lower() in PYTHON_TAGS]
    return blocks[-1] if blocks else None


class CodeReward:
    """A code reward with its own sandbox, limits, comparison rule and parallelism.

    Construction checks the sandbox once and raises SandboxUnavailable, saying what is missing, when
    `isolation` cannot run here ("bwrap", the default and strong one; "landlock", weaker, for non-root users).
    """

    __name__ = "code_reward"

    def __init__(self, limits: SandboxLimits | None = None, max_workers: int | None = None,
                 isolation: str = "bwrap", output_match: str = "tokens", float_tolerance: float | None = None,
                 trust_tests_in_process: bool = False):
        if max_workers is not None and (not isinstance(max_workers, int) or max_workers < 1):
            raise ValueError(f"max_workers must be a positive int or None, got {max_workers!r}")
        if output_match not in OUTPUT_MATCHES:
            raise ValueError(f"output_match must be one of {OUTPUT_MATCHES}, got {output_match!r}")
        if float_tolerance is not None and not (isinstance(float_tolerance, (int, float)) and
                                                0 <= float_tolerance < 1):
            raise ValueError(f"float_tolerance must be None or a number in [0, 1), got {float_tolerance!r}")
        if not isinstance(trust_tests_in_process, bool):
            raise ValueError(f"trust_tests_in_process must be a bool, got {trust_tests_in_process!r}")
        if isolation not in ISOLATIONS:
            raise ValueError(f"isolation must be one of {ISOLATIONS}, got {isolation!r}")
        check_isolation(isolation)
        self.limits = limits or SandboxLimits()
        self.max_workers = max_workers or os.cpu_count() or 1
        self.isolation = isolation
        self.output_match, self.float_tolerance = output_match, float_tolerance
        self.trust_tests_in_process = trust_tests_in_process

    def __call__(self, completions, tests=None, **kwargs) -> list[float | None]:
        check_same_length(completions, tests, "tests")
        rows = [parse_tests(row_tests, row, self.trust_tests_in_process) for row, row_tests in enumerate(tests)]
        jobs = [(row, program, cases) for row, (completion, cases) in enumerate(zip(completions, rows))
                if cases is not None and (program := extract_code(message_text(completion))) is not None]
        rewards: list[float | None] = [None if cases is None else 0.0 for cases in rows]
        if not jobs:
            return rewards
        with ThreadPoolExecutor(max_workers=min(self.max_workers, len(jobs))) as pool:
            scored = pool.map(lambda job: self.score(job[1], job[2]), jobs)
            for (row, _, _), value in zip(jobs, scored):
                rewards[row] = value
        return rewards

    def score(self, program: str, cases: Cases) -> float:
        """The fraction of `cases` the program passes, judged here from what the sandbox brought back."""
        results = run_cases(program, cases.inputs, cases.mode, self.limits, self.isolation)
        expected = cases.expected or [None] * len(results)
        return sum(self.passed(result, want, cases.mode) for result, want in zip(results, expected)) / len(results)

    def passed(self, result: CaseResult, expected, mode: str) -> bool:
        if not result.finished:
            return False
        if mode == "stdin":
            return output_matches(result.stdout, expected, self.output_match, self.float_tolerance)
        if mode == "call":
            return value_matches(result.value, expected, self.float_tolerance)
        return result.value == "true"  # trusted mode: the test source ran to its end (forgeable)


@lru_cache(maxsize=1)
def _default_code_reward() -> CodeReward:
    return CodeReward()


def code_reward(completions, tests=None, **kwargs) -> list[float | None]:
    """code_reward with the default settings; its sandbox is checked (and SandboxUnavailable raised) on the
    first call, so importing fastrl.rewards works on machines without one."""
    return _default_code_reward()(completions, tests=tests, **kwargs)
