"""The think/answer format: reasoning inside `<think>...</think>`, then an answer.

`think_format_reward` pays 1.0 for a completion that is exactly one thinking block with some reasoning in it,
followed by a non-empty answer, and nothing else in the way: no second `<think>`, no stray `</think>`; white
space before the block is allowed. TRL's rule (`trl/rewards/format_rewards.py`) differs only at the edges: it
accepts an empty reasoning or answer and a stray `</think>` in the answer, and rejects leading white space.

R1-Zero style prompts open the thinking tag for the model (the prompt ends with `<think>`), so the completion
starts inside the block. The reward sees the prompts the trainer passes and, for a prompt that ends with
`<think>`, reads the completion as if it began with that tag.
"""
from __future__ import annotations

import re

from .text import check_same_length, message_text

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"

# whole text: <think> reasoning </think> answer, with neither tag anywhere inside reasoning or answer
_THINK_THEN_ANSWER = re.compile(r"\s*<think>((?:(?!</?think>).)*)</think>((?:(?!</?think>).)*)", re.DOTALL)

# The template of the DeepSeek-R1 paper's R1-Zero run (arXiv:2501.12948, Table 1), with the answer asked for in
# \boxed{} (what accuracy_reward reads) rather than in <answer> tags.
R1_ZERO_TEMPLATE = (
    "A conversation between User and Assistant. The User asks a question and the Assistant solves it. "
    "The Assistant first thinks about the reasoning process and then gives the User the answer. "
    "The reasoning is enclosed in <think> </think> tags and the final answer follows them in \\boxed{{}}, "
    "i.e., <think> reasoning here </think> The answer is \\boxed{{answer here}}.\n"
    "User: {question}\n"
    "Assistant: <think>"
)


def r1_zero_prompt(question: str) -> str:
    """The R1-Zero style prompt for `question`; it ends with `<think>`, so the model starts by reasoning."""
    if not isinstance(question, str) or not question.strip():
        raise ValueError(f"question must be a non-empty string, got {question!r:.80}")
    return R1_ZERO_TEMPLATE.format(question=question.strip())


def opens_thinking(prompt) -> bool:
    """Whether a prompt (text, or messages whose last one the model continues) ends with an open `<think>`."""
    return prompt is not None and message_text(prompt, "prompts").rstrip().endswith(THINK_OPEN)


def has_think_format(text: str) -> bool:
    """One non-empty `<think>` block, then a non-empty answer, and no other thinking tags."""
    match = _THINK_THEN_ANSWER.fullmatch(text)
    return bool(match) and bool(match.group(1).strip()) and bool(match.group(2).strip())


def think_format_reward(completions, prompts=None, **kwargs) -> list[float]:
    """1.0 for `<think>reasoning</think> answer`, else 0.0 (the `<think>` may be in the prompt instead)."""
    if prompts is not None:
        check_same_length(completions, prompts, "prompts")
    else:
        prompts = [None] * len(completions)
    rewards = []
    for completion, prompt in zip(completions, prompts):
        text = message_text(completion)
        if opens_thinking(prompt):
            text = THINK_OPEN + text
        rewards.append(float(has_think_format(text)))
    return rewards
