"""Padding-free training against its padded twin on a real tiny transformers model (Llama, fp32, sdpa):
decoder + fused loss, loss and every parameter's gradient, for all six loss types × token/sequence importance
sampling × beta; token-budget micro-batches giving the same step however the sequences are grouped; and the
trainer's step with padding_free on and off.

Tolerance (fp32): the packed decoder runs the same per-token arithmetic on a [1, S] row, attention per sequence
(fastrl.packed_attention), instead of [B, P+T] with a padding mask, so GEMMs see other shapes and sums run in another order:
rtol 1e-4 and atol 1e-6 on the loss and the gradients (measured differences ~1e-6 relative)."""
import pytest
import torch
from datasets import Dataset

import helpers_tiny as tiny
from fastrl import GRPOConfig, GRPOTrainer
from fastrl.entropy_control import EntropyControl
from fastrl.kernels.loss_spec import LOSS_TYPES
from fastrl.rollout_batch import PackedBatch, RolloutBatch, token_budget_bins

pytestmark = pytest.mark.usefixtures("one_thread")
TOL = dict(rtol=1e-4, atol=1e-6)


def ragged_rollout(seed, prompt_lengths, completion_lengths, vocab, P=7, T=10):
    """A RolloutBatch with left-padded prompts and right-padded completions of the given lengths, one completion
    masked out of the loss (a masked truncated completion), random old/ref logprobs and token IS ratios."""
    g = torch.Generator().manual_seed(seed)
    B = len(prompt_lengths)
    prompt, prompt_mask = torch.zeros(B, P, dtype=torch.long), torch.zeros(B, P, dtype=torch.long)
    completion, attention = torch.zeros(B, T, dtype=torch.long), torch.zeros(B, T, dtype=torch.long)
    for i, (p, c) in enumerate(zip(prompt_lengths, completion_lengths)):
        prompt[i, P - p:], prompt_mask[i, P - p:] = torch.randint(4, vocab, (p,), generator=g), 1
        completion[i, :c], attention[i, :c] = torch.randint(4, vocab, (c,), generator=g), 1
    loss_mask = attention.clone()
    loss_mask[1] = 0
    return RolloutBatch(prompt, prompt_mask, completion, attention, loss_mask, torch.randn(B, generator=g),
                        old_logprobs=-torch.rand(B, T, generator=g) * 4 - 1.5,
                        ref_logprobs=-torch.rand(B, T, generator=g) * 4 - 1.5,
                        is_ratio=torch.rand(B, T, generator=g) + 0.5)


@pytest.fixture(scope="module")
def trainer(model_dir, tmp_path_factory):
    args = GRPOConfig(output_dir=str(tmp_path_factory.mktemp("out")), per_device_train_batch_size=8,
                      num_generations=4, max_completion_length=10, max_steps=1, bf16=False, save_strategy="no",
                      disable_tqdm=True)
    return GRPOTrainer(model_dir, tiny.first_char_reward, args, train_dataset=Dataset.from_list(tiny.addition_rows(8)))


def loss_and_grads(trainer, batch, padding_free, scale=1.0, entropy_scale=None):
    trainer.args.padding_free = padding_free
    trainer.model.zero_grad(set_to_none=True)
    loss, metrics = trainer._micro_batch_loss(batch, scale=scale, entropy_scale=entropy_scale)
    loss.backward()
    return loss.detach(), metrics, {n: p.grad.clone() for n, p in trainer.model.named_parameters()}


def set_loss(trainer, **fields):
    for k, v in fields.items():
        setattr(trainer.args, k, v)
    trainer.loss_spec = type(trainer.loss_spec).from_config(trainer.args)


CASES = [(t, level, beta) for t in LOSS_TYPES for level in ("token", "sequence") for beta in (0.0, 0.04)]


