"""Reference-model resets (TRL's sync_ref_model): the mixing rule on hand-worked tensors, when it fires, and
through the trainer, including a resume from a checkpoint written after a sync."""
import pytest
import torch
from datasets import Dataset

import helpers_tiny as tiny
from fastrl import GRPOConfig, GRPOTrainer
from fastrl.ref_sync import mix_into_reference, sync_due

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def linear(weight: float, bias: float) -> torch.nn.Linear:
    layer = torch.nn.Linear(2, 2)
    with torch.no_grad():
        layer.weight.fill_(weight)
        layer.bias.fill_(bias)
    return layer


# ---------------------------------------------------------------- the rule
def test_mixing_by_hand():
    policy, ref = linear(1.0, -2.0), linear(0.0, 2.0)
    mix_into_reference(policy, ref, alpha=0.6)
    # 0.6·1 + 0.4·0 = 0.6 ; 0.6·(−2) + 0.4·2 = −0.4
    assert torch.allclose(ref.weight, torch.full((2, 2), 0.6)) and torch.allclose(ref.bias, torch.full((2,), -0.4))
    mix_into_reference(policy, ref, alpha=0.6)
    # 0.6·1 + 0.4·0.6 = 0.84 ; 0.6·(−2) + 0.4·(−0.4) = −1.36
    assert torch.allclose(ref.weight, torch.full((2, 2), 0.84)) and torch.allclose(ref.bias, torch.full((2,), -1.36))
    assert torch.equal(policy.weight, torch.ones(2, 2))  # the policy is never touched


def test_alpha_one_is_a_hard_reset_and_zero_keeps_the_reference():
    policy, ref = linear(3.0, 1.0), linear(-1.0, 0.5)
    mix_into_reference(policy, ref, alpha=0.0)
    assert torch.equal(ref.weight, torch.full((2, 2), -1.0))
    mix_into_reference(policy, ref, alpha=1.0)
    assert torch.equal(ref.weight, policy.weight) and torch.equal(ref.bias, policy.bias)


def test_mismatched_models_and_bad_alpha_are_refused():
    with pytest.raises(ValueError, match="different parameters"):
        mix_into_reference(linear(1, 1), torch.nn.Linear(2, 2, bias=False), 0.5)
    with pytest.raises(ValueError, match="shape"):
        mix_into_reference(linear(1, 1), torch.nn.Linear(2, 3), 0.5)
    with pytest.raises(ValueError, match="ref_model_mixup_alpha"):
        mix_into_reference(linear(1, 1), linear(0, 0), 1.5)


def test_sync_fires_on_multiples_of_ref_model_sync_steps():
    args = GRPOConfig(beta=0.04, sync_ref_model=True, ref_model_sync_steps=3)
    assert [s for s in range(1, 10) if sync_due(args, s)] == [3, 6, 9]
    assert not any(sync_due(GRPOConfig(beta=0.04), s) for s in range(1, 1100))  # off by default (TRL)


@pytest.mark.parametrize("kwargs, name", [
    (dict(sync_ref_model=True), "sync_ref_model"),  # beta = 0: no reference model to sync (TRL refuses it too)
    (dict(beta=0.04, ref_model_mixup_alpha=1.5), "ref_model_mixup_alpha"),
    (dict(beta=0.04, ref_model_sync_steps=0), "ref_model_sync_steps"),
], ids=["beta-0", "alpha", "steps"])
def test_bad_settings_name_the_field(kwargs, name):
    with pytest.raises(ValueError, match=name):
        GRPOConfig(**kwargs)


def test_trl_defaults():
    cfg = GRPOConfig()
    assert (cfg.sync_ref_model, cfg.ref_model_mixup_alpha, cfg.ref_model_sync_steps) == (False, 0.6, 512)


# ---------------------------------------------------------------- through the trainer
class Snapshots:
    """A callback keeping the policy's and the reference's weights after each logged step."""

    def __init__(self):
        self.trainer, self.policy, self.ref = None, {}, {}

    def on_log(self, args, state, control, **kwargs):
        self.policy[state.global_step] = {n: p.detach().clone() for n, p in self.trainer.model.named_parameters()}
        self.ref[state.global_step] = {n: p.detach().clone() for n, p in self.trainer.ref_model.named_parameters()}


def make_trainer(model_dir, out, peft_config=None, **kw):
    base = dict(output_dir=str(out), per_device_train_batch_size=8, num_generations=4, max_completion_length=4,
                learning_rate=1e-2, bf16=False, beta=0.04, sync_ref_model=True, ref_model_sync_steps=2,
                ref_model_mixup_alpha=0.5, logging_steps=1, save_strategy="no", disable_tqdm=True)
    args = GRPOConfig(**{**base, **kw})
    snaps = Snapshots()
    trainer = GRPOTrainer(model=model_dir, reward_funcs=[tiny.first_char_reward, tiny.short_reward], args=args,
                          train_dataset=Dataset.from_list(tiny.addition_rows(16)), callbacks=[snaps],
                          peft_config=peft_config)
    snaps.trainer = trainer
    return trainer, snaps


def test_trainer_mixes_the_reference_every_ref_model_sync_steps(model_dir, tmp_path):
    trainer, snaps = make_trainer(model_dir, tmp_path, max_steps=3)
    initial = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    for name, w0 in initial.items():
        assert torch.equal(snaps.ref[1][name], w0), name  # step 1: not a multiple of 2, untouched
        expected = 0.5 * snaps.policy[2][name] + 0.5 * w0  # step 2: ref = α·policy + (1 − α)·ref
        assert torch.allclose(snaps.ref[2][name], expected, atol=1e-7), name
        assert torch.equal(snaps.ref[3][name], snaps.ref[2][name]), name  # step 3: untouched
    assert any(not torch.equal(snaps.policy[2][n], initial[n]) for n in initial)  # the policy did move


def test_resume_restores_the_synced_reference(model_dir, tmp_path):
    first, first_snaps = make_trainer(model_dir, tmp_path, max_steps=2, save_strategy="steps", save_steps=2)
    first.train()
    synced = first_snaps.ref[2]
    resumed, snaps = make_trainer(model_dir, tmp_path, max_steps=3, resume_from_checkpoint=True)
    resumed.train()
    for name, value in synced.items():
        assert torch.equal(snaps.ref[3][name], value), name  # not the initial policy rebuilt at start-up


def test_peft_is_refused_by_name(model_dir, tmp_path):
    peft = pytest.importorskip("peft")
    with pytest.raises(ValueError, match="sync_ref_model=True is not supported with peft_config"):
        make_trainer(model_dir, tmp_path, max_steps=1, peft_config=peft.LoraConfig(target_modules=["q_proj"]))
