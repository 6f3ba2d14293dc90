"""GRPOTrainer end to end on a tiny Llama (CPU, fp32): a TRL-shaped script, logging, bad input, invariances."""
import json
import math
import os

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM

import helpers_tiny as tiny
from fastrl import GRPOConfig, GRPOTrainer
from fastrl.scoring import combine

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def small_args(out, **kw):
    base = dict(output_dir=str(out), per_device_train_batch_size=8, num_generations=4, max_completion_length=8,
                max_steps=3, logging_steps=1, learning_rate=1e-3, bf16=False, save_strategy="no",
                disable_tqdm=True, report_to="none")
    return GRPOConfig(**{**base, **kw})


def weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


# ---------------------------------------------------------------- the TRL quickstart shape
def run_quickstart(module, model_dir, out, chat: bool, seen: dict):
    """TRL's documented shape: a dataset with a prompt column, reward functions taking completions and dataset
    columns as keywords, GRPOConfig fields, GRPOTrainer(model=..., reward_funcs=..., args=..., train_dataset=...).
    `module` is fastrl or trl: only the import differs."""
    rows = tiny.addition_rows(24)
    if chat:
        rows = [{**r, "prompt": [{"role": "user", "content": r["prompt"]}]} for r in rows]
    dataset = Dataset.from_list(rows)

    def reward_answer(prompts, completions, answer, **kwargs):
        seen.setdefault("prompts", prompts)
        seen.setdefault("completions", completions)
        seen.setdefault("answer", answer)
        seen.setdefault("kwargs", set(kwargs))
        return tiny.first_char_reward(completions, answer)

    args = module.GRPOConfig(output_dir=str(out), per_device_train_batch_size=8, num_generations=4,
                             max_completion_length=8, max_steps=3, logging_steps=1, learning_rate=1e-3, beta=0.04,
                             use_cpu=True, bf16=False, save_strategy="no", report_to="none")
    trainer = module.GRPOTrainer(model=model_dir, reward_funcs=[reward_answer, tiny.short_reward], args=args,
                                 train_dataset=dataset)
    trainer.train()
    return trainer


@pytest.mark.parametrize("chat", [False, True], ids=["plain", "chat"])
def test_trl_quickstart_script_runs_with_only_the_import_changed(model_dir, tmp_path, chat):
    import fastrl

    seen = {}
    trainer = run_quickstart(fastrl, model_dir, tmp_path / "out", chat, seen)
    steps = [e for e in trainer.state.log_history if "loss" in e]
    assert [e["step"] for e in steps] == [1, 2, 3]
    for e in steps:
        for key in ("loss", "reward", "kl", "reward_std", "entropy", "grad_norm", "learning_rate",
                    "completions/mean_length", "completions/clipped_ratio", "rewards/reward_answer/mean",
                    "rewards/short_reward/mean", "clip_ratio/region_mean", "step_time", "tokens_per_second",
                    "peak_memory_mb"):
            assert e[key] is not None, key
    # what the reward functions received, as TRL passes it
    assert len(seen["completions"]) == len(seen["prompts"]) == len(seen["answer"]) == 8
    assert seen["answer"][:4] == [seen["answer"][0]] * 4  # columns repeated per generation
    if chat:
        assert seen["prompts"][0] == [{"role": "user", "content": seen["prompts"][0][0]["content"]}]
        assert all(isinstance(c, list) and c[0]["role"] == "assistant" and isinstance(c[0]["content"], str)
                   for c in seen["completions"])
    else:
        assert isinstance(seen["prompts"][0], str) and all(isinstance(c, str) for c in seen["completions"])
    assert {"trainer_state", "completion_ids"} <= seen["kwargs"]
    # metrics.jsonl: one object per step with step and reward; the curves at the end
    lines = [json.loads(x) for x in open(tmp_path / "out" / "metrics.jsonl")]
    assert [x["step"] for x in lines] == [1, 2, 3] and all("reward" in x for x in lines)
    assert os.path.getsize(tmp_path / "out" / "curves.png") > 1000


