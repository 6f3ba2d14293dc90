"""`fastrl train CONFIG.yaml [--field value ...]`: overrides, early errors naming the problem, a real run."""
import json
import os
import re
import subprocess
import sys

import pytest
import torch
import yaml

import helpers_tiny as tiny
from fastrl import cli
from fastrl.run_config import build_trainer, load_run_config, parse_overrides, split_run_config

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))


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


def test_string_fields_keep_yes_no_words(tmp_path):
    # YAML 1.1 reads no/yes/on/off as booleans: a string field must keep the word, from the file and the command line
    got = parse_overrides(["--save_strategy", "no", "--run_name", "2024", "--hub_model_id", "on",
                           "--use_vllm", "no", "--bf16", "yes", "--resume_from_checkpoint", "no",
                           "--output_dir", "null", "--task_args", "{flag: off}"])
    assert got == {"save_strategy": "no", "run_name": "2024", "hub_model_id": "on", "use_vllm": False,
                   "bf16": True, "resume_from_checkpoint": False, "output_dir": None, "task_args": {"flag": False}}
    assert all(type(v) is str for v in (got["save_strategy"], got["run_name"], got["hub_model_id"]))
    assert parse_overrides(["--save_strategy", '"no"', "--run_name", "'2024'"]) == \
        {"save_strategy": "no", "run_name": "2024"}  # YAML quotes around a word are quotes, not part of it
    path = tmp_path / "c.yaml"
    path.write_text("model: tiny\ntask: copy\nsave_strategy: no\nhub_model_id: off\nbf16: no\nuse_vllm: Off\n"
                    "run_name: 7\ntiny_model: {tie_word_embeddings: no}\n")
    raw = load_run_config(str(path))
    assert (raw["save_strategy"], raw["hub_model_id"], raw["bf16"], raw["use_vllm"], raw["run_name"]) == \
        ("no", "off", False, False, "7")
    assert raw["tiny_model"] == {"tie_word_embeddings": False}
    run, cfg = split_run_config(load_run_config(str(path), parse_overrides(["--save_strategy", "no"])))
    assert cfg.save_strategy == "no" and cfg.bf16 is False


def test_mapping_overrides_merge_into_the_config(tmp_path):
    path = write(tmp_path, {"model": "tiny", "task": "copy", "tiny_model": {"num_layers": 1, "hidden_size": 32},
                            "task_args": {"min_digits": 2, "max_digits": 2, "num_examples": 50},
                            "lr_scheduler_kwargs": {"a": {"b": 1, "c": 2}}})
    raw = load_run_config(path, parse_overrides(["--tiny_model", "{hidden_size: 64}", "--task_args={seed: 5}",
                                                 "--lr_scheduler_kwargs", "{a: {c: 3}}"]))
    assert raw["tiny_model"] == {"num_layers": 1, "hidden_size": 64}
    assert raw["task_args"] == {"min_digits": 2, "max_digits": 2, "num_examples": 50, "seed": 5}
    assert raw["lr_scheduler_kwargs"] == {"a": {"b": 1, "c": 3}}
    # anything but a mapping replaces the value
    raw = load_run_config(path, parse_overrides(["--task_args", "null"]))
    assert raw["task_args"] is None


