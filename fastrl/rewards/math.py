"""Math answers checked for equivalence, not string equality, through `math-verify`.

`accuracy_reward` follows TRL's rule (`trl/rewards/accuracy_rewards.py`): the gold solution is parsed with
math-verify's default extraction (LaTeX and plain expressions); if nothing can be parsed from it the row gets
`None`, which the trainer excludes instead of scoring it 0. The completion's answer is taken from the first
`\\boxed{}` (boxed answers have priority), else from LaTeX after an anchor such as "the answer is" or inside
`$...$`; a bare number with no anchor is not an answer. Equivalent forms match (`\\frac{1}{2}`, `0.5`, `1/2`,
`(x+1)^2` and `x^2+2x+1`); sets, intervals and units follow math-verify.

One difference from TRL's `accuracy_reward`: when the completion closes a thinking block, only the text after
the last `</think>` is read, so a candidate answer tried while reasoning is not taken for the final one.

Gold solutions that are LaTeX expressions need delimiters (`$\\sqrt{2}$` or `\\boxed{\\sqrt{2}}`): math-verify
does not read a bare `\\sqrt{2}` (and so the row gets None). Numbers and `\\frac{a}{b}` parse bare.

Timeouts: math-verify bounds parsing and verification with `signal.alarm`, which works only in the main
thread; elsewhere it runs without a time bound (as TRL does).
"""
from __future__ import annotations

import logging
import threading

from .text import check_same_length, message_text

_PARSE_TIMEOUT_S = 10
_VERIFY_TIMEOUT_S = 5


def _answer_part(text: str) -> str:
    """The text after the last `</think>`, or all of it when no thinking block was closed."""
    return text.rsplit("</think>", 1)[-1]


def _timeouts() -> tuple[int | None, int | None]:
    if threading.current_thread() is threading.main_thread():
        return _PARSE_TIMEOUT_S, _VERIFY_TIMEOUT_S
    for name in ("math_verify.parser", "math_verify.grader"):  # "timeout disabled" warnings, once per call
        logging.getLogger(name).setLevel(logging.ERROR)
    return None, None


def _answer_config():
    from latex2sympy2_extended import NormalizationConfig
    from math_verify import LatexExtractionConfig

    return [
        LatexExtractionConfig(
            normalization_config=NormalizationConfig(units=True),
            boxed_match_priority=0,
            try_extract_without_anchor=False,
        )
    ]


def accuracy_reward(completions, solution=None, **kwargs) -> list[float | None]:
    """1.0 if the completion's answer equals the gold `solution` mathematically, 0.0 if not, None if the gold
    solution cannot be parsed."""
    from math_verify import parse, verify

    check_same_length(completions, solution, "solution")
    parse_timeout, verify_timeout = _timeouts()
    answer_config = _answer_config()
    rewards: list[float | None] = []
    for completion, gold in zip(completions, solution):
        gold_parsed = parse(str(gold), parsing_timeout=parse_timeout)
        if not gold_parsed:
            rewards.append(None)
            continue
        text = _answer_part(message_text(completion))
        answer = parse(text, extraction_config=answer_config, extraction_mode="first_match",
                       parsing_timeout=parse_timeout)
        rewards.append(float(verify(gold_parsed, answer, timeout_seconds=verify_timeout)))
    return rewards