def test_the_same_script_runs_under_trl(model_dir, tmp_path):
    """The reference for 'TRL-shaped': the very same function runs with `import trl`."""
    trl = pytest.importorskip("trl")
    trainer = run_quickstart(trl, model_dir, tmp_path / "trl", chat=False, seen={})
    assert any("reward" in e for e in trainer.state.log_history)


def test_save_model_loads_with_transformers(model_dir, tmp_path):
    trainer = GRPOTrainer(model_dir, tiny.first_char_reward, small_args(tmp_path, max_steps=1),
                          train_dataset=Dataset.from_list(tiny.addition_rows(8)))
    trainer.train()
    trainer.save_model(str(tmp_path / "saved"))
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "saved"))
    for name, p in trainer.model.named_parameters():
        assert torch.equal(loaded.state_dict()[name], p.detach()), name


# ---------------------------------------------------------------- bad input fails before training
def test_dataset_without_prompt_column(model_dir, tmp_path):
    with pytest.raises(ValueError, match="'prompt' column"):
        GRPOTrainer(model_dir, tiny.first_char_reward, small_args(tmp_path),
                    train_dataset=Dataset.from_list([{"question": "1+1=", "answer": "2"}] * 8))


def test_nonexistent_model_path(tmp_path):
    with pytest.raises(ValueError, match="model"):
        GRPOTrainer(str(tmp_path / "no-such-model"), tiny.first_char_reward, small_args(tmp_path),
                    train_dataset=Dataset.from_list(tiny.addition_rows(8)))


@pytest.mark.parametrize("bad, message", [
    (lambda completions, **kw: [0.0] * (len(completions) - 1), "returned 7 rewards, expected 8"),
    (lambda completions, **kw: ["good"] * len(completions), "non-number 'good'"),
    (lambda completions, **kw: 1.0, "expected a list of 8 numbers"),
], ids=["wrong-count", "strings", "scalar"])
def test_bad_reward_output_fails_before_any_update(model_dir, tmp_path, bad, message):
    trainer = GRPOTrainer(model_dir, [tiny.first_char_reward, bad], small_args(tmp_path),
                          train_dataset=Dataset.from_list(tiny.addition_rows(8)))
    before = weights(trainer.model)
    with pytest.raises(ValueError, match=message):
        trainer.train()
    assert trainer.state.global_step == 0
    assert all(torch.equal(before[n], p) for n, p in trainer.model.named_parameters())


def test_reward_weights_must_match_reward_funcs(model_dir, tmp_path):
    with pytest.raises(ValueError, match="reward_weights"):
        GRPOTrainer(model_dir, [tiny.first_char_reward], small_args(tmp_path, reward_weights=[1.0, 2.0]),
                    train_dataset=Dataset.from_list(tiny.addition_rows(8)))


# ---------------------------------------------------------------- rewards: TRL's None/NaN rule, by hand
def test_combine_rewards_none_is_excluded_and_all_none_is_unscorable():
    nan = float("nan")
    per_func = torch.tensor([[1.0, 0.5], [nan, 0.5], [nan, nan], [0.0, nan]])  # [B=4, F=2]
    out = combine(per_func, torch.tensor([2.0, 1.0]))
    assert out[:2].tolist() == [2.5, 0.5] and torch.isnan(out[2]) and out[3].item() == 0.0


def test_unscorable_completions_train_without_nan(model_dir, tmp_path):
    def half_none(completions, **kw):
        return [None if i % 2 else 1.0 * (len(c) > 3) for i, c in enumerate(completions)]

    trainer = GRPOTrainer(model_dir, half_none, small_args(tmp_path, max_steps=2),
                          train_dataset=Dataset.from_list(tiny.addition_rows(8)))
    trainer.train()
    for e in trainer.state.log_history[:-1]:
        assert torch.isfinite(torch.tensor(e["loss"])) and torch.isfinite(torch.tensor(e["reward"]))


# ---------------------------------------------------------------- invariances (same completions, same result)
def train_weights(model_dir, out, **kw):
    trainer = GRPOTrainer(model_dir, [tiny.first_char_reward, tiny.short_reward], small_args(out, **kw),
                          train_dataset=Dataset.from_list(tiny.addition_rows(16)))
    trainer.train()
    return trainer