def test_seed_seeds_the_tiny_model_and_the_task(tmp_path):
    demo = os.path.join(TESTS_DIR, "..", "examples", "demo.yaml")
    run, cfg = split_run_config(load_run_config(demo, parse_overrides(["--seed", "3"])))
    assert cfg.seed == 3 and run["tiny_model"]["seed"] == 3 and run["task_args"]["seed"] == 3
    run0, _ = split_run_config(load_run_config(demo))
    assert run0["tiny_model"]["seed"] == 0 and run0["task_args"]["seed"] == 0  # demo.yaml's seed: 0
    # their own seeds win over `seed`
    run, _ = split_run_config(load_run_config(demo, parse_overrides(
        ["--seed", "3", "--tiny_model", "{seed: 1}", "--task_args", "{seed: 2}"])))
    assert (run["tiny_model"]["seed"], run["task_args"]["seed"]) == (1, 2)
    # the task's data really changes with the seed
    from fastrl.tasks import get_task
    prompts = [get_task(r["task"], **{**r["task_args"], "num_examples": 20}).train_dataset["prompt"]
               for r in (run0, split_run_config(load_run_config(demo, {"seed": 3}))[0])]
    assert prompts[0] != prompts[1]
    # and so do the tiny model's weights
    from fastrl.tasks.tiny_model import build_tiny_model
    from safetensors.torch import load_file
    weights = [load_file(os.path.join(build_tiny_model(str(tmp_path / f"m{s}"), num_layers=1, hidden_size=32,
                                                       seed=s), "model.safetensors")) for s in (0, 3)]
    assert any(not torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_seed_is_not_given_to_a_dataset_run(run_files):
    tmp_path, config = run_files
    run, _ = split_run_config(load_run_config(write(tmp_path, {**config, "seed": 4})))
    assert run["tiny_model"] is None and run["task_args"] is None


def test_peft_builds_a_lora_config_for_the_trainer(run_files, monkeypatch):
    pytest.importorskip("peft")
    tmp_path, config = run_files
    seen = {}

    class Trainer:  # stands in for GRPOTrainer: only what it is given matters here
        def __init__(self, **kwargs):
            seen.update(kwargs)

    monkeypatch.setattr("fastrl.trainer.GRPOTrainer", Trainer)
    peft = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}
    build_trainer(load_run_config(write(tmp_path, {**config, "peft": peft})))
    lora = seen["peft_config"]
    assert type(lora).__name__ == "LoraConfig" and (lora.r, lora.lora_alpha) == (4, 8)
    assert set(lora.target_modules) == {"q_proj", "v_proj"}
    with pytest.raises(ValueError, match="peft: peft.LoraConfig refused .*rank"):
        build_trainer(load_run_config(write(tmp_path, {**config, "peft": {"rank": 4}})))


def test_peft_runs_a_lora_training_step(run_files):
    pytest.importorskip("peft")
    tmp_path, config = run_files
    peft = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}
    assert cli.main(["train", write(tmp_path, {**config, "peft": peft, "max_steps": 1, "save_strategy": "no"})]) == 0
    rows = [json.loads(x) for x in open(os.path.join(config["output_dir"], "metrics.jsonl"))]
    assert [r["step"] for r in rows] == [1]


def test_peft_without_the_package_names_the_extra(run_files, monkeypatch, capsys):
    import importlib.util
    tmp_path, config = run_files
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "peft" else find_spec(name, *a))
    assert cli.main(["train", write(tmp_path, {**config, "peft": {"r": 4}})]) == 2
    assert "pip install 'fastrl[peft]'" in capsys.readouterr().err
    assert not os.path.exists(config["output_dir"])


@pytest.mark.parametrize("change, message", [
    ({"learnin_rate": 0.1}, "unknown key(s) 'learnin_rate' (did you mean 'learning_rate'?)"),
    ({"model": "./does/not/exist"}, "model: path './does/not/exist' does not exist"),
    ({"dataset": "/nope/prompts.jsonl"}, "dataset: file '/nope/prompts.jsonl' does not exist"),
    ({"task": "reverse"}, "exactly one"),
    ({"rewards": None}, "rewards: required with dataset"),
    ({"num_generations": 1}, "num_generations"),
    ({"num_generations": 3}, "divisible by num_generations"),
    ({"max_completion_length": 0}, "max_completion_length"),
    ({"neftune_noise_alpha": 5.0}, "neftune_noise_alpha=5.0 is not supported"),
    ({"peft": "lora"}, "peft: expected a mapping"),
    ({"model": "tiny", "dataset": None, "rewards": None, "task": "copy", "task_args": {"digits": 3}},
     "unknown argument(s) ['digits']"),
], ids=["unknown-key", "model-path", "dataset-file", "task-and-dataset", "no-rewards", "G<2", "G-not-dividing",
        "max-completion-0", "unsupported-field", "peft-not-a-mapping", "unknown-task-arg"])
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
    import fastrl.tasks  # noqa: F401  (fastrl's own module: a broken import must fail here, not skip)

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


