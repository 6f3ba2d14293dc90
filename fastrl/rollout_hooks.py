"""TRL 1.16's rollout hooks: `rollout_func`, `tools` and `environment_factory` (trl/trainer/grpo_trainer.py,
`_generate`, `_tool_call_loop`, `_get_tool_suffix_ids`), with TRL's contracts, errors and token layout.

- rollout_func(prompts, trainer) -> {"prompt_ids", "completion_ids", "logprobs", [ "env_mask" ], ...}: called with
  this process's B prompts (each prompt num_generations times in a row, as TRL's sampler hands them out); one
  completion per entry. env_mask (1 = written by the model) becomes the loss mask; every other field reaches the
  reward functions as a column (a list: one value per row; anything else: the same value for every row). With
  tools (or an environment's), its output is the first turn the tool loop continues, and env_mask a column.
- tools: the model's turn is parsed with the tokenizer's response template (transformers' parse_response); each
  tool call runs and its result, rendered by the chat template, is appended as tokens; the model continues from
  there, until it calls no tool, max_tool_calling_iterations turns, or max_completion_length.
- environment_factory: one environment instance per rollout (pooled, reset(**row) before each rollout; a string it
  returns is appended to the last user message). Its public methods are that rollout's tools; a `get_reward()`
  makes it a reward source (weight 1, named after its class) and reward_funcs optional.
The completion then holds model tokens and tool/environment tokens; tool_mask marks the model's, and only they are
trained or counted by the loss's normalisers (the trainer multiplies it into completion_mask), the length metrics
and num_tokens. A dataset row without a `prompt` starts from an empty user message when an environment is given.
Several processes: each runs its own rows; every rank calls generate() as often as the rank with most turns.
"""
from __future__ import annotations

import copy
import operator
import sys
from typing import Callable, NamedTuple

import torch

from fastrl import distributed
from fastrl.environments import Environments, methods
from fastrl.generation.base import Rollout
from fastrl.tool_calling import ToolCalling, tool_loop

ROLLOUT_KEYS = ("prompt_ids", "completion_ids", "logprobs")


class HookedRollout(NamedTuple):
    """B rows of one process, as the reward functions and the batch builder need them."""
    prompts: list  # as reward functions get them (an environment's observation appended)
    rollout: Rollout  # prompt_ids per row; tool_mask when some tokens are not the model's
    completions: list | None  # what reward functions get as `completions`; None: the trainer decodes them
    columns: dict[str, list]  # extra per-row columns for reward functions (rollout_func's fields)
    extras: dict  # extra keyword arguments for reward functions (environments)
    prompt_ids: list[list[int]] | None = None  # P tokenized prompts shared by each group's rows (no hook)


class RolloutHooks:
    """What a trainer given rollout_func, tools or environment_factory does instead of one generate() call."""

    def __init__(self, processing_class, args, tools=None, rollout_func=None, environment_factory=None):
        self.rollout_func, self.args, self.standalone = rollout_func, args, list(tools or [])
        self.environments = None if environment_factory is None else Environments(environment_factory, tools or [])
        self.tools = self.environments.all_tools() if self.environments else list(tools or [])
        self.calling = None
        if tools or environment_factory is not None:
            self.calling = ToolCalling(processing_class, args.chat_template_kwargs, has_tools=bool(self.tools))

    def run(self, trainer, prompts: list, rows: list[dict], generate: Callable, stop_ids: set[int],
            max_model_len: int) -> HookedRollout:
        """This process's B prompts and dataset rows (each prompt num_generations times in a row) -> B rollouts.
        generate(ids, rows, turn) samples one completion for each of `ids` (the batch rows `rows`); every rank
        calls it equally often (see tool_loop).

        As TRL's _generate: environments are reset first (their observations appended to the prompts); the first
        turn is rollout_func's output or one generate() call; with tools, the tool loop continues every row from
        there (a rollout_func's env_mask is then a plain column: the loop's tool_mask marks the model's tokens)."""
        tools, tool_dicts, extras, columns = [self.tools] * len(prompts), [_by_name(self.tools)] * len(prompts), {}, {}
        if self.environments is not None:
            instances, names = self.environments.draw(rows)
            prompts = self.environments.reset(instances, rows, prompts)
            tools = [self.environments.tools_of[n] for n in names]
            tool_dicts = [_by_name(self.standalone + methods(e)) for e in instances]
            extras["environments"] = instances
        if self.rollout_func is not None:
            output = self.rollout_func(copy.deepcopy(prompts), trainer)
            first, columns = rollout_from_func(output, len(prompts), stop_ids, env_mask_is_column=bool(self.tools))
            prompt_ids = first.prompt_ids
        else:
            prompt_ids = self.calling.prompt_ids(prompts, tools, self.args.max_prompt_length)
            first = generate(prompt_ids, list(range(len(prompt_ids))), 0)
            first.prompt_ids = prompt_ids
        if not self.tools:  # one turn: rollout_func's, or an environment's without tools after its reset
            return HookedRollout(prompts, first, None, columns, extras)
        a = self.args
        rollout, completions, counts = tool_loop(self.calling, generate, prompt_ids, first, tools, tool_dicts,
                                                 sys.maxsize if a.max_tool_calling_iterations is None
                                                 else a.max_tool_calling_iterations,
                                                 a.max_completion_length, max_model_len)
        rollout.truncated = [is_truncated(ids, stop_ids) for ids in rollout.completion_ids]
        rollouts, calls, failures = (distributed.sum_over_ranks(x) for x in (len(prompts), *counts))
        trainer._log_metric("tools/call_frequency", calls / max(1, rollouts))  # TRL's: over every rank's rollouts
        trainer._log_metric("tools/failure_frequency", failures / calls if calls else 0.0)
        return HookedRollout(prompts, rollout, completions, columns, extras)