@pytest.mark.parametrize("loss_type, level, beta", CASES)
def test_packed_decoder_and_loss_equal_padded(trainer, loss_type, level, beta):
    seed = CASES.index((loss_type, level, beta))
    batch = ragged_rollout(seed, [7, 2, 4, 1, 5, 3], [10, 4, 0, 7, 1, 9], len(trainer.tokenizer))
    if level == "sequence" and loss_type != "vespo":  # VESPO takes per-token ratios only (TRL)
        batch.is_ratio = batch.is_ratio[:, :1]
    set_loss(trainer, loss_type=loss_type, importance_sampling_level=level, beta=beta)
    trainer._buffer_info = {"loss_tokens": float(batch.completion_mask.sum()) * 2}
    padded, p_metrics, p_grads = loss_and_grads(trainer, batch, False)
    packed, k_metrics, k_grads = loss_and_grads(trainer, batch, True)
    torch.testing.assert_close(packed, padded, **TOL)
    for name, g in p_grads.items():
        torch.testing.assert_close(k_grads[name], g, **TOL, msg=name)
    assert set(k_metrics) == set(p_metrics)
    for k in p_metrics:
        torch.testing.assert_close(k_metrics[k], p_metrics[k], **TOL, msg=k)
    assert max(g.abs().max() for g in p_grads.values()) > 1e-4  # the case has a gradient to compare


def test_packed_batch_layout():
    batch = ragged_rollout(0, [3, 1, 2], [2, 0, 3], 40, P=4, T=3)
    packed = PackedBatch.from_rollout(batch)
    assert packed.cu_seqlens.tolist() == [0, 5, 6, 11] and packed.cu_rows.tolist() == [0, 2, 2, 5]
    assert packed.position_ids.tolist() == [0, 1, 2, 3, 4, 0, 0, 1, 2, 3, 4]
    # completion token t of sequence b is predicted at (its start + prompt length − 1 + t)
    assert packed.predict_index.tolist() == [2, 3, 7, 8, 9]
    assert torch.equal(packed.input_ids[packed.predict_index + 1], packed.targets)
    assert torch.equal(packed.to_padded(packed.targets, (3, 3)), batch.completion_ids * batch.completion_attention)


def test_token_budget_bins():
    lengths = [9, 3, 7, 1, 5, 12, 2]
    for budget in (1, 8, 12, 40):
        bins = token_budget_bins(lengths, budget)
        assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
        assert all(sum(lengths[i] for i in b) <= budget or len(b) == 1 for b in bins)
    assert token_budget_bins(lengths, 12) == [[5], [0, 1], [2, 4], [3, 6]]  # first-fit, longest first: 12 | 9+3 | 7+5 | 2+1
    assert len(token_budget_bins(lengths, 40)) == 1


BUDGET_CASES = [(t, {}) for t in LOSS_TYPES] + [  # with the entropy bonus (its own scale) and the off-policy mask
    ("dapo", dict(entropy_coef=0.1, off_policy_mask_threshold=0.0)), ("grpo", dict(entropy_coef=0.1))]


@pytest.mark.parametrize("loss_type, options", BUDGET_CASES, ids=[f"{t}-{'-'.join(o)}" for t, o in BUDGET_CASES])
def test_step_does_not_depend_on_token_budget_grouping(trainer, loss_type, options):
    """The sum over a window's token-budget micro-batches of loss × LossSpec.token_budget_scale (the entropy
    bonus × token_budget_entropy_scale), and its gradients, are the same for every budget (every sequence alone,
    a few groups, all in one)."""
    batch = ragged_rollout(50 + BUDGET_CASES.index((loss_type, options)), [7, 2, 4, 1, 5, 3, 6, 2],
                           [10, 4, 0, 7, 1, 9, 3, 5], len(trainer.tokenizer))
    set_loss(trainer, loss_type=loss_type, importance_sampling_level="sequence", beta=0.04,
             **{"entropy_coef": 0.0, "off_policy_mask_threshold": None, **options})
    trainer.entropy_control = EntropyControl(trainer.args)
    trainer._buffer_info = {"loss_tokens": float(batch.completion_mask.sum())}
    lengths = (batch.prompt_mask.sum(1) + batch.completion_attention.sum(1)).tolist()
    totals = (len(batch), float(batch.completion_mask.sum()))
    results = []
    for budget in (1, 14, 25, 1000):
        loss, grads = 0.0, None
        for index in token_budget_bins(lengths, budget):
            mb = batch.select(torch.tensor(index))
            micro = (len(mb), float(mb.completion_mask.sum()))
            part, _, part_grads = loss_and_grads(trainer, mb, True, trainer.loss_spec.token_budget_scale(micro, totals),
                                                 trainer.loss_spec.token_budget_entropy_scale(micro, totals))
            loss = loss + part
            grads = part_grads if grads is None else {n: grads[n] + g for n, g in part_grads.items()}
        results.append((loss, grads))
    set_loss(trainer, entropy_coef=0.0, off_policy_mask_threshold=None)  # the module's trainer, as it was
    trainer.entropy_control = EntropyControl(trainer.args)
    for loss, grads in results[1:]:
        torch.testing.assert_close(loss, results[0][0], **TOL)
        for name, g in results[0][1].items():
            torch.testing.assert_close(grads[name], g, **TOL, msg=name)