def fastrl_command(*args, timeout=300):
    exe = os.path.join(os.path.dirname(sys.executable), "fastrl")
    cmd = [exe] if os.path.exists(exe) else [sys.executable, "-m", "fastrl.cli"]
    return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=timeout,
                          cwd=os.path.dirname(TESTS_DIR))


def test_console_script_lists_every_command():
    out = fastrl_command("--help")
    assert out.returncode == 0
    for name in ("train", "filter", "plan", "bench"):
        assert f"    {name} " in out.stdout, name
    bench = fastrl_command("bench", "--help")
    assert bench.returncode == 0 and "--suite" in bench.stdout and "--quick" in bench.stdout


def test_plan_from_the_console_script():
    out = fastrl_command("plan", "examples/demo.yaml", "--memory", "24GB")
    assert out.returncode == 0, out.stderr
    assert "peak" in out.stdout and "fits" in out.stdout
    out = fastrl_command("plan", "examples/demo.yaml", "--memory", "lots")
    assert out.returncode == 2 and "fastrl plan: error:" in out.stderr


def test_bench_and_plan_entries_point_at_real_functions():
    for name in ("plan", "bench"):
        for which in ("add", "run"):
            assert callable(cli._function(cli.COMMANDS[name], which))


# ---------------------------------------------------------------- named errors instead of tracebacks
@pytest.mark.parametrize("text, expected", [
    ("model: tiny\ntask: copy\n  max_steps: 3\n", "config '.*c.yaml': not valid YAML"),
    ("model: tiny\ntask: copy\nper_device_train_batch_size: 7.5\n", "per_device_train_batch_size: expected an integer"),
    ("model: tiny\ntask: copy\nlearning_rate: .inf\n", "learning_rate: expected a finite number"),
], ids=["malformed-yaml", "fractional-batch", "inf-learning-rate"])
def test_bad_configs_are_named_errors(tmp_path, capsys, text, expected):
    path = tmp_path / "c.yaml"
    path.write_text(text + f"output_dir: {tmp_path / 'out'}\n")
    assert cli.main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert re.search(f"fastrl train: error: {expected}", err) and "Traceback" not in err


@pytest.mark.parametrize("content, expected", [
    ("", "dataset: file .* is empty"),
    ('{"prompt": 1, "answer": "1"}\n{"prompt": 2, "answer": "2"}\n', "row 0: 'prompt' must be a non-empty string"),
], ids=["empty-file", "int-prompts"])
def test_bad_dataset_files_are_named_before_the_model_is_written(tmp_path, capsys, content, expected):
    data = tmp_path / "prompts.jsonl"
    data.write_text(content)
    path = write(tmp_path, {"model": "tiny", "dataset": str(data), "rewards": ["accuracy_reward"],
                            "output_dir": str(tmp_path / "out")})
    assert cli.main(["train", path]) == 2
    assert re.search(expected, capsys.readouterr().err)
    assert not (tmp_path / "out" / "tiny_model").exists()


def test_bad_reward_weights_are_named_before_the_model_is_written(tmp_path, capsys):
    path = write(tmp_path, {"model": "tiny", "task": "copy", "reward_weights": [1.0, 2.0, 3.0, 4.0, 5.0],
                            "output_dir": str(tmp_path / "out")})
    assert cli.main(["train", path]) == 2
    assert "reward_weights: 5 weights for" in capsys.readouterr().err
    assert not (tmp_path / "out" / "tiny_model").exists()
