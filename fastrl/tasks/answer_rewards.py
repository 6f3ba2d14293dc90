"""Reward functions that check a completion against a dataset's `answer` column (a string of digits).

Each takes TRL's reward signature, `f(prompts=..., completions=..., completion_ids=..., **columns)`, and
returns one float in [0, 1] per completion. A completion is plain text, or (for chat prompts) a list of
messages whose last one holds the text. Leading and trailing whitespace is ignored.

- exact_match: 1 if the completion is the answer, else 0.
- digit_accuracy: partial credit, the share of positions where completion and answer hold the same
  character, over the longer of the two (so extra or missing characters cost credit).
- digits_only: the format reward, the number of digits among the completion's first len(answer) characters,
  over the longer of completion and answer: 1 for a run of digits exactly as long as the answer. It pays
  for staying in the answer's alphabet and stopping in time, not for being right.
"""
from __future__ import annotations


def completion_text(completion) -> str:
    """The text of one completion: a string, or the content of the last message of a message list."""
    if isinstance(completion, str):
        return completion.strip()
    if isinstance(completion, list) and completion and isinstance(completion[-1], dict):
        return str(completion[-1].get("content", "")).strip()
    raise ValueError(f"completions must hold strings or lists of messages, got {type(completion).__name__}")


def _check_lengths(completions, answer) -> None:
    if len(completions) != len(answer):
        raise ValueError(f"completions and answer must have the same length, got {len(completions)} and {len(answer)}")


def exact_match(completions, answer, **kwargs) -> list[float]:
    """1.0 where the completion is exactly the answer, else 0.0."""
    _check_lengths(completions, answer)
    return [float(completion_text(c) == a) for c, a in zip(completions, answer)]


def digit_accuracy(completions, answer, **kwargs) -> list[float]:
    """The share of positions where completion and answer agree, over the longer of the two."""
    _check_lengths(completions, answer)
    scores = []
    for completion, target in zip(completions, answer):
        text = completion_text(completion)
        same = sum(x == y for x, y in zip(text, target))
        scores.append(same / max(len(text), len(target), 1))
    return scores


def digits_only(completions, answer, **kwargs) -> list[float]:
    """Digits among the first len(answer) characters, over the longer of completion and answer."""
    _check_lengths(completions, answer)
    scores = []
    for completion, target in zip(completions, answer):
        text = completion_text(completion)
        digits = sum(ch in "0123456789" for ch in text[: len(target)])
        scores.append(digits / max(len(text), len(target), 1))
    return scores