def test_gradient_checkpointing_changes_nothing(model_dir, tmp_path):
    a = train_weights(model_dir, tmp_path / "a", max_steps=2, gradient_checkpointing=True)
    b = train_weights(model_dir, tmp_path / "b", max_steps=2, gradient_checkpointing=False)
    for (n, p), q in zip(a.model.named_parameters(), b.model.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6, msg=n)  # fp32 recompute: same ops, same order
    assert max_change(model_dir, a.model) > 1e-4


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "dr_grpo"])
def test_gradient_accumulation_matches_one_big_batch(model_dir, tmp_path, loss_type):
    """TRL's normalizers make 2 micro-batches of 4 the same update as 1 batch of 8 (dapo: global token count;
    grpo/dr_grpo: per-micro-batch mean / accumulation steps). One step, the same 8 completions.
    Adam's first step is lr·g/(|g| + eps): with eps = 1 and lr = 1 the update is ≈ g itself, so comparing weights
    compares gradients (with a small eps it would compare signs, which noise-level gradients flip)."""
    kw = dict(max_steps=1, loss_type=loss_type, learning_rate=1.0, adam_epsilon=1.0, max_grad_norm=0.0)
    one = train_weights(model_dir, tmp_path / "one", per_device_train_batch_size=8, **kw)
    two = train_weights(model_dir, tmp_path / "two", per_device_train_batch_size=4, gradient_accumulation_steps=2,
                        **kw)
    assert one.state.log_history[0]["completions/mean_length"] == two.state.log_history[0]["completions/mean_length"]
    torch.testing.assert_close(one.state.log_history[0]["loss"], two.state.log_history[0]["loss"], rtol=1e-5,
                               atol=1e-7)
    for (n, p), q in zip(one.model.named_parameters(), two.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=n)
    assert max_change(model_dir, one.model) > 1e-4  # the step did move the weights: the test can fail


def max_change(model_dir, model) -> float:
    start = AutoModelForCausalLM.from_pretrained(model_dir).state_dict()
    return max((p.detach() - start[n]).abs().max().item() for n, p in model.named_parameters())


def test_reused_batches_compute_old_logprobs(model_dir, tmp_path):
    """num_iterations=2: each generation batch is trained on twice, so old logprobs are kept and the second pass
    sees a ratio away from 1 (clip metrics defined, loss finite)."""
    trainer = train_weights(model_dir, tmp_path, max_steps=2, num_iterations=2, learning_rate=3e-2)
    assert trainer.args.needs_old_logprobs()
    assert all(b.old_logprobs is not None for b in trainer._buffer)
    assert trainer.state.log_history[1]["clip_ratio/region_mean"] is not None
    # the transformers generator samples from the policy itself: its logprobs are the trainer's (fp32)
    assert trainer.state.log_history[0]["rollout/logprob_abs_diff"] < 1e-4


# ---------------------------------------------------------------- reward functions: async, by name
def test_async_reward_functions_are_awaited(model_dir, tmp_path):
    calls = []

    async def async_len(completions, **kwargs):
        calls.append(len(completions))
        return [len(c) / 8 for c in completions]

    trainer = GRPOTrainer(model_dir, [async_len, tiny.first_char_reward], small_args(tmp_path, max_steps=1),
                          train_dataset=Dataset.from_list(tiny.addition_rows(8)))
    trainer.train()
    assert calls == [8]
    assert trainer.state.log_history[0]["rewards/async_len/mean"] > 0


def test_rewards_by_name_and_by_module_path():
    from fastrl.rewards import REGISTRY
    from fastrl.scoring import import_reward

    assert import_reward("accuracy_reward") is REGISTRY["accuracy_reward"]
    assert import_reward("helpers_tiny:short_reward") is tiny.short_reward
    with pytest.raises(ValueError, match="unknown reward 'nope'"):
        import_reward("nope")
    with pytest.raises(ValueError, match="could not import reward 'helpers_tiny:nope'"):
        import_reward("helpers_tiny:nope")


