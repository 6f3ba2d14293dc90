"""What the trainer refuses, names or warns about instead of training something wrong: bad dataset rows, reward
functions that raise / need a missing column / return nothing usable, non-finite loss and weights, and the
honoured GRPOConfig fields that once were accepted and ignored (tf32, logging_strategy, logging_dir, log_level).
Real trainers on tests/helpers_tiny's model."""
import json
import math
import os
import warnings

import pytest
import torch
from datasets import Dataset

import helpers_tiny as tiny
from fastrl import GRPOConfig, GRPOTrainer
from fastrl.scoring import RewardFunctionError

pytestmark = pytest.mark.usefixtures("one_thread")


def small_args(out, **kw):
    base = dict(output_dir=str(out), per_device_train_batch_size=8, num_generations=4, max_completion_length=4,
                max_steps=2, logging_steps=1, learning_rate=1e-3, bf16=False, save_strategy="no",
                disable_tqdm=True)
    return GRPOConfig(**{**base, **kw})


def build(model_dir, out, reward=tiny.first_char_reward, rows=None, **kw):
    rows = rows if rows is not None else tiny.addition_rows(16)
    return GRPOTrainer(model_dir, reward, small_args(out, **kw), train_dataset=Dataset.from_list(rows))


# ---------------------------------------------------------------- dataset rows, before the model loads
@pytest.mark.parametrize("bad_row, expected", [
    ({"prompt": None, "answer": "1"}, r"row 11: 'prompt' must be a non-empty string"),
    ({"prompt": 7, "answer": "1"}, r"row 11: 'prompt' must be"),
    ({"prompt": "", "answer": "1"}, r"row 11: 'prompt' must be"),
    ({"prompt": [{"role": "user", "content": "1+1="}], "answer": "2"}, r"row 11: a chat prompt among text"),
], ids=["null", "int", "empty", "chat-among-text"])
def test_a_bad_row_deep_in_the_dataset_is_named_before_the_model_loads(model_dir, tmp_path, monkeypatch,
                                                                       bad_row, expected):
    import fastrl.trainer
    monkeypatch.setattr(fastrl.trainer, "load_policy", lambda *a, **k: pytest.fail("the model was loaded"))
    rows = [{"prompt": r["prompt"], "answer": r["answer"]} for r in tiny.addition_rows(16)]
    rows[11] = bad_row
    with pytest.raises(ValueError, match=f"train_dataset: {expected}"):
        GRPOTrainer(model_dir, tiny.first_char_reward, small_args(tmp_path), train_dataset=ListDataset(rows))


class ListDataset(list):
    """A list of rows with the two things the trainer reads from a dataset (Arrow would refuse mixed kinds)."""

    @property
    def column_names(self):
        return list(self[0])

    def __getitem__(self, key):
        return [r[key] for r in self] if isinstance(key, str) else list.__getitem__(self, key)


# ---------------------------------------------------------------- reward functions
def test_a_reward_function_that_raises_is_named(model_dir, tmp_path):
    def lookup_reward(completions, answer, **kw):
        return [{"7": 1.0}[a] for a in answer]  # KeyError on most answers

    t = build(model_dir, tmp_path, reward=[tiny.first_char_reward, lookup_reward])
    with pytest.raises(RewardFunctionError, match=r"reward function 'lookup_reward' raised KeyError") as info:
        t.train()
    assert isinstance(info.value.__cause__, KeyError) and t.state.global_step == 0


def test_a_reward_function_needing_a_missing_column_fails_at_construction(model_dir, tmp_path):
    def needs_solution(completions, solution, **kw):
        return [0.0] * len(completions)

    with pytest.raises(ValueError, match=r"reward function 'needs_solution' needs dataset column\(s\) \['solution'\]"):
        build(model_dir, tmp_path, reward=needs_solution)


@pytest.mark.parametrize("value", [1e38, -1e19])
def test_a_huge_reward_is_refused_naming_the_function(model_dir, tmp_path, value):
    def huge(completions, **kw):
        return [value] * len(completions)

    t = build(model_dir, tmp_path, reward=[tiny.first_char_reward, huge])
    with pytest.raises(ValueError, match=r"reward function 'huge' returned .*at most 1e\+18"):
        t.train()


@pytest.mark.parametrize("output, said", [(None, "None or NaN for every completion"),
                                          (math.nan, "None or NaN for every completion"),
                                          (0.5, "0.5 for every completion")], ids=["none", "nan", "constant"])
