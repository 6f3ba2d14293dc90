"""`fastrl train` configs: a YAML file (+ command-line overrides) -> a ready GRPOTrainer.

Schema (top-level keys):
  model        a model path or id, or "tiny" for the built-in tiny model (fastrl.tasks.tiny_model)
  tiny_model   dict of keyword arguments for build_tiny_model (only with model: tiny)
  task         a built-in task name (fastrl.tasks.get_task)   } exactly one of the two
  task_args    dict of keyword arguments for the task          }
  dataset      a local .jsonl/.json/.parquet/.csv file with a `prompt` column
  eval_dataset a local prompt file for evaluation (GRPOConfig's eval_strategy etc.); a task may bring its own
  rewards      list of reward functions, "module:function" or built-in names; default: the task's rewards
  peft         dict of peft.LoraConfig keyword arguments: train a LoRA adapter (needs `pip install fastrl[peft]`)
  anything else: a GRPOConfig field.

`seed` seeds everything: tiny_model.seed and task_args.seed default to it (set them to pin one part).
`--field value` overrides are YAML values; a mapping merges into the config's mapping key by key
(`--task_args '{num_examples: 64}'` keeps the other task_args), anything else replaces the value.
YAML 1.1 reads yes/no/on/off as booleans; a string field keeps the word (`save_strategy: no` is "no"), and on the
command line a string field takes the value as written (`--run_name 2024` is "2024").

Everything is checked (unknown keys, config values, files) before any model or dataset is loaded.
"""
from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import os

import yaml

from fastrl.config import GRPOConfig

RUN_KEYS = ("model", "tiny_model", "task", "task_args", "dataset", "eval_dataset", "rewards", "peft")
MAPPING_RUN_KEYS = ("tiny_model", "task_args", "peft")
TEXT_RUN_KEYS = ("model", "task", "dataset", "eval_dataset")


# ------------------------------------------------------------------ reading YAML with the fields' types in mind
class YesNoWord(str):
    """yes/no/on/off as written, where YAML 1.1 (yaml.safe_load) would have read a bool: settled by the key's type."""

    def as_bool(self) -> bool:
        return self.lower() in ("yes", "on")


class _Loader(yaml.SafeLoader):
    pass


def _construct_bool(loader: _Loader, node) -> bool | YesNoWord:
    text = loader.construct_scalar(node)
    return text.lower() == "true" if text.lower() in ("true", "false") else YesNoWord(text)


_Loader.add_constructor("tag:yaml.org,2002:bool", _construct_bool)


def _yaml(text, where: str):
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as e:
        raise ValueError(f"{where}: not valid YAML ({' '.join(str(e).split())})") from None


def _field_types() -> dict[str, set[str]]:
    """GRPOConfig field -> the names in its annotation ("str | None" -> {"str", "None"})."""
    return {f.name: {part.strip() for part in str(f.type).split("|")} for f in dataclasses.fields(GRPOConfig)}


def _is_text(key: str, types: dict[str, set[str]]) -> bool:
    """A key whose value is a string and never a bool, number or container."""
    return key in TEXT_RUN_KEYS or (key in types and types[key] <= {"str", "None"})


def _settle(value, text: bool):
    """Resolve the YesNoWords left by _Loader: the word for a text key, YAML 1.1's bool anywhere else."""
    if isinstance(value, YesNoWord):
        return str(value) if text else value.as_bool()
    if text and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, dict):
        return {_settle(k, False): _settle(v, False) for k, v in value.items()}
    if isinstance(value, list):
        return [_settle(v, False) for v in value]
    return value


def _settle_all(raw: dict) -> dict:
    types = _field_types()
    return {k: _settle(v, _is_text(k, types)) for k, v in raw.items()}


def parse_overrides(tokens: list[str]) -> dict:
    """["--lr", "0.1", "--max_steps=3"] -> {"lr": 0.1, "max_steps": 3}.

    Values are YAML, except for string fields (save_strategy, run_name, ...), which take the text as written
    (`--save_strategy no` is "no", not False); `null` still gives None where the field allows it.
    """
    types, out, i = _field_types(), {}, 0
    while i < len(tokens):
        token = tokens[i]
        if not token.startswith("--") or len(token) == 2:
            raise ValueError(f"override {token!r}: expected --field value or --field=value")
        key, eq, value = token[2:].partition("=")
        if not eq:
            if i + 1 >= len(tokens):
                raise ValueError(f"override --{key}: missing a value")
            value, i = tokens[i + 1], i + 1
        key = key.replace("-", "_")
        parsed = _yaml(value, f"override --{key}")
        if _is_text(key, types) and not isinstance(parsed, str) \
                and not (parsed is None and "None" in types.get(key, {"None"})):
            parsed = value  # no -> "no", 2024 -> "2024"; a quoted '"no"' is YAML's string "no"
        out[key] = _settle(parsed, _is_text(key, types))
        i += 1
    return out


def merge_overrides(raw: dict, overrides: dict) -> dict:
    """Overrides win; a mapping given for a mapping merges into it key by key (recursively)."""
    merged = dict(raw)
    for key, value in overrides.items():
        old = merged.get(key)
        merged[key] = merge_overrides(old, value) if isinstance(old, dict) and isinstance(value, dict) else value
    return merged


def load_run_config(path: str, overrides: dict | None = None) -> dict:
    if not os.path.isfile(path):
        raise ValueError(f"config: file {path!r} does not exist")
    with open(path) as f:
        raw = _yaml(f, f"config {path!r}") or {}
    if not isinstance(raw, dict):
        raise ValueError(f"config: {path!r} must hold a mapping of keys to values, got {type(raw).__name__}")
    raw = merge_overrides(_settle_all(raw), _settle_all(overrides or {}))
    check_keys(raw)
    return raw