# ---------------------------------------------------------------- mask_truncated_completions: an all-masked batch
def odd_first_char(completions, **kwargs):
    """Rewards that differ within groups of 1-token completions (so the policy-gradient term is not 0 by itself)."""
    return [float(ord(c[:1] or "a") % 2) for c in completions]


@pytest.mark.parametrize("loss_type", ["dapo", "grpo"])
def test_every_completion_truncated_and_masked_gives_zero_loss_and_no_update(model_dir, tmp_path, loss_type):
    """max_completion_length=1 (seed 0: no completion ends with eos) and mask_truncated_completions=True: every
    token is masked. TRL clamps its normalizers at 1, so the loss is 0 with zero gradients and training goes on
    (fastrl raised on a token count of 0). The unmasked run on the same completions does move the weights."""
    kw = dict(max_steps=2, max_completion_length=1, loss_type=loss_type, seed=0, learning_rate=1e-2)
    data = Dataset.from_list(tiny.addition_rows(16))
    masked = GRPOTrainer(model_dir, odd_first_char, small_args(tmp_path / "m", mask_truncated_completions=True, **kw),
                         train_dataset=data)
    before = weights(masked.model)
    masked.train()
    steps = masked.state.log_history[:-1]
    assert [e["step"] for e in steps] == [1, 2]
    assert all(e["completions/clipped_ratio"] == 1.0 for e in steps)  # the case under test did happen
    assert any(e["reward_std"] > 0 for e in steps)  # advantages are not all zero
    for e in steps:
        assert e["loss"] == 0.0 and e["grad_norm"] == 0.0
        assert all(v is None or math.isfinite(v) for v in e.values()), e
    assert all(torch.equal(before[n], p) for n, p in masked.model.named_parameters())
    if loss_type == "dapo":
        kept = GRPOTrainer(model_dir, odd_first_char, small_args(tmp_path / "k", **kw), train_dataset=data)
        kept.train()
        assert [e["completions/clipped_ratio"] for e in kept.state.log_history[:-1]] == [1.0, 1.0]
        assert max_change(model_dir, kept.model) > 1e-4


def test_phase_times_are_logged_and_add_up_to_the_step(model_dir, tmp_path):
    """time/<phase> (fastrl.phase_times): every phase this run has, each a duration, together within the step's
    time; beta > 0 brings the reference pass, a batch reused over two steps the old logprobs (and generation only
    in the first of the two)."""
    trainer = train_weights(model_dir, tmp_path, beta=0.04, steps_per_generation=2, max_steps=2)
    steps = [e for e in trainer.state.log_history if "loss" in e]
    every_step = {"time/forward", "time/loss", "time/backward", "time/optimizer"}
    first = {"time/weight_push", "time/generation", "time/rewards", "time/old_logprobs", "time/ref_logprobs"}
    assert set(k for k in steps[0] if k.startswith("time/")) == every_step | first
    assert set(k for k in steps[1] if k.startswith("time/")) == every_step  # the batch's second half: no sampling
    for e in steps:
        times = [v for k, v in e.items() if k.startswith("time/")]
        assert all(v >= 0 for v in times) and e["time/generation" if e is steps[0] else "time/forward"] > 0
        assert sum(times) <= e["step_time"]


@pytest.mark.parametrize("optim,fused", [("adamw_torch_fused", True), ("adamw_torch", None)])
def test_default_optimizer_is_fused_on_cpu(model_dir, tmp_path, optim, fused):
    """TRL's default optim (adamw_torch_fused) is torch's fused AdamW on CPU too, as transformers builds it for
    TRL; adamw_torch is torch's default implementation."""
    trainer = train_weights(model_dir, tmp_path, optim=optim, max_steps=1)
    assert trainer.optimizer.defaults["fused"] is fused
    # and, as in TRL, no old-logprob pass when the batch is used once (num_iterations 1, no vLLM): the loss's
    # old logprobs are the policy's own, detached
    step = next(e for e in trainer.state.log_history if "loss" in e)
    assert "time/old_logprobs" not in step and "time/forward" in step
