"""What every reward reads first: the text of a completion (or prompt), plain or chat-formatted.

TRL hands reward functions completions as plain strings for plain-text prompts and as message lists
(`[{"role": "assistant", "content": ...}]`) for chat prompts. The text of a message list is its last message's
content.
"""
from __future__ import annotations


def message_text(item, argument: str = "completions") -> str:
    """The text of one completion or prompt: a string, or the content of the last message of a message list."""
    if isinstance(item, str):
        return item
    if isinstance(item, (list, tuple)) and item and isinstance(item[-1], dict):
        content = item[-1].get("content", "")
        if isinstance(content, list):  # content parts: [{"type": "text", "text": ...}, ...]
            return "".join(part.get("text", "") for part in content if isinstance(part, dict))
        return content if isinstance(content, str) else str(content)
    raise ValueError(
        f"{argument} must hold strings or lists of messages ({{'role': ..., 'content': ...}}), "
        f"got {type(item).__name__}: {item!r:.80}"
    )


def check_same_length(completions, column, name: str) -> None:
    """Raise ValueError unless the dataset column `name` has one entry per completion."""
    if column is None:
        raise ValueError(f"{name} is required: this reward needs a '{name}' column in the dataset")
    if len(completions) != len(column):
        raise ValueError(
            f"{name} must have one entry per completion: got {len(column)} for {len(completions)} completions"
        )
