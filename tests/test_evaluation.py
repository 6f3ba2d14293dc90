"""Evaluation as TRL 1.16 runs it (fastrl.evaluation): eval_dataset (Dataset, IterableDataset, dict of them),
per_device_eval_batch_size, num_generations_eval, eval_strategy/eval_steps/eval_on_start, trainer.evaluate().
TRL itself is the control for the metric keys and for rewards that do not depend on what was sampled."""
import json

import pytest
import torch
from datasets import Dataset, IterableDataset

import helpers_tiny as tiny
from fastrl import GRPOConfig, GRPOTrainer

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def answer_value(completions, answer, **kwargs):
    """A reward fixed by the prompt (its answer / 10): equal in TRL and fastrl whatever they sample."""
    return [int(a) / 10 for a in answer]


def small_args(config_cls, out, **fields):
    base = dict(output_dir=str(out), per_device_train_batch_size=4, num_generations=2, max_completion_length=3,
                max_steps=1, logging_steps=1, learning_rate=1e-2, bf16=False, use_cpu=True, report_to="none",
                save_strategy="no", disable_tqdm=True, per_device_eval_batch_size=6, num_generations_eval=3)
    return config_cls(**{**base, **fields})


def test_evaluate_keys_and_rewards_match_trl(model_dir, tmp_path):
    trl = pytest.importorskip("trl")
    train, held_out = Dataset.from_list(tiny.addition_rows(8)), Dataset.from_list(tiny.addition_rows(40)[20:29])
    funcs = [answer_value, tiny.short_reward]
    theirs = trl.GRPOTrainer(model_dir, funcs, small_args(trl.GRPOConfig, tmp_path / "trl"), train_dataset=train,
                             eval_dataset=held_out).evaluate()
    ours = GRPOTrainer(model_dir, funcs, small_args(GRPOConfig, tmp_path / "ours"), train_dataset=train,
                       eval_dataset=held_out).evaluate()
    # transformers times the first evaluation's model preparation; fastrl has no such step
    assert set(theirs) - {"eval_model_preparation_time"} <= set(ours), set(theirs) - set(ours)
    assert all(k.startswith("eval_") for k in ours if k != "epoch")
    assert ours["eval_rewards/answer_value/mean"] == pytest.approx(theirs["eval_rewards/answer_value/mean"], abs=1e-6)
    # 9 prompts, 2 per batch of 6 completions, in TRL's seeded order; batch means averaged (TRL's logging)
    order = torch.randperm(9, generator=torch.Generator().manual_seed(42)).tolist()
    values = [int(held_out[i]["answer"]) / 10 for i in order]
    means = [sum(values[i:i + 2]) / len(values[i:i + 2]) for i in range(0, 9, 2)]
    assert ours["eval_rewards/answer_value/mean"] == pytest.approx(sum(means) / len(means), abs=1e-6)
    assert ours["eval_rewards/answer_value/std"] == pytest.approx(theirs["eval_rewards/answer_value/std"], abs=1e-6)


def test_evaluation_during_training(model_dir, tmp_path):
    """eval_on_start + every 2 steps, a dict of a Dataset and an IterableDataset: entries at steps 0, 2, 4 for
    each set, in log_history and metrics.jsonl, and eval points on curves.png's axes."""
    rows = tiny.addition_rows(40)[20:26]
    sets = {"small": Dataset.from_list(rows[:4]),
            "stream": IterableDataset.from_generator(lambda: iter(rows))}
    args = small_args(GRPOConfig, tmp_path, max_steps=4, eval_strategy="steps", eval_steps=2, eval_on_start=True)
    trainer = GRPOTrainer(model_dir, [answer_value, tiny.short_reward], args,
                          train_dataset=Dataset.from_list(tiny.addition_rows(8)), eval_dataset=sets)
    trainer.train()
    for name, n in (("small", 4), ("stream", 6)):
        entries = [e for e in trainer.state.log_history if f"eval_{name}_loss" in e]
        assert [e["step"] for e in entries] == [0, 2, 4]
        expected = sum(int(r["answer"]) / 10 for r in rows[:n]) / n  # whole batches of 2 prompts: the plain mean
        assert all(e[f"eval_{name}_rewards/answer_value/mean"] == pytest.approx(expected) for e in entries)
        assert all(e[f"eval_{name}_samples_per_second"] > 0 for e in entries)
    lines = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")]
    assert [x["step"] for x in lines if "eval_small_reward" in x] == [0, 2, 4]
    assert [x["step"] for x in lines if "reward" in x] == [1, 2, 3, 4]
    assert (tmp_path / "curves.png").exists()


def test_evaluate_does_not_update_the_model(model_dir, tmp_path):
    trainer = GRPOTrainer(model_dir, answer_value, small_args(GRPOConfig, tmp_path),
                          train_dataset=Dataset.from_list(tiny.addition_rows(8)),
                          eval_dataset=Dataset.from_list(tiny.addition_rows(6)))
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    metrics = trainer.evaluate()
    assert trainer.model.training and all(torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())
    assert metrics["eval_loss"] == pytest.approx(trainer.state.log_history[-1]["eval_loss"])
    assert all(p.grad is None for p in trainer.model.parameters())


def test_evaluation_errors(model_dir, tmp_path):
    train = Dataset.from_list(tiny.addition_rows(8))
    with pytest.raises(ValueError, match="eval_dataset: eval_strategy='steps' needs an eval_dataset"):
        GRPOTrainer(model_dir, answer_value, small_args(GRPOConfig, tmp_path, eval_strategy="steps"),
                    train_dataset=train)
    with pytest.raises(ValueError, match="per_device_eval_batch_size"):
        small_args(GRPOConfig, tmp_path, eval_strategy="steps", per_device_eval_batch_size=4)
    trainer = GRPOTrainer(model_dir, answer_value, small_args(GRPOConfig, tmp_path), train_dataset=train)
    with pytest.raises(ValueError, match="evaluation requires an eval_dataset"):
        trainer.evaluate()
    with pytest.raises(ValueError, match="eval_dataset.*'prompt' column"):
        trainer.evaluate(Dataset.from_list([{"question": "1+1="}]))


def test_the_demo_eval_config_evaluates(tmp_path):
    """examples/demo_eval.yaml, shortened: eval rows at steps 0, 1, 2 in metrics.jsonl, from the task's eval set."""
    import os

    from fastrl.cli import main

    config = os.path.join(os.path.dirname(__file__), "..", "examples", "demo_eval.yaml")
    assert main(["train", config, "--output_dir", str(tmp_path), "--max_steps", "2", "--eval_steps", "1",
                 "--per_device_train_batch_size", "16", "--task_args", "{num_examples: 64, num_eval_examples: 8}",
                 "--per_device_eval_batch_size", "16"]) == 0
    lines = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")]
    assert [x["step"] for x in lines if "eval_reward" in x] == [0, 1, 2]
