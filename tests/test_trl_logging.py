"""Logging and warnings as TRL 1.16 does them: log_extra columns, the last log_history entry, TRL's warnings, and
a trainer built with no `args` (output folder named after the model). TRL itself is the control where the result
is deterministic (entry keys, the default output_dir)."""
import json
import logging

import pytest
import torch
from datasets import Dataset

import helpers_tiny as tiny
from fastrl import GRPOConfig, GRPOTrainer

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def small_args(config_cls, out, **fields):
    fields.setdefault("max_steps", 2)
    return config_cls(output_dir=str(out), per_device_train_batch_size=4, num_generations=2, max_completion_length=3,
                      logging_steps=1, learning_rate=1e-3, bf16=False, use_cpu=True, report_to="none",
                      save_strategy="no", disable_tqdm=True, **fields)


def test_log_extra_columns_reach_completions_jsonl_and_the_table(model_dir, tmp_path, capsys):
    def tagged(completions, log_extra, **kwargs):
        log_extra("source", [f"row{i}" for i in range(len(completions))])
        log_extra("length", [len(c) for c in completions])
        return [float(len(c)) for c in completions]

    args = small_args(GRPOConfig, tmp_path, log_completions=True, num_completions_to_print=2)
    GRPOTrainer(model_dir, tagged, args, train_dataset=Dataset.from_list(tiny.addition_rows(8))).train()
    rows = [json.loads(line) for line in open(tmp_path / "completions.jsonl")]
    assert len(rows) == 8 and list(rows[0]) == ["step", "prompt", "completion", "tagged", "advantage", "source",
                                                "length"]
    assert [r["source"] for r in rows[:4]] == ["row0", "row1", "row2", "row3"]
    assert all(r["length"] == len(r["completion"]) == r["tagged"] for r in rows)
    out = capsys.readouterr().out
    assert "source" in out and "row" in out


def test_log_extra_with_the_wrong_length_is_refused(model_dir, tmp_path):
    def short(completions, log_extra, **kwargs):
        log_extra("source", ["only one"])
        return [0.0] * len(completions)

    trainer = GRPOTrainer(model_dir, short, small_args(GRPOConfig, tmp_path),
                          train_dataset=Dataset.from_list(tiny.addition_rows(8)))
    with pytest.raises(ValueError, match="log_extra: column 'source' got 1 values for 4 completions"):
        trainer.train()


def test_last_log_history_entry_is_shaped_as_trls(model_dir, tmp_path):
    trl = pytest.importorskip("trl")
    ds = Dataset.from_list(tiny.addition_rows(8))
    theirs = trl.GRPOTrainer(model_dir, tiny.short_reward, small_args(trl.GRPOConfig, tmp_path / "trl"),
                             train_dataset=ds)
    theirs.train()
    ours = GRPOTrainer(model_dir, tiny.short_reward, small_args(GRPOConfig, tmp_path / "fastrl"), train_dataset=ds)
    ours.train()
    assert list(ours.state.log_history[-1]) == list(theirs.state.log_history[-1])
    assert ours.state.log_history[-1]["step"] == 2
    # TRL's per-step keys are a subset of fastrl's (fastrl adds its own timings and memory)
    missing = set(theirs.state.log_history[0]) - set(ours.state.log_history[0])
    assert not missing, missing


def test_no_args_names_the_output_folder_after_the_model_as_trl(model_dir, tmp_path, monkeypatch):
    """TRL 1.16's rule (GRPOTrainer.__init__): GRPOConfig(f"{model id's last part}-GRPO"). TRL itself cannot be
    the control here: its default bf16=True refuses a machine without a GPU."""
    monkeypatch.chdir(tmp_path)
    ds = Dataset.from_list(tiny.addition_rows(8))
    assert GRPOTrainer(model_dir, tiny.short_reward, train_dataset=ds).args.output_dir == "model-GRPO"
    loaded = tiny.build_model(tiny.build_tokenizer())
    loaded.config._name_or_path = "org/tiny-llama"
    trainer = GRPOTrainer(loaded, tiny.short_reward, train_dataset=ds, processing_class=tiny.build_tokenizer())
    assert trainer.args.output_dir == "tiny-llama-GRPO"


def test_trls_warnings(model_dir, tmp_path, caplog):
    ds = Dataset.from_list(tiny.addition_rows(8))
    with caplog.at_level(logging.WARNING):
        GRPOTrainer(model_dir, tiny.short_reward,
                    small_args(GRPOConfig, tmp_path, importance_sampling_level="sequence"), train_dataset=ds)
    assert "`importance_sampling_level='sequence'`, the `'dapo'` loss sums per-token" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):  # VESPO sums tokens too, but TRL gives it its own warning only
        GRPOTrainer(model_dir, tiny.short_reward, small_args(GRPOConfig, tmp_path, loss_type="vespo",
                                                             importance_sampling_level="sequence"), train_dataset=ds)
    assert "VESPO computes sequence-level importance weights internally" in caplog.text
    assert "loss sums per-token" not in caplog.text
    caplog.clear()

    def never(completions, **kwargs):
        return [None] * len(completions)

    with caplog.at_level(logging.WARNING):
        GRPOTrainer(model_dir, never, small_args(GRPOConfig, tmp_path, max_steps=1), train_dataset=ds).train()
    assert "All reward functions returned None for the following kwargs" in caplog.text
    assert "'answer':" in caplog.text  # the row's dataset columns are shown, as TRL shows them


def test_no_reward_source_is_trls_error(model_dir, tmp_path):
    with pytest.raises(ValueError, match="No reward source provided"):
        GRPOTrainer(model_dir, None, small_args(GRPOConfig, tmp_path),
                    train_dataset=Dataset.from_list(tiny.addition_rows(8)))


def test_trls_other_trainer_arguments(model_dir, tmp_path):
    """optimizers is honoured (TRL's (optimizer, scheduler) pair); what fastrl lacks is refused by name."""
    ds = Dataset.from_list(tiny.addition_rows(8))
    model = tiny.build_model(tiny.build_tokenizer())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    trainer = GRPOTrainer(model, tiny.short_reward, small_args(GRPOConfig, tmp_path, max_steps=1), train_dataset=ds,
                          processing_class=tiny.build_tokenizer(), optimizers=(optimizer, None))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer.train()
    assert trainer.optimizer is optimizer  # lr 0: SGD leaves every weight as it was
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match=r"^quantization_config is not supported by fastrl"):
        GRPOTrainer(model_dir, tiny.short_reward, small_args(GRPOConfig, tmp_path), train_dataset=ds,
                    quantization_config=object())