def _by_name(tools: list[Callable]) -> dict[str, Callable]:
    return {t.__name__: t for t in tools}


def is_truncated(ids: list[int], stop_ids: set[int]) -> bool:
    """TRL's rule for a finished rollout: its last token is neither eos nor pad."""
    return bool(ids) and ids[-1] not in stop_ids


# ------------------------------------------------------------------ rollout_func
def rollout_from_func(output, num_rows: int, stop_ids: set[int],
                      env_mask_is_column: bool = False) -> tuple[Rollout, dict[str, list]]:
    """rollout_func's dict -> (Rollout, reward columns), checked: TRL's missing-keys error, one row per prompt,
    logprobs and env_mask shaped as completion_ids. A completion is truncated when its last token is not a stop
    token (eos or pad: TRL's rule). env_mask_is_column: tools follow, and TRL passes env_mask to the reward
    functions like any other field instead of masking with it."""
    if not isinstance(output, dict):
        raise ValueError(f"rollout_func must return a dict, got {type(output).__name__}")
    missing = sorted(set(ROLLOUT_KEYS) - output.keys())
    if missing:
        raise ValueError(f"rollout_func must return keys {missing} in its output dict.")
    prompt_ids = _id_rows("prompt_ids", output["prompt_ids"], num_rows)
    completion_ids = _id_rows("completion_ids", output["completion_ids"], num_rows)
    logprobs = output["logprobs"]
    if logprobs is not None:
        logprobs = [[float(x) for x in _as_list(r)] for r in _rows("logprobs", logprobs, num_rows)]
        _check_like("logprobs", logprobs, completion_ids)
    env_mask = None if env_mask_is_column else output.get("env_mask")
    if env_mask is not None:
        env_mask = _id_rows("env_mask", env_mask, num_rows)
        _check_like("env_mask", env_mask, completion_ids)
        if any(v not in (0, 1) for row in env_mask for v in row):
            raise ValueError("rollout_func: env_mask values must be 0 (environment token) or 1 (model token)")
    columns = {}
    for key, values in output.items():
        if key in ROLLOUT_KEYS or (key == "env_mask" and not env_mask_is_column):
            continue
        if isinstance(values, list) and len(values) != num_rows:
            raise ValueError(f"rollout_func: field {key!r} has {len(values)} values for {num_rows} rows (a list "
                             "gives one value per row; any other value is given to every row)")
        columns[key] = values if isinstance(values, list) else [values] * num_rows
    truncated = [is_truncated(ids, stop_ids) for ids in completion_ids]
    return Rollout(completion_ids, logprobs, truncated, prompt_ids=prompt_ids, tool_mask=env_mask), columns


def _as_list(row) -> list:
    return row.tolist() if isinstance(row, torch.Tensor) else list(row)


def _rows(name: str, rows, num_rows: int) -> list:
    if not isinstance(rows, (list, tuple)) or len(rows) != num_rows:
        got = f"{len(rows)} rows" if isinstance(rows, (list, tuple)) else type(rows).__name__
        raise ValueError(f"rollout_func: {name} must be a list of {num_rows} rows (one per prompt it was given), "
                         f"got {got}")
    return list(rows)


def _id_rows(name: str, rows, num_rows: int) -> list[list[int]]:
    try:
        return [[operator.index(v) for v in _as_list(r)] for r in _rows(name, rows, num_rows)]
    except TypeError:
        raise ValueError(f"rollout_func: {name} must hold integers (token ids, or 0/1 for env_mask)") from None


def _check_like(name: str, rows: list[list], completion_ids: list[list[int]]) -> None:
    for i, (r, c) in enumerate(zip(rows, completion_ids)):
        if len(r) != len(c):
            raise ValueError(f"rollout_func: {name}[{i}] has {len(r)} values for {len(c)} completion tokens")
