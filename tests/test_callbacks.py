"""transformers' TrainerCallback objects passed as callbacks=[...], as TRL users pass them: the events, their order
and arguments, and the TrainerControl flags a callback sets (stop, save, log)."""
import json

import pytest
from datasets import Dataset
from transformers import TrainerCallback

import helpers_tiny as tiny
from fastrl import GRPOConfig, GRPOTrainer
from fastrl import checkpoint as ckpt

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def small_args(out, **kw):
    base = dict(output_dir=str(out), per_device_train_batch_size=8, num_generations=4, max_completion_length=4,
                max_steps=3, logging_steps=1, learning_rate=1e-3, bf16=False, save_strategy="no",
                disable_tqdm=True, report_to="none")
    return GRPOConfig(**{**base, **kw})


def trainer_with(model_dir, out, callbacks, **kw):
    return GRPOTrainer(model_dir, tiny.first_char_reward, small_args(out, **kw),
                       train_dataset=Dataset.from_list(tiny.addition_rows(16)), callbacks=callbacks)


class Recorder(TrainerCallback):
    """Every event with the step it saw; the keyword arguments of each, once."""

    def __init__(self):
        self.events, self.kwargs, self.logs = [], {}, []

    def _record(self, event, args, state, control, **kwargs):
        self.events.append((event, state.global_step))
        self.kwargs.setdefault(event, kwargs)

    def on_init_end(self, args, state, control, **kw): self._record("init_end", args, state, control, **kw)
    def on_train_begin(self, args, state, control, **kw): self._record("train_begin", args, state, control, **kw)
    def on_step_begin(self, args, state, control, **kw): self._record("step_begin", args, state, control, **kw)
    def on_step_end(self, args, state, control, **kw): self._record("step_end", args, state, control, **kw)
    def on_save(self, args, state, control, **kw): self._record("save", args, state, control, **kw)
    def on_train_end(self, args, state, control, **kw): self._record("train_end", args, state, control, **kw)

    def on_log(self, args, state, control, logs=None, **kw):
        self._record("log", args, state, control, logs=logs, **kw)
        self.logs.append(dict(logs))


def test_events_arrive_in_transformers_order_with_its_arguments(model_dir, tmp_path):
    rec = Recorder()
    trainer = trainer_with(model_dir, tmp_path, [rec], max_steps=2, save_strategy="steps", save_steps=2)
    assert rec.events == [("init_end", 0)]
    trainer.train()
    # transformers' _inner_training_loop: step_begin, (update), step_end, then log and save; the summary log last
    assert rec.events == [("init_end", 0), ("train_begin", 0),
                          ("step_begin", 0), ("step_end", 1), ("log", 1),
                          ("step_begin", 1), ("step_end", 2), ("log", 2), ("save", 2),
                          ("log", 2), ("train_end", 2)]
    for event, kwargs in rec.kwargs.items():
        assert kwargs["model"] is trainer.model and kwargs["processing_class"] is trainer.processing_class, event
        assert {"optimizer", "lr_scheduler", "train_dataloader", "eval_dataloader"} <= set(kwargs), event
    assert rec.kwargs["init_end"]["optimizer"] is None  # built by train(), as in transformers
    assert rec.kwargs["step_end"]["optimizer"] is trainer.optimizer
    assert rec.kwargs["step_end"]["lr_scheduler"] is trainer.lr_scheduler
    # on_log gets the entries of state.log_history (step metrics, then the run summary)
    assert rec.logs == trainer.state.log_history
    assert "loss" in rec.logs[0] and "train_runtime" in rec.logs[-1]


def test_state_has_the_fields_callbacks_read(model_dir, tmp_path):
    seen = {}

    class Reader(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            seen.setdefault("first", {k: getattr(state, k) for k in (
                "global_step", "max_steps", "epoch", "logging_steps", "save_steps", "train_batch_size",
                "num_train_epochs", "is_world_process_zero", "is_local_process_zero", "best_metric",
                "num_input_tokens_seen")})
            seen["log_history_len"] = len(state.log_history)

    trainer = trainer_with(model_dir, tmp_path, [Reader], max_steps=2, logging_steps=0.5)  # a class, instantiated
    trainer.train()
    first = seen["first"]
    assert first["global_step"] == 1 and first["max_steps"] == 2 and 0 < first["epoch"] <= 1
    assert first["logging_steps"] == 1  # the ratio 0.5 of max_steps 2, in steps
    assert first["train_batch_size"] == 8 and first["num_train_epochs"] == 3.0
    assert first["is_world_process_zero"] is True and first["is_local_process_zero"] is True
    assert first["best_metric"] is None and first["num_input_tokens_seen"] > 0
    assert seen["log_history_len"] == 1  # on_step_end runs before the step's log entry is appended


class StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True
        return control


def test_should_training_stop_stops_after_the_step(model_dir, tmp_path):
    rec = Recorder()
    trainer = trainer_with(model_dir, tmp_path, [StopAt(2), rec], max_steps=5, logging_steps=10)
    out = trainer.train()
    assert trainer.state.global_step == 2 and out.global_step == 2
    steps = [e for e in trainer.state.log_history if "loss" in e]
    assert [e["step"] for e in steps] == [2]  # the open logging window is closed at the stop
    assert [s for e, s in rec.events if e == "step_end"] == [1, 2] and rec.events[-1] == ("train_end", 2)
    lines = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")]
    assert [x["step"] for x in lines] == [1, 2]


def test_should_save_and_should_log_from_a_callback(model_dir, tmp_path):
    class SaveAndLogAtOne(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 1:
                control.should_save = control.should_log = True

    rec = Recorder()
    trainer = trainer_with(model_dir, tmp_path, [SaveAndLogAtOne(), rec], max_steps=3, logging_steps=10,
                           save_strategy="no")
    trainer.train()
    assert [s for e, s in rec.events if e == "save"] == [1]  # save_strategy="no", yet the callback asked
    assert [ckpt.os.path.basename(p) for p in ckpt.list_checkpoints(str(tmp_path))] == ["checkpoint-1"]
    assert [e["step"] for e in trainer.state.log_history if "loss" in e] == [1, 3]
    assert trainer.control.should_save is False  # reset after the save, as transformers' handler does


def test_add_and_pop_callback(model_dir, tmp_path):
    rec = Recorder()
    trainer = trainer_with(model_dir, tmp_path, None, max_steps=1)
    trainer.add_callback(rec)
    class Noop(TrainerCallback):
        pass

    trainer.add_callback(Noop)  # a class is instantiated, as transformers does
    assert isinstance(trainer.pop_callback(Noop), Noop) and trainer.callbacks == [rec]
    trainer.train()
    assert rec.events[0] == ("train_begin", 0) and rec.events[-1] == ("train_end", 1)
