"""Dynamic sampling (DAPO): groups with equal rewards are dropped and more prompts drawn until the batch is full,
within a bounded number of attempts; through the trainer, no zero-std group is trained on."""
import json

import pytest
import torch
from datasets import Dataset

import helpers_rowrate
from fastrl import GRPOConfig, GRPOTrainer
from fastrl.dynamic_sampling import ScoredGroups, fill_generation_batch, varied_groups
from fastrl.generation.base import Rollout

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

NAN = float("nan")


# ---------------------------------------------------------------- the rule, on hand-made groups
def test_varied_groups_by_hand():
    rewards = torch.tensor([1, 1, 1, 1,  # all equal: dropped
                            0, 1, 0, 1,  # differ: kept
                            NAN, 1, NAN, NAN,  # one scorable reward: no spread, dropped
                            NAN, 0, 1, NAN,  # two scorable rewards that differ: kept
                            0.3, 0.3, 0.3 + 1e-12, 0.3])  # equal up to float noise (torch.isclose): dropped
    assert varied_groups(rewards, 4).tolist() == [False, True, False, True, False]


def scripted_sampler(patterns: list[list[bool]], G: int = 2):
    """sample() returning, call by call, groups that are varied (True) or constant (False) as scripted; each group
    is tagged with an id (call, position) carried in its row, completions and per-function rewards."""
    calls = []

    def sample() -> ScoredGroups:
        call = len(calls)
        calls.append(call)
        varied = patterns[call]
        ids = [(call, g) for g in range(len(varied))]
        rewards = torch.tensor([float(j) if v else 0.5 for v in varied for j in range(G)])  # [P*G]
        rollout = Rollout(completion_ids=[[call, g, j] for g in range(len(varied)) for j in range(G)],
                          logprobs=[[-1.0 * call]] * (len(varied) * G), truncated=[False] * (len(varied) * G))
        return ScoredGroups([{"id": i} for i in ids], [[call, g] for call, g in ids], rollout,
                            rewards.unsqueeze(1), rewards)

    return sample, calls


def test_fills_with_varied_groups_across_attempts():
    sample, calls = scripted_sampler([[False, True, False], [True, True, True]])
    batch, metrics = fill_generation_batch(sample, num_prompts=3, num_generations=2, max_attempts=5)
    assert [r["id"] for r in batch.rows] == [(0, 1), (1, 0), (1, 1)]  # surplus group (1, 2) discarded
    assert batch.prompt_ids == [[0, 1], [1, 0], [1, 1]]
    assert batch.rollout.completion_ids == [[0, 1, 0], [0, 1, 1], [1, 0, 0], [1, 0, 1], [1, 1, 0], [1, 1, 1]]
    assert batch.rewards.tolist() == [0.0, 1.0] * 3 and batch.rewards_per_func.shape == (6, 1)
    assert varied_groups(batch.rewards, 2).all()
    assert metrics == {"dynamic_sampling/attempts": 2.0, "dynamic_sampling/dropped_groups": 2.0,
                       "dynamic_sampling/filled_groups": 0.0}
    assert len(calls) == 2


def test_attempts_are_bounded_and_the_batch_topped_up():
    sample, calls = scripted_sampler([[False, False], [True, False], [False, False], [True, True]])
    with pytest.warns(UserWarning, match="3 attempts gave 1 of 2 groups"):
        batch, metrics = fill_generation_batch(sample, num_prompts=2, num_generations=2, max_attempts=3)
    assert len(calls) == 3  # the fourth (good) draw is never made
    assert len(batch.rows) == 2 and batch.rows[0]["id"] == (1, 0)
    assert varied_groups(batch.rewards, 2).tolist() == [True, False]  # one zero-advantage group fills the gap
    assert metrics["dynamic_sampling/attempts"] == 3.0 and metrics["dynamic_sampling/filled_groups"] == 1.0
    assert metrics["dynamic_sampling/dropped_groups"] == 5.0


def test_max_attempts_must_be_positive():
    sample, _ = scripted_sampler([[True]])
    with pytest.raises(ValueError, match="dynamic_sampling_max_attempts"):
        fill_generation_batch(sample, 1, 2, max_attempts=0)
    with pytest.raises(ValueError, match="dynamic_sampling_max_attempts"):
        GRPOConfig(dynamic_sampling=True, dynamic_sampling_max_attempts=0)


# ---------------------------------------------------------------- through the trainer
def train_metrics(model_dir, out, constant: list[bool], **kw) -> list[dict]:
    """Train 3 steps on prompts whose rewards are constant for the rows marked so; per-step metrics."""
    rows = [{"prompt": f"{i}+{i}=", "id": i, "constant": c} for i, c in enumerate(constant)]
    args = GRPOConfig(**{**dict(output_dir=str(out), per_device_train_batch_size=8, num_generations=4,
                                max_completion_length=3, max_steps=3, logging_steps=1, learning_rate=1e-3,
                                bf16=False, save_strategy="no", disable_tqdm=True), **kw})
    GRPOTrainer(model=model_dir, reward_funcs=helpers_rowrate.constant_for_some_reward, args=args,
                train_dataset=Dataset.from_list(rows)).train()
    return [json.loads(line) for line in open(out / "metrics.jsonl")]


def test_no_zero_std_group_is_trained_on(model_dir, tmp_path):
    constant = [i % 2 == 0 for i in range(16)]  # half the prompts always get the same reward
    plain = train_metrics(model_dir, tmp_path / "plain", constant)
    assert sum(m["frac_reward_zero_std"] for m in plain) > 0  # without it, such groups are trained on
    assert "dynamic_sampling/attempts" not in plain[0]

    dynamic = train_metrics(model_dir, tmp_path / "dynamic", constant, dynamic_sampling=True)
    assert [m["frac_reward_zero_std"] for m in dynamic] == [0.0, 0.0, 0.0]
    assert sum(m["dynamic_sampling/dropped_groups"] for m in dynamic) > 0
    assert all(m["dynamic_sampling/filled_groups"] == 0 for m in dynamic)
    assert all(1 <= m["dynamic_sampling/attempts"] <= 10 for m in dynamic)


def test_all_constant_prompts_stop_after_max_attempts(model_dir, tmp_path):
    with pytest.warns(UserWarning, match="zero-advantage groups"):
        metrics = train_metrics(model_dir, tmp_path, [True] * 8, dynamic_sampling=True,
                                dynamic_sampling_max_attempts=2, max_steps=1)
    assert metrics[0]["dynamic_sampling/attempts"] == 2 and metrics[0]["dynamic_sampling/filled_groups"] == 2
    assert metrics[0]["frac_reward_zero_std"] == 1.0
