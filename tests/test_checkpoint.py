"""Checkpoints: atomic writes, pruning, and an exact resume after a real kill -9.

The crash test runs `fastrl train` in subprocesses: 6 steps straight, and 3 steps + kill -9 in the middle of
step 5 + resume from checkpoint-3 for the remaining steps. fp32 on CPU with one thread is deterministic, so the
per-step metrics and the final weights must be identical (exact equality), not merely close.
"""
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from datasets import Dataset
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import helpers_tiny as tiny
from fastrl import GRPOConfig, GRPOTrainer
from fastrl import checkpoint as ckpt

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
TIMING_KEYS = {"step_time", "tokens_per_second", "peak_memory_mb"}  # wall-clock measurements differ run to run
# (as do the time/<phase> keys, dropped by prefix)


def trained(model_dir, out, **kw):
    base = dict(output_dir=str(out), per_device_train_batch_size=8, num_generations=4, max_completion_length=6,
                max_steps=2, logging_steps=1, learning_rate=1e-3, bf16=False, save_steps=1, disable_tqdm=True)
    trainer = GRPOTrainer(model_dir, tiny.first_char_reward, GRPOConfig(**{**base, **kw}),
                          train_dataset=Dataset.from_list(tiny.addition_rows(16)))
    trainer.train()
    return trainer


# ---------------------------------------------------------------- atomicity
def test_interrupted_save_leaves_previous_checkpoint_intact(model_dir, tmp_path, monkeypatch):
    trainer = trained(model_dir, tmp_path, max_steps=1)  # writes checkpoint-1
    first = os.path.join(tmp_path, "checkpoint-1")
    files_before = sorted(os.listdir(first))
    weights_before = torch.load(os.path.join(first, "trainable_state.pt"))

    real_save = torch.save

    def crash_on_optimizer(obj, path, *a, **k):  # dies half-way: model files written, optimizer not
        if str(path).endswith("optimizer.pt"):
            raise KeyboardInterrupt("simulated crash mid-save")
        return real_save(obj, path, *a, **k)

    with torch.no_grad():
        for p in trainer.model.parameters():
            p.add_(1.0)  # new weights the interrupted save would have written
    monkeypatch.setattr(ckpt.torch, "save", crash_on_optimizer)
    for step in (2, 1):  # a new step, and re-saving the same step over the existing checkpoint
        trainer.state.global_step = step
        with pytest.raises(KeyboardInterrupt):
            trainer._save_checkpoint()
        assert ckpt.list_checkpoints(str(tmp_path)) == [first]
        assert sorted(os.listdir(first)) == files_before
    monkeypatch.setattr(ckpt.torch, "save", real_save)

    # the previous checkpoint still loads, with the old weights, in transformers and in a resume
    loaded = AutoModelForCausalLM.from_pretrained(first)
    for name, value in weights_before.items():
        assert torch.equal(loaded.state_dict()[name], value), name
    fresh = trained(model_dir, tmp_path / "other", max_steps=2, resume_from_checkpoint=first)
    assert fresh.state.global_step == 2
    # the half-written temporary folder is cleaned up by the next successful save
    trainer.state.global_step = 3
    trainer._save_checkpoint()
    assert not [n for n in os.listdir(tmp_path) if n.startswith(ckpt.TMP_PREFIX)]
    assert ckpt.latest_checkpoint(str(tmp_path)).endswith("checkpoint-3")


def test_save_total_limit_keeps_the_newest(model_dir, tmp_path):
    trained(model_dir, tmp_path, max_steps=4, save_total_limit=2)
    assert [os.path.basename(p) for p in ckpt.list_checkpoints(str(tmp_path))] == ["checkpoint-3", "checkpoint-4"]


def test_resume_true_without_checkpoint_fails_as_transformers_does(model_dir, tmp_path):
    """transformers' Trainer.train(resume_from_checkpoint=True) raises "No valid checkpoint found in output
    directory"; so does fastrl, before any step, whether True comes from train() or from the config. A half-written
    temporary is not a checkpoint."""
    os.makedirs(tmp_path / f"{ckpt.TMP_PREFIX}3-123")
    with pytest.raises(ValueError, match=r"resume_from_checkpoint=True: no valid checkpoint found in output "
                                         r"directory \(.*\)"):
        ckpt.resolve_resume(True, str(tmp_path))
    with pytest.raises(ValueError, match="resume_from_checkpoint"):
        ckpt.resolve_resume(str(tmp_path / "nope"), str(tmp_path))
    data = Dataset.from_list(tiny.addition_rows(8))
    for via_config in (False, True):
        out = tmp_path / f"out-{via_config}"
        args = GRPOConfig(output_dir=str(out), per_device_train_batch_size=8, num_generations=4,
                          max_completion_length=4, max_steps=1, bf16=False, save_strategy="no", disable_tqdm=True,
                          report_to="none", resume_from_checkpoint=True if via_config else None)
        trainer = GRPOTrainer(model_dir, tiny.first_char_reward, args, train_dataset=data)
        with pytest.raises(ValueError, match=re.escape(f"no valid checkpoint found in output directory ({out})")):
            trainer.train() if via_config else trainer.train(resume_from_checkpoint=True)
        assert trainer.state.global_step == 0 and not (out / "metrics.jsonl").exists()


