"""Built-in verifiable tasks: a dataset with a `prompt` column plus the reward functions that score it.

    task = get_task("reverse", min_digits=3, max_digits=3, seed=0)
    trainer = GRPOTrainer(model, task.reward_funcs, args=GRPOConfig(reward_weights=task.reward_weights, ...),
                          train_dataset=task.train_dataset)

Every task's rewards lie in [0, 1] and its weights sum to 1, so the logged `reward` is on a 0-1 scale.
`build_tiny_model` (tiny_model.py) writes a small model whose tokenizer covers every task's characters.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from functools import partial
from typing import Callable

from datasets import Dataset

from fastrl.tasks.answer_rewards import digit_accuracy, digits_only, exact_match
from fastrl.tasks.digit_tasks import OPERATIONS, make_digit_dataset


@dataclass
class Task:
    name: str
    train_dataset: Dataset  # columns: prompt (text) and answer
    reward_funcs: list[Callable]  # TRL's reward signature
    reward_weights: list[float] | None  # one per reward function, or None for all 1.0
    eval_dataset: Dataset | None = None  # same columns, drawn with another seed


# Partial credit carries most of the weight: from a random model, exact answers are too rare to learn from
# (see ENVIRONMENT.md), while each right digit is a signal GRPO can climb.
DIGIT_REWARDS = [digit_accuracy, exact_match, digits_only]
DIGIT_REWARD_WEIGHTS = [0.6, 0.2, 0.2]


def digit_task(operation: str, *, num_examples: int = 5000, min_digits: int = 3, max_digits: int = 3,
               seed: int = 0, num_eval_examples: int = 0) -> Task:
    """A digit-string task (copy, reverse, sort, add) scored by partial credit, exact match and format; with
    num_eval_examples > 0, an eval set of that many examples drawn with seed + 1 (short strings may repeat
    training prompts: there are only so many)."""
    dataset = make_digit_dataset(operation, num_examples=num_examples, min_digits=min_digits,
                                 max_digits=max_digits, seed=seed)
    eval_dataset = None
    if num_eval_examples > 0:
        eval_dataset = make_digit_dataset(operation, num_examples=num_eval_examples, min_digits=min_digits,
                                          max_digits=max_digits, seed=seed + 1)
    return Task(operation, dataset, list(DIGIT_REWARDS), list(DIGIT_REWARD_WEIGHTS), eval_dataset)


TASKS: dict[str, Callable[..., Task]] = {name: partial(digit_task, name) for name in OPERATIONS}


def check_task_args(name: str, task_args: dict) -> set[str]:
    """Refuse an unknown task or argument (before anything is built); return the arguments the task accepts."""
    if name not in TASKS:
        raise ValueError(f"task must be one of {sorted(TASKS)}, got {name!r}")
    accepted = set(inspect.signature(TASKS[name]).parameters)
    unknown = sorted(set(task_args) - accepted)
    if unknown:
        raise ValueError(f"task_args for task {name!r} got unknown argument(s) {unknown}; "
                         f"accepted: {sorted(accepted)}")
    return accepted


def get_task(name: str, **task_args) -> Task:
    """The built-in task `name` (one of TASKS), built with `task_args`."""
    check_task_args(name, task_args)
    return TASKS[name](**task_args)


__all__ = ["TASKS", "Task", "check_task_args", "get_task", "digit_task"]
