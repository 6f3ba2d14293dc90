"""The output directory: an earlier run is never destroyed, two runs never share a folder, an unwritable folder
is found before the model loads. Real trainers on the tiny model; a second process holds the lock for real."""
import json
import os
import subprocess
import sys
import time

import pytest
from datasets import Dataset

import helpers_tiny as tiny
from fastrl import GRPOConfig, GRPOTrainer
from fastrl.output_dir import LOCK_FILE, OutputDirLock, write_probe

pytestmark = pytest.mark.usefixtures("one_thread")


def trainer(model_dir, out, **kw):
    base = dict(output_dir=str(out), per_device_train_batch_size=8, num_generations=4, max_completion_length=4,
                max_steps=2, logging_steps=1, learning_rate=1e-3, bf16=False, save_steps=1, disable_tqdm=True)
    return GRPOTrainer(model_dir, tiny.first_char_reward, GRPOConfig(**{**base, **kw}),
                       train_dataset=Dataset.from_list(tiny.addition_rows(16)))


def metrics_lines(out) -> int:
    return len(open(os.path.join(out, "metrics.jsonl")).read().splitlines())


def test_a_fresh_run_into_an_earlier_run_is_refused_and_nothing_changes(model_dir, tmp_path):
    trainer(model_dir, tmp_path, max_steps=3).train()
    run_files = lambda: {n: os.path.getmtime(tmp_path / n) for n in os.listdir(tmp_path) if n != LOCK_FILE}  # noqa
    before = run_files()
    with pytest.raises(ValueError, match="output_dir.*already holds a run.*resume_from_checkpoint"):
        trainer(model_dir, tmp_path).train()
    assert run_files() == before
    assert metrics_lines(tmp_path) == 3 and os.path.isdir(tmp_path / "checkpoint-3")


def test_overwrite_output_dir_sets_the_earlier_run_aside(model_dir, tmp_path):
    trainer(model_dir, tmp_path, max_steps=3).train()
    trainer(model_dir, tmp_path, overwrite_output_dir=True).train()
    aside = [n for n in os.listdir(tmp_path) if n.startswith("replaced-")]
    assert len(aside) == 1
    old = tmp_path / aside[0]
    assert metrics_lines(old) == 3 and os.path.isdir(old / "checkpoint-3")  # the earlier run, intact
    assert metrics_lines(tmp_path) == 2 and not os.path.exists(tmp_path / "checkpoint-3")  # the new run alone


def test_resuming_continues_the_earlier_run(model_dir, tmp_path):
    trainer(model_dir, tmp_path, max_steps=2).train()
    t = trainer(model_dir, tmp_path, max_steps=3, resume_from_checkpoint=True)
    t.train()
    assert t.state.global_step == 3 and metrics_lines(tmp_path) == 3


def test_a_second_process_on_the_same_folder_is_refused(tmp_path):
    """A real second process holds the lock; this one must be refused, naming the holder."""
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from fastrl.output_dir import OutputDirLock\n"
        f"with OutputDirLock({str(tmp_path)!r}):\n    print('locked', flush=True); time.sleep(60)")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ValueError, match=rf"in use by another run \(pid {holder.pid}\)"):
            OutputDirLock(str(tmp_path)).__enter__()
    finally:
        holder.kill()
        holder.wait()
    with OutputDirLock(str(tmp_path)):  # the kernel dropped the dead holder's lock
        assert os.path.exists(tmp_path / LOCK_FILE)


def test_a_trainer_is_refused_while_another_trains_in_the_folder(model_dir, tmp_path):
    with OutputDirLock(str(tmp_path)):
        t = trainer(model_dir, tmp_path)
        with pytest.raises(ValueError, match="in use by another run"):
            t.train()
    assert not os.path.exists(tmp_path / "metrics.jsonl")


def test_a_read_only_folder_is_found_before_the_model_loads(model_dir, tmp_path, monkeypatch):
    import fastrl.trainer
    monkeypatch.setattr(fastrl.trainer, "load_policy", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(ValueError, match="output_dir: '/proc/fastrl-out' can not be created"):
        trainer(model_dir, "/proc/fastrl-out")  # /proc refuses new folders, even to root
    if os.geteuid() == 0:
        return  # root writes into a chmod 555 folder: the case below needs an ordinary user
    out = tmp_path / "ro"
    out.mkdir()
    os.chmod(out, 0o555)
    try:
        with pytest.raises(ValueError, match="output_dir: .* is not writable"):
            trainer(model_dir, out)
    finally:
        os.chmod(out, 0o755)


def test_a_full_disk_is_named():
    """/dev/full answers every write with ENOSPC, as a full disk does."""
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full on this system")
    with pytest.raises(ValueError, match=r"output_dir: 'x' is not writable \(the disk is full\)"):
        write_probe("/dev/full", "output_dir: 'x'")


def test_fastrl_train_refuses_before_writing_anything(tmp_path):
    """The CLI path: an earlier run in output_dir is refused before the tiny model is written over it."""
    import yaml

    from fastrl.cli import main

    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text(json.dumps({"step": 1, "reward": 0.5}) + "\n")
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"model": "tiny", "task": "copy", "output_dir": str(out), "max_steps": 1}))
    started = time.time()
    assert main(["train", str(path)]) == 2
    assert not os.path.exists(out / "tiny_model") and time.time() - started < 60
