"""Reward aggregation as TRL 1.16 does it: reward_weights, multi_objective_aggregation, the per-function metrics,
`reward` (the weighted raw sum under either aggregation), frac_reward_zero_std and the advantages.

The control is TRL itself: both trainers run one step on the same tiny model with reward functions that return
fixed random tables (with None entries), so both see the same rewards whatever they sample; TRL's completions log
and log_history are compared with fastrl's completions.jsonl and log_history.
"""
import json
import math
import random

import pytest
from datasets import Dataset

import helpers_tiny as tiny
from fastrl import GRPOConfig, GRPOTrainer

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py
B, G = 8, 4


def table_rewards(seed: int, none_rate: float):
    """A reward function returning a fixed table (seeded), None at random places: independent of the sample."""
    rng = random.Random(seed)
    values = [None if rng.random() < none_rate else round(rng.uniform(-2, 3), 3) for _ in range(B)]
    values[:G] = [1.5] * G if seed % 2 else values[:G]  # one group with equal rewards (zero std) for one function

    def reward(completions, **kwargs):
        return list(values)

    reward.__name__ = f"table_{seed}"
    return reward


def run(trainer_cls, config_cls, model_dir, out, funcs, **fields):
    args = config_cls(output_dir=str(out), per_device_train_batch_size=B, num_generations=G, max_completion_length=3,
                      max_steps=1, logging_steps=1, learning_rate=0.0, bf16=False, use_cpu=True, report_to="none",
                      save_strategy="no", disable_tqdm=True, log_completions=True, num_completions_to_print=0,
                      shuffle_dataset=False, **fields)
    trainer = trainer_cls(model_dir, funcs, args, train_dataset=Dataset.from_list(tiny.addition_rows(B // G)))
    trainer.train()
    return trainer


@pytest.mark.parametrize("aggregation,scale_rewards,weights", [
    ("sum_then_normalize", "group", [1.0, 0.5]), ("sum_then_normalize", "batch", [2.0, -1.0]),
    ("sum_then_normalize", "none", None), ("normalize_then_sum", "group", [0.3, 1.7]),
    ("normalize_then_sum", "batch", None)])
def test_aggregation_matches_trl(model_dir, tmp_path, aggregation, scale_rewards, weights):
    trl = pytest.importorskip("trl")
    seeds = random.Random(f"{aggregation}{scale_rewards}").sample(range(100), 2)
    funcs = [table_rewards(seeds[0] * 2 + 1, 0.0), table_rewards(seeds[1] * 2, 0.3)]
    fields = dict(multi_objective_aggregation=aggregation, scale_rewards=scale_rewards, reward_weights=weights)
    theirs = run(trl.GRPOTrainer, trl.GRPOConfig, model_dir, tmp_path / "trl", funcs, **fields)
    ours = run(GRPOTrainer, GRPOConfig, model_dir, tmp_path / "fastrl", funcs, **fields)

    rows = [json.loads(line) for line in open(tmp_path / "fastrl" / "completions.jsonl")]
    assert [r["advantage"] for r in rows] == pytest.approx(list(theirs._logs["advantages"]), abs=1e-5)
    trl_log, our_log = theirs.state.log_history[0], ours.state.log_history[0]
    keys = [k for k in trl_log if k.startswith("rewards/")] + ["reward", "reward_std", "frac_reward_zero_std"]
    assert len(keys) == 7
    for k in keys:
        assert our_log[k] == pytest.approx(trl_log[k], abs=1e-5, nan_ok=True), k


def test_bad_aggregation_and_weights_are_refused(model_dir):
    with pytest.raises(ValueError, match="multi_objective_aggregation"):
        GRPOConfig(multi_objective_aggregation="mean")
    args = GRPOConfig(output_dir="unused", reward_weights=[1.0], per_device_train_batch_size=B, num_generations=G)
    with pytest.raises(ValueError, match="reward_weights"):
        GRPOTrainer(model_dir, [tiny.short_reward, tiny.first_char_reward], args,
                    train_dataset=Dataset.from_list(tiny.addition_rows(4)))


def test_unscorable_rows_keep_advantage_zero_under_normalize_then_sum():
    import torch

    from fastrl.scoring import aggregate_advantages

    per_func = torch.tensor([[1.0, math.nan], [math.nan, math.nan], [0.0, 2.0], [3.0, 1.0]])  # [B=4, F=2], G=2
    adv, std = aggregate_advantages(per_func, torch.ones(2), 2, "normalize_then_sum", "group")
    assert adv[1] == 0 and torch.isfinite(adv).all() and std.shape == (4,)