def check_keys(raw: dict, run_keys=RUN_KEYS, what: str = "config") -> None:
    """Every key is a run key or a GRPOConfig field; an unknown one is named with the closest known key."""
    known = set(run_keys) | GRPOConfig.field_names()
    unknown = [k for k in raw if k not in known]
    if unknown:
        hints = {k: difflib.get_close_matches(k, known, n=3) for k in unknown}  # near-ties: name them all
        said = ", ".join(f"{k!r}" + (f" (did you mean {' or '.join(map(repr, h))}?)" if h else "")
                         for k, h in hints.items())
        raise ValueError(f"{what}: unknown key(s) {said}; keys are {list(run_keys)} or GRPOConfig fields")


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
    for key in ("dataset", "eval_dataset"):
        if run[key] is not None and not os.path.isfile(run[key]):
            raise ValueError(f"{key}: file {run[key]!r} does not exist")
    if run["dataset"] is not None and not run["rewards"]:
        raise ValueError("rewards: required with dataset (only built-in tasks bring their own rewards)")
    if run["model"] != "tiny" and _looks_like_path(run["model"]) and not os.path.exists(run["model"]):
        raise ValueError(f"model: path {run['model']!r} does not exist")
    for key in MAPPING_RUN_KEYS:
        if run[key] is not None and not isinstance(run[key], dict):
            raise ValueError(f"{key}: expected a mapping, got {run[key]!r}")
    if run["rewards"] is not None and not isinstance(run["rewards"], list):
        run["rewards"] = [run["rewards"]]
    if run["peft"] is not None and importlib.util.find_spec("peft") is None:
        raise ValueError("peft: LoRA training needs the peft package: pip install 'fastrl[peft]' (or peft)")
    _fill_seeds(run, config.seed)
    return run, config


def _fill_seeds(run: dict, seed: int) -> None:
    """`seed` seeds the tiny model's init and the task's data too, unless they are given their own."""
    if run["model"] == "tiny":
        run["tiny_model"] = {"seed": seed, **(run["tiny_model"] or {})}
    if run["task"] is not None:
        from fastrl.tasks import check_task_args

        task_args = run["task_args"] or {}
        if "seed" in check_task_args(run["task"], task_args):
            task_args = {"seed": seed, **task_args}
        run["task_args"] = task_args


def _looks_like_path(name: str) -> bool:
    # "org/name" may be a (cached) hub id; explicit or deeper paths are paths
    return name.startswith((".", "/", "~")) or name.count("/") >= 2


def build_trainer(raw: dict):
    """The run config -> GRPOTrainer (builds the tiny model / task / dataset as asked)."""
    from fastrl.data import load_prompt_file
    from fastrl.output_dir import check_writable
    from fastrl.scoring import check_reward_weights, import_reward
    from fastrl.trainer import GRPOTrainer

    run, config = split_run_config(raw)
    peft_config = lora_config(run["peft"]) if run["peft"] is not None else None
    reward_funcs, weights = None, None  # everything cheap is checked before the tiny model is written
    if run["rewards"]:
        reward_funcs = [import_reward(r) for r in run["rewards"]]
    if run["task"] is not None:
        from fastrl.tasks import get_task

        task = get_task(run["task"], **(run["task_args"] or {}))
        dataset, eval_dataset = task.train_dataset, task.eval_dataset
        if reward_funcs is None:
            reward_funcs, weights = task.reward_funcs, task.reward_weights
    else:
        dataset, eval_dataset = load_prompt_file(run["dataset"]), None
    if run["eval_dataset"] is not None:
        eval_dataset = load_prompt_file(run["eval_dataset"])
    if config.reward_weights is None and weights is not None:
        config.reward_weights = list(weights)
    check_reward_weights(config.reward_weights, reward_funcs)
    check_writable(config.output_dir)
    model = run["model"]
    if model == "tiny":
        model = _write_tiny_model(config, run["tiny_model"] or {})
    return GRPOTrainer(model=model, reward_funcs=reward_funcs, args=config, train_dataset=dataset,
                       eval_dataset=eval_dataset, peft_config=peft_config)


def _write_tiny_model(config, kwargs: dict) -> str:
    """The tiny model's folder in output_dir, written by rank 0 alone; the other ranks of a launch wait for it
    (the process group made here is the one the trainer then uses)."""
    from fastrl import distributed
    from fastrl.launch import launch_from_env
    from fastrl.tasks.tiny_model import build_tiny_model

    launch, path = launch_from_env(), os.path.join(config.output_dir, "tiny_model")
    distributed.init_process_group(launch, distributed.device_for(launch, config.use_cpu), config.ddp_timeout)
    if launch.rank == 0:
        build_tiny_model(path, **kwargs)
    distributed.barrier()
    return path


def lora_config(kwargs: dict):
    """The `peft:` mapping -> peft.LoraConfig(**kwargs), with an error naming the key peft refused."""
    try:
        from peft import LoraConfig
    except ImportError as e:
        raise ValueError(f"peft: LoRA training needs the peft package: pip install 'fastrl[peft]' ({e})") from None
    try:
        return LoraConfig(**kwargs)
    except (TypeError, ValueError) as e:
        raise ValueError(f"peft: peft.LoraConfig refused {kwargs!r}: {e}") from None
