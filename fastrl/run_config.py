"""`fastrl train` configs: a YAML file (+ command-line overrides) -> a ready GRPOTrainer.

Schema (top-level keys):
  model        a model path or id, or "tiny" for the built-in tiny model (fastrl.tasks.tiny_model)
  tiny_model   dict of keyword arguments for build_tiny_model (only with model: tiny)
  task         a built-in task name (fastrl.tasks.get_task)   } exactly one of the two
  task_args    dict of keyword arguments for the task          }
  dataset      a local .jsonl/.json/.parquet/.csv file with a `prompt` column
  rewards      list of reward functions, "module:function" or built-in names; default: the task's rewards
  anything else: a GRPOConfig field.

Everything is checked (unknown keys, config values, files) before any model or dataset is loaded.
"""
from __future__ import annotations

import difflib
import os

import yaml

from fastrl.config import GRPOConfig

RUN_KEYS = ("model", "tiny_model", "task", "task_args", "dataset", "rewards")


def parse_overrides(tokens: list[str]) -> dict:
    """["--lr", "0.1", "--max_steps=3"] -> {"lr": 0.1, "max_steps": 3}; values parsed as YAML."""
    out, i = {}, 0
    while i < len(tokens):
        token = tokens[i]
        if not token.startswith("--") or len(token) == 2:
            raise ValueError(f"override {token!r}: expected --field value or --field=value")
        key, eq, value = token[2:].partition("=")
        if not eq:
            if i + 1 >= len(tokens):
                raise ValueError(f"override --{key}: missing a value")
            value, i = tokens[i + 1], i + 1
        out[key.replace("-", "_")] = yaml.safe_load(value)
        i += 1
    return out


def load_run_config(path: str, overrides: dict | None = None) -> dict:
    if not os.path.isfile(path):
        raise ValueError(f"config: file {path!r} does not exist")
    with open(path) as f:
        raw = yaml.safe_load(f) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"config: {path!r} must hold a mapping of keys to values, got {type(raw).__name__}")
    raw.update(overrides or {})
    check_keys(raw)
    return raw


def check_keys(raw: dict) -> None:
    known = set(RUN_KEYS) | GRPOConfig.field_names()
    unknown = [k for k in raw if k not in known]
    if unknown:
        hints = {k: difflib.get_close_matches(k, known, n=1) for k in unknown}
        said = ", ".join(f"{k!r}" + (f" (did you mean {h[0]!r}?)" if h else "") for k, h in hints.items())
        raise ValueError(f"config: unknown key(s) {said}; keys are {list(RUN_KEYS)} or GRPOConfig fields")


def split_run_config(raw: dict) -> tuple[dict, GRPOConfig]:
    """-> (the run keys, a validated GRPOConfig). Checks the run keys' values too; loads nothing heavy."""
    run = {k: raw.get(k) for k in RUN_KEYS}
    config = GRPOConfig(**{k: v for k, v in raw.items() if k not in RUN_KEYS})
    if not run["model"]:
        raise ValueError("model: required (a model path or id, or 'tiny')")
    if run["tiny_model"] is not None and run["model"] != "tiny":
        raise ValueError("tiny_model: only used with model: tiny")
    if (run["task"] is None) == (run["dataset"] is None):
        raise ValueError("task / dataset: give exactly one (a built-in task name, or a local prompt file)")
    if run["dataset"] is not None and not os.path.isfile(run["dataset"]):
        raise ValueError(f"dataset: file {run['dataset']!r} does not exist")
    if run["dataset"] is not None and not run["rewards"]:
        raise ValueError("rewards: required with dataset (only built-in tasks bring their own rewards)")
    if run["model"] != "tiny" and _looks_like_path(run["model"]) and not os.path.exists(run["model"]):
        raise ValueError(f"model: path {run['model']!r} does not exist")
    for key in ("tiny_model", "task_args"):
        if run[key] is not None and not isinstance(run[key], dict):
            raise ValueError(f"{key}: expected a mapping, got {run[key]!r}")
    if run["rewards"] is not None and not isinstance(run["rewards"], list):
        run["rewards"] = [run["rewards"]]
    return run, config


def _looks_like_path(name: str) -> bool:
    # "org/name" may be a (cached) hub id; explicit or deeper paths are paths
    return name.startswith((".", "/", "~")) or name.count("/") >= 2


def build_trainer(raw: dict):
    """The run config -> GRPOTrainer (builds the tiny model / task / dataset as asked)."""
    from fastrl.data import load_prompt_file
    from fastrl.scoring import import_reward
    from fastrl.trainer import GRPOTrainer

    run, config = split_run_config(raw)
    model = run["model"]
    if model == "tiny":
        from fastrl.tasks.tiny_model import build_tiny_model

        model = build_tiny_model(os.path.join(config.output_dir, "tiny_model"), **(run["tiny_model"] or {}))
    reward_funcs, weights = None, None
    if run["task"] is not None:
        from fastrl.tasks import get_task

        task = get_task(run["task"], **(run["task_args"] or {}))
        dataset, reward_funcs, weights = task.train_dataset, task.reward_funcs, task.reward_weights
    else:
        dataset = load_prompt_file(run["dataset"])
    if run["rewards"]:
        reward_funcs, weights = [import_reward(r) for r in run["rewards"]], None
    if config.reward_weights is None and weights is not None:
        config.reward_weights = list(weights)
    return GRPOTrainer(model=model, reward_funcs=reward_funcs, args=config, train_dataset=dataset)
