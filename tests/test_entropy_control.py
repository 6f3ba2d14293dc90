"""The entropy bonus's coefficient over a run (fastrl.entropy_control), TRL 1.16's semantics: the controller's
rules on hand-set entropies, then real training runs (gradient accumulation 2) whose logged entropy_coef follows
them, checkpoints that carry the controller's state, and evaluation that never moves it. The loss itself is
checked against TRL's _compute_loss in tests/test_loss_types_trl.py."""
import math
from types import SimpleNamespace

import pytest
from datasets import Dataset

import helpers_tiny as tiny
from fastrl import GRPOConfig, GRPOTrainer
from fastrl.entropy_control import EntropyControl

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def settings(**kw):
    base = dict(entropy_coef=0.1, use_adaptive_entropy=True, entropy_target=1.0, entropy_coef_min=0.0,
                entropy_coef_max=0.12, entropy_coef_delta=0.015)
    return SimpleNamespace(**{**base, **kw})


def test_controller_rules():
    c = EntropyControl(settings())
    assert c.enabled and c.applied_coef() == 0.0  # no entropy measured yet (inf > target): no bonus
    c.observe(0.5 * 10, 10)
    c.observe(1.1 * 30, 30)
    assert c.window == (38.0, 40.0)
    c.end_step(*c.window)  # 0.95 <= 1.0: up by delta, capped at max
    assert c.coef == pytest.approx(0.115) and c.last_entropy == pytest.approx(0.95) and c.window == (0.0, 0.0)
    assert c.applied_coef() == pytest.approx(0.115)
    c.end_step(2.0, 2.0)  # 1.0 <= 1.0 still "at or below": up, capped
    assert c.coef == 0.12
    c.end_step(50.0, 10.0)  # 5.0 > 1.0: down, and the bonus is off until entropy falls to the target again
    assert c.coef == pytest.approx(0.105) and c.applied_coef() == 0.0
    c.end_step(0.0, 0.0)  # a window with no bonus tokens measures 0 / max(1, 0) = 0 (TRL's clamp)
    assert c.last_entropy == 0.0


def test_static_and_off():
    static = EntropyControl(settings(use_adaptive_entropy=False, entropy_coef=0.2))
    static.end_step(100.0, 1.0)
    assert static.applied_coef() == 0.2 and static.coef == 0.2  # never moves
    off = EntropyControl(settings(use_adaptive_entropy=False, entropy_coef=0.0))
    assert not off.enabled and off.applied_coef() is None  # no bonus term at all (the single-pass path stays)
    assert EntropyControl(settings(entropy_coef=0.0)).applied_coef() == 0.0  # adaptive at 0 stays on, to recover


def config(out, steps, **kw):
    base = dict(output_dir=str(out), per_device_train_batch_size=4, gradient_accumulation_steps=2, num_generations=4,
                max_completion_length=4, max_steps=steps, logging_steps=1, learning_rate=1e-3, bf16=False,
                use_cpu=True, save_strategy="no", disable_tqdm=True, report_to="none")
    return GRPOConfig(**{**base, **kw})


def run(model_dir, out, steps=3, resume=None, **kw):
    trainer = GRPOTrainer(model_dir, tiny.first_char_reward, config(out, steps, **kw),
                          train_dataset=Dataset.from_list(tiny.addition_rows(16)))
    trainer.train(resume_from_checkpoint=resume)
    return trainer, [e for e in trainer.state.log_history if "loss" in e]


@pytest.mark.parametrize("target, direction", [(100.0, 1), (1e-3, -1)])
def test_training_moves_and_logs_the_coefficient(model_dir, tmp_path, target, direction):
    """Entropy of a random tiny model is ~3.9 nats: always below a target of 100 (up each step, capped), always
    above 1e-3 (down each step, floored); TRL's log keys policy_loss and entropy_coef appear each step."""
    _, logs = run(model_dir, tmp_path, use_adaptive_entropy=True, entropy_coef=0.01, entropy_target=target,
                  entropy_coef_delta=0.004, entropy_coef_max=0.02)
    coefs = [e["entropy_coef"] for e in logs]
    expected = [min(max(0.01 + direction * 0.004 * (i + 1), 0.0), 0.02) for i in range(3)]
    assert coefs == pytest.approx(expected, abs=1e-12)
    assert all(math.isfinite(e["policy_loss"]) for e in logs)
    assert not any(k.startswith("entropy_bonus/") for e in logs for k in e)  # the controller's inputs stay internal


def test_checkpoint_carries_the_controller(model_dir, tmp_path):
    """A run resumed from its step-1 checkpoint continues the controller from there: its step 2 ends in the state
    the uninterrupted run reached (coefficient and measured entropy)."""
    kw = dict(use_adaptive_entropy=True, entropy_coef=0.01, entropy_target=100.0, save_strategy="steps", save_steps=1)
    whole, _ = run(model_dir, tmp_path / "a", steps=2, **kw)
    final = whole.entropy_control.state_dict()
    assert final["entropy_coef"] == pytest.approx(0.02) and math.isfinite(final["last_world_entropy"])
    resumed, _ = run(model_dir, tmp_path / "b", steps=2, resume=str(tmp_path / "a" / "checkpoint-1"), **kw)
    assert resumed.entropy_control.coef == pytest.approx(final["entropy_coef"], abs=1e-12)
    assert resumed.entropy_control.last_entropy == pytest.approx(final["last_world_entropy"], rel=1e-6)


def test_evaluation_applies_but_never_moves_it(model_dir, tmp_path):
    args = GRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=4,
                      max_completion_length=4, max_steps=1, bf16=False, use_cpu=True, report_to="none",
                      save_strategy="no", disable_tqdm=True, use_adaptive_entropy=True, entropy_coef=0.05,
                      entropy_target=100.0, per_device_eval_batch_size=4)
    rows = Dataset.from_list(tiny.addition_rows(16))
    trainer = GRPOTrainer(model_dir, tiny.first_char_reward, args, train_dataset=rows, eval_dataset=rows)
    trainer.entropy_control.last_entropy = 0.5
    metrics = trainer.evaluate()
    assert "eval_policy_loss" in metrics and "eval_entropy_coef" not in metrics
    assert trainer.entropy_control.state_dict() == {"entropy_coef": 0.05, "last_world_entropy": 0.5}
    assert trainer.entropy_control.window == (0.0, 0.0)
