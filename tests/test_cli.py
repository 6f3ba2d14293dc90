"""`fastrl train CONFIG.yaml [--field value ...]`: overrides, early errors naming the problem, a real run."""
import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

import helpers_tiny as tiny
from fastrl import cli
from fastrl.run_config import load_run_config, parse_overrides, split_run_config

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def run_files(tmp_path, monkeypatch):
    """A model folder, a prompt file and a config using rewards from helpers_tiny."""
    monkeypatch.syspath_prepend(TESTS_DIR)
    model = tiny.save_tiny(str(tmp_path / "model"))
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in tiny.addition_rows(16)))
    config = {"model": model, "dataset": str(data), "rewards": ["helpers_tiny:first_char_reward"],
              "output_dir": str(tmp_path / "out"), "per_device_train_batch_size": 8, "num_generations": 4,
              "max_completion_length": 6, "max_steps": 2, "logging_steps": 1, "bf16": False, "disable_tqdm": True}
    return tmp_path, config


def write(tmp_path, config) -> str:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def test_parse_overrides_reads_yaml_values():
    got = parse_overrides(["--learning_rate", "1.0e-3", "--max-steps=5", "--report_to", "[tensorboard]",
                           "--bf16", "false", "--task_args", "{num_examples: 8}"])
    assert got == {"learning_rate": 1e-3, "max_steps": 5, "report_to": ["tensorboard"], "bf16": False,
                   "task_args": {"num_examples": 8}}
    with pytest.raises(ValueError, match="missing a value"):
        parse_overrides(["--max_steps"])
    with pytest.raises(ValueError, match="expected --field"):
        parse_overrides(["max_steps", "3"])


def test_command_line_overrides_win(run_files):
    tmp_path, config = run_files
    raw = load_run_config(write(tmp_path, config), parse_overrides(["--max_steps", "7", "--learning_rate", "1e-3"]))
    _, cfg = split_run_config(raw)
    assert (cfg.max_steps, cfg.learning_rate) == (7, 1e-3)


@pytest.mark.parametrize("change, message", [
    ({"learnin_rate": 0.1}, "unknown key(s) 'learnin_rate' (did you mean 'learning_rate'?)"),
    ({"model": "./does/not/exist"}, "model: path './does/not/exist' does not exist"),
    ({"dataset": "/nope/prompts.jsonl"}, "dataset: file '/nope/prompts.jsonl' does not exist"),
    ({"task": "reverse"}, "exactly one"),
    ({"rewards": None}, "rewards: required with dataset"),
    ({"num_generations": 1}, "num_generations"),
    ({"num_generations": 3}, "divisible by num_generations"),
    ({"max_completion_length": 0}, "max_completion_length"),
    ({"entropy_coef": 0.1}, "entropy_coef=0.1 is not supported"),
], ids=["unknown-key", "model-path", "dataset-file", "task-and-dataset", "no-rewards", "G<2", "G-not-dividing",
        "max-completion-0", "unsupported-field"])
def test_bad_config_fails_before_anything_loads(run_files, capsys, change, message):
    tmp_path, config = run_files
    path = write(tmp_path, {**config, **change})
    assert cli.main(["train", path]) == 2
    assert message in capsys.readouterr().err
    assert not os.path.exists(config["output_dir"])  # nothing was built or written


def test_unknown_override_fails_too(run_files, capsys):
    tmp_path, config = run_files
    assert cli.main(["train", write(tmp_path, config), "--max_stepz", "3"]) == 2
    assert "'max_stepz'" in capsys.readouterr().err


def test_dataset_without_prompt_column(run_files, capsys):
    tmp_path, config = run_files
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "1+1=", "answer": "2"}) + "\n")
    assert cli.main(["train", write(tmp_path, {**config, "dataset": str(bad)})]) == 2
    assert "'prompt' column" in capsys.readouterr().err


def test_train_runs_and_writes_its_outputs(run_files):
    tmp_path, config = run_files
    assert cli.main(["train", write(tmp_path, config), "--learning_rate", "1e-3"]) == 0
    out = config["output_dir"]
    rows = [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl"))]
    assert [r["step"] for r in rows] == [1, 2] and all(r["reward"] is not None for r in rows)
    assert rows[0]["learning_rate"] == pytest.approx(1e-3)
    for name in ("curves.png", "model.safetensors", "config.json", "tokenizer.json", "checkpoint-2"):
        assert os.path.exists(os.path.join(out, name)), name


def test_builtin_task_and_tiny_model(tmp_path):
    tasks = pytest.importorskip("fastrl.tasks")
    if not hasattr(tasks, "get_task"):
        pytest.skip("built-in tasks not available")
    config = {"model": "tiny", "task": "reverse", "task_args": {"num_examples": 32}, "output_dir": str(tmp_path),
              "per_device_train_batch_size": 8, "num_generations": 4, "max_completion_length": 6, "max_steps": 1,
              "bf16": False, "disable_tqdm": True, "save_strategy": "no"}
    assert cli.main(["train", write(tmp_path, config)]) == 0
    row = json.loads(open(tmp_path / "metrics.jsonl").readline())
    assert 0.0 <= row["reward"] <= 1.0
    assert any(k.startswith("rewards/") for k in row)


def test_console_script_help():
    exe = os.path.join(os.path.dirname(sys.executable), "fastrl")
    out = subprocess.run([exe if os.path.exists(exe) else sys.executable, *([] if os.path.exists(exe) else
                          ["-m", "fastrl.cli"]), "train", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "CONFIG" in out.stdout.upper()