# ---------------------------------------------------------------- checksums
def corrupt_flip(path):
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0xFF  # one flipped byte: torch.load may still read it, to different numbers
    open(path, "wb").write(bytes(data))


def truncate(path):
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])


def edit_position(path):
    state = json.load(open(path))
    state["sampler"]["position"] += 8  # a valid JSON edit: the run would resume on other prompts
    json.dump(state, open(path, "w"))


@pytest.mark.parametrize("name, damage, expected", [
    ("trainable_state.pt", corrupt_flip, "does not match its checksum"),
    ("optimizer.pt", corrupt_flip, "does not match its checksum"),
    ("optimizer.pt", truncate, "does not match its checksum"),
    ("trainer_state.json", edit_position, "does not match its checksum"),
    ("scheduler.pt", os.remove, "is missing from the checkpoint"),
], ids=["weights-flipped", "optimizer-flipped", "optimizer-truncated", "position-edited", "scheduler-missing"])
def test_a_damaged_checkpoint_is_refused_naming_the_file(model_dir, tmp_path, name, damage, expected):
    trained(model_dir, tmp_path, max_steps=1)
    folder = tmp_path / "checkpoint-1"
    damage(str(folder / name))
    args = GRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=8, num_generations=4,
                      max_completion_length=6, max_steps=2, bf16=False, save_steps=1, disable_tqdm=True)
    t = GRPOTrainer(model_dir, tiny.first_char_reward, args, train_dataset=Dataset.from_list(tiny.addition_rows(16)))
    with pytest.raises(ValueError, match=re.escape(str(folder / name)) + ".*" + expected):
        t.train(resume_from_checkpoint=True)
    assert t.state.global_step == 0


def test_checksums_cover_every_file_of_a_checkpoint(model_dir, tmp_path):
    trained(model_dir, tmp_path, max_steps=1)
    folder = tmp_path / "checkpoint-1"
    listed = json.load(open(folder / ckpt.CHECKSUMS))
    on_disk = sorted(os.path.relpath(os.path.join(r, f), folder) for r, _, fs in os.walk(folder) for f in fs)
    assert sorted(listed) == [f for f in on_disk if f != ckpt.CHECKSUMS]
    import hashlib
    for name, digest in listed.items():  # an independent hash of each file
        assert hashlib.sha256(open(folder / name, "rb").read()).hexdigest() == digest


# ---------------------------------------------------------------- crash + resume, in subprocesses
def write_run(tmp_path, model_dir) -> str:
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in tiny.addition_rows(40)))
    config = {
        "model": model_dir, "dataset": str(data),
        "rewards": ["helpers_tiny:first_char_reward", "helpers_tiny:short_reward", "helpers_tiny:stall_at_step"],
        # a generation batch spans 2 optimizer steps (steps_per_generation 4, accumulation 2): checkpoint-3 is
        # taken with half a generation batch still to train on, and old logprobs are in play; beta > 0 adds KL.
        "per_device_train_batch_size": 4, "gradient_accumulation_steps": 2, "steps_per_generation": 4,
        "num_generations": 4, "max_completion_length": 6, "max_steps": 6, "save_steps": 3, "logging_steps": 1,
        "learning_rate": 3e-3, "beta": 0.04, "bf16": False, "disable_tqdm": True, "seed": 7,
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def fastrl_train(config, output_dir, *extra, env_extra=None):
    env = {**os.environ, "PYTHONPATH": TESTS_DIR + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1", **(env_extra or {})}
    cmd = [sys.executable, "-m", "fastrl.cli", "train", config, "--output_dir", str(output_dir), *extra]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc, timeout=240):
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-3000:]


def metrics(output_dir):
    rows = [json.loads(x) for x in open(os.path.join(output_dir, "metrics.jsonl"))]
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS and not k.startswith("time/")} for r in rows]


def test_kill_minus_9_then_resume_matches_a_straight_run(model_dir, tmp_path):
    config = write_run(tmp_path, model_dir)
    straight, crashed, marker = tmp_path / "straight", tmp_path / "crashed", tmp_path / "stalled"

    proc = fastrl_train(config, crashed, env_extra={"FASTRL_TEST_STALL_AT_STEP": "4",
                                                    "FASTRL_TEST_STALL_MARKER": str(marker)})
    reference = fastrl_train(config, straight)  # runs alongside
    deadline = time.time() + 240
    while not marker.exists():  # the reward function hangs in step 5's generation, after step 4 was logged
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        assert time.time() < deadline, "the run never reached step 5"
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert [os.path.basename(p) for p in ckpt.list_checkpoints(str(crashed))] == ["checkpoint-3"]
    assert len(metrics(crashed)) == 4  # steps 1-4 were logged before the kill

    finish(fastrl_train(config, crashed, "--resume_from_checkpoint", "true"))
    finish(reference)

    a, b = metrics(straight), metrics(crashed)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]
    assert a == b  # exact: every loss, reward, KL, grad norm and learning rate
    assert all(r["kl"] is not None for r in a[1:])
    wa = load_file(os.path.join(straight, "model.safetensors"))
    wb = load_file(os.path.join(crashed, "model.safetensors"))
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name
    initial = load_file(os.path.join(model_dir, "model.safetensors"))
    assert any(not torch.equal(wa[n], initial[n]) for n in wa)  # training did change the weights
