"""Procedurally generated digit-string tasks with verifiable answers.

Each example is a random string of digits and an operation on it; the answer is a string of digits:

    copy     "4821="          -> "4821"
    reverse  "reverse 4821="  -> "1284"
    sort     "sort 4821="     -> "1248"
    count    "count 7"        -> "8901"  (the next digits, mod 10; the answer's length is drawn like the others)
    add      "482+19="        -> "501"

copy's prompt is bare: it is the demo's task, and a tiny model's attention has fewer tokens to search.

The dataset has a plain-text `prompt` column and an `answer` column; the rewards (answer_rewards.py) compare
the completion to `answer`. The same seed gives the same dataset.
"""
from __future__ import annotations

import random

from datasets import Dataset


def _random_digits(rng: random.Random, min_digits: int, max_digits: int) -> str:
    length = rng.randint(min_digits, max_digits)
    return "".join(rng.choice("0123456789") for _ in range(length))


def _copy(rng, min_digits, max_digits):
    digits = _random_digits(rng, min_digits, max_digits)
    return f"{digits}=", digits


def _reverse(rng, min_digits, max_digits):
    digits = _random_digits(rng, min_digits, max_digits)
    return f"reverse {digits}=", digits[::-1]


def _sort(rng, min_digits, max_digits):
    digits = _random_digits(rng, min_digits, max_digits)
    return f"sort {digits}=", "".join(sorted(digits))


def _add(rng, min_digits, max_digits):
    a, b = (int(_random_digits(rng, min_digits, max_digits)) for _ in range(2))
    return f"{a}+{b}=", str(a + b)


def _count(rng, min_digits, max_digits):
    start = rng.randint(0, 9)
    length = rng.randint(min_digits, max_digits)
    return f"count {start}", "".join(str((start + k) % 10) for k in range(1, length + 1))


OPERATIONS = {"count": _count, "copy": _copy, "reverse": _reverse, "sort": _sort, "add": _add}


def _check_args(operation: str, num_examples: int, min_digits: int, max_digits: int) -> None:
    if operation not in OPERATIONS:
        raise ValueError(f"operation must be one of {sorted(OPERATIONS)}, got {operation!r}")
    if num_examples < 1:
        raise ValueError(f"num_examples must be >= 1, got {num_examples}")
    if min_digits < 1:
        raise ValueError(f"min_digits must be >= 1, got {min_digits}")
    if max_digits < min_digits:
        raise ValueError(f"max_digits must be >= min_digits, got max_digits={max_digits}, min_digits={min_digits}")


def make_digit_dataset(operation: str, *, num_examples: int = 5000, min_digits: int = 3, max_digits: int = 3,
                       seed: int = 0) -> Dataset:
    """A Dataset of `num_examples` rows with columns `prompt` (text) and `answer` (digits)."""
    _check_args(operation, num_examples, min_digits, max_digits)
    rng = random.Random(seed)
    make_example = OPERATIONS[operation]
    rows = [make_example(rng, min_digits, max_digits) for _ in range(num_examples)]
    return Dataset.from_dict({"prompt": [p for p, _ in rows], "answer": [a for _, a in rows]})