def train(model_dir, out, **kw):
    args = GRPOConfig(output_dir=str(out), per_device_train_batch_size=4, num_generations=4, max_completion_length=8,
                      max_steps=1, bf16=False, save_strategy="no", disable_tqdm=True, learning_rate=1.0,
                      adam_epsilon=1.0, max_grad_norm=0.0, seed=3, **kw)
    trainer = GRPOTrainer(model_dir, tiny.first_char_reward, args, train_dataset=Dataset.from_list(tiny.addition_rows(8)))
    trainer.train()
    return trainer


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dapo"])
def test_trainer_step_padded_packed_and_token_budget_agree(model_dir, tmp_path, loss_type):
    """One optimizer step (2 accumulation steps of 4 completions) padded, packed, and packed in micro-batches of at
    most 20 tokens: the same update (Adam with eps = 1 and lr = 1 makes the update ≈ the gradient). bnpo under a
    token budget normalises by the window's tokens, TRL's by each micro-batch's: compared with an equal-token
    grouping only, i.e. not under the budget."""
    kw = dict(loss_type=loss_type, gradient_accumulation_steps=2)
    runs = [train(model_dir, tmp_path / "padded", padding_free=False, **kw),
            train(model_dir, tmp_path / "packed", padding_free=True, **kw)]
    if loss_type != "bnpo":
        runs.append(train(model_dir, tmp_path / "budget", max_tokens_per_micro_batch=20, **kw))
    first = dict(runs[0].model.named_parameters())
    for run in runs[1:]:
        assert run.state.log_history[0]["completions/mean_length"] == runs[0].state.log_history[0][
            "completions/mean_length"]
        torch.testing.assert_close(run.state.log_history[0]["loss"], runs[0].state.log_history[0]["loss"], **TOL)
        for n, p in run.model.named_parameters():
            torch.testing.assert_close(p, first[n], **TOL, msg=n)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_packed_attention_check(tmp_path, monkeypatch, caplog, arch):
    """The once-per-model check packs sdpa Llama and Qwen2 under True and None (the default). A model whose attention
    would mix packed sequences (simulated: a packed mask function that drops the sequences' boundaries) trains padded
    under None, with one log line naming its class and why, and is refused by name under True or when a setting
    needs packing."""
    from transformers import AutoModelForCausalLM
    from transformers.masking_utils import AttentionMaskInterface

    from fastrl import packed_attention

    from fastrl.policy import use_padding_free
    from fastrl.tasks.tiny_model import build_tiny_model

    model = AutoModelForCausalLM.from_pretrained(build_tiny_model(str(tmp_path / arch), arch=arch),
                                                 attn_implementation="sdpa")
    assert use_padding_free(model, None) and use_padding_free(model, True) and not use_padding_free(model, False)
    monkeypatch.setitem(AttentionMaskInterface._global_mapping, packed_attention.NAME, lambda **kwargs: None)
    name = type(model).__name__
    with caplog.at_level("INFO", logger="fastrl.policy"):
        assert use_padding_free(model, None) is False
    assert [r.getMessage() for r in caplog.records] == [
        f"padding_free: {name} trains on padded batches: its attention "
        "(attn_implementation='fastrl_packed_sdpa') mixes packed sequences"]
    with pytest.raises(ValueError, match=f"padding_free=True: {name} can not run packed sequences"):
        use_padding_free(model, True)
    with pytest.raises(ValueError, match=f"max_tokens_per_micro_batch: {name} can not run packed"):
        use_padding_free(model, None, "max_tokens_per_micro_batch")