def test_an_uninformative_reward_stream_warns_once_naming_the_function(model_dir, tmp_path, output, said):
    def flat(completions, **kw):
        return [output] * len(completions)

    t = build(model_dir, tmp_path, reward=[tiny.short_reward, flat], max_steps=3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t.train()
    ours = [str(w.message) for w in caught if "reward function" in str(w.message)]
    assert [m for m in ours if "'flat'" in m] == [f"reward function 'flat' returned {said} of a generation batch: "
                                                  "it gives no learning signal there (warned once per function)"]


# ---------------------------------------------------------------- non-finite loss, gradients, weights
class PoisonWeight:
    """A callback that writes NaN into one weight at a given event (the model's own state, nothing mocked)."""

    def __init__(self, event, step):
        self.event, self.step = event, step
        setattr(self, event, self._poison)

    def _poison(self, args, state, control, model=None, **kw):
        if state.global_step == self.step:
            with torch.no_grad():
                model.model.layers[0].mlp.up_proj.weight[0, 0] = math.nan


def test_a_nan_loss_stops_the_run_naming_the_step_before_anything_is_saved(model_dir, tmp_path):
    args = small_args(tmp_path, save_strategy="steps", save_steps=1, max_steps=3)
    t = GRPOTrainer(model_dir, tiny.first_char_reward, args, train_dataset=Dataset.from_list(tiny.addition_rows(16)),
                    callbacks=[PoisonWeight("on_step_begin", 1)])
    with pytest.raises(FloatingPointError, match=r"step 2: the loss is nan"):
        t.train()
    assert sorted(n for n in os.listdir(tmp_path) if n.startswith("checkpoint")) == ["checkpoint-1"]
    assert t.state.global_step == 1


def test_a_non_finite_weight_is_never_saved(model_dir, tmp_path):
    args = small_args(tmp_path, save_strategy="steps", save_steps=1)
    t = GRPOTrainer(model_dir, tiny.first_char_reward, args, train_dataset=Dataset.from_list(tiny.addition_rows(16)),
                    callbacks=[PoisonWeight("on_step_end", 1)])
    with pytest.raises(FloatingPointError, match=r"step 1: weight model.layers.0.mlp.up_proj.weight is not finite"):
        t.train()
    assert not any(n.startswith("checkpoint") for n in os.listdir(tmp_path))


def test_a_non_finite_gradient_stops_the_run_naming_the_parameter(model_dir, tmp_path):
    """A hook makes one parameter's gradient inf (as an overflow would); the step is refused, weights unchanged."""
    t = build(model_dir, tmp_path)
    param = t.model.model.layers[1].self_attn.q_proj.weight
    param.register_hook(lambda g: torch.full_like(g, math.inf))
    before = param.detach().clone()
    with pytest.raises(FloatingPointError, match=r"step 1: the gradient of model.layers.1.self_attn.q_proj.weight"):
        t.train()
    assert torch.equal(param.detach(), before)


# ---------------------------------------------------------------- honoured fields
def test_tf32_sets_the_matmul_precision_the_kernels_read(model_dir, tmp_path):
    from fastrl.kernels.forward_sweep_triton import dot_settings

    saved = torch.get_float32_matmul_precision()
    try:
        build(model_dir, tmp_path, tf32=True)
        assert torch.get_float32_matmul_precision() == "high" and dot_settings(torch.float32)[1] != "ieee"
        build(model_dir, tmp_path, tf32=False)
        assert torch.get_float32_matmul_precision() == "highest" and dot_settings(torch.float32)[1] == "ieee"
    finally:
        torch.set_float32_matmul_precision(saved)


def test_logging_strategy_no_logs_no_windows(model_dir, tmp_path):
    t = build(model_dir, tmp_path / "no", logging_strategy="no", max_steps=3)
    t.train()
    assert [e for e in t.state.log_history if "loss" in e] == []  # only the final train summary
    assert len(open(tmp_path / "no" / "metrics.jsonl").read().splitlines()) == 3  # fastrl's per-step record stays
    s = build(model_dir, tmp_path / "steps", max_steps=3)
    s.train()
    assert len([e for e in s.state.log_history if "loss" in e]) == 3


def test_logging_dir_is_where_tensorboard_writes(model_dir, tmp_path):
    pytest.importorskip("tensorboard")
    build(model_dir, tmp_path / "out", report_to="tensorboard", logging_dir=str(tmp_path / "tb"), max_steps=1).train()
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path / "tb"))
    assert not os.path.exists(tmp_path / "out" / "runs")


def test_log_level_sets_transformers_verbosity(model_dir, tmp_path):
    from transformers.utils import logging as hf_logging

    saved = hf_logging.get_verbosity()
    try:
        build(model_dir, tmp_path, log_level="error")
        assert hf_logging.get_verbosity() == 40
    finally:
        hf_logging.set_verbosity(saved)


# ---------------------------------------------------------------- one weight push per generation batch
def test_dynamic_sampling_pushes_the_weights_once_per_generation_batch(model_dir, tmp_path):
    """With every group constant, dynamic sampling draws max_attempts times per batch; the weights, unchanged
    between those draws, are pushed once. Counted on the real generator's push_weights."""
    def constant(completions, **kw):
        return [1.0] * len(completions)

    with pytest.warns(UserWarning):
        t = build(model_dir, tmp_path, reward=constant, dynamic_sampling=True, dynamic_sampling_max_attempts=3,
                  max_steps=2)
        pushes, real = [], t.generator.push_weights
        t.generator.push_weights = lambda model: pushes.append(1) or real(model)
        t.train()
    rows = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")]
    assert [r["dynamic_sampling/attempts"] for r in rows] == [3.0, 3.0] and len(pushes) == 2
