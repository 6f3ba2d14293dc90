"""The memory options of full fine-tuning: no reference model at beta = 0, the reference kept in host memory between
uses (ref_model_offload), and checkpointed activations offloaded to host memory (gradient_checkpointing_offload).

These runs are on CPU, where "host memory" is where everything already is: the tests check that each option's
code path runs, moves what it should, and changes no number.
"""
import pytest
import torch
from datasets import Dataset

import helpers_tiny as tiny
from fastrl import GRPOConfig, GRPOTrainer
from fastrl.policy import frozen_reference
from fastrl.rollout_batch import PackedBatch

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def make(out, **kw):
    base = dict(output_dir=str(out), per_device_train_batch_size=8, num_generations=4, max_completion_length=8,
                max_steps=1, logging_steps=1, learning_rate=1e-2, bf16=False, save_strategy="no", disable_tqdm=True,
                temperature=0.7, beta=0.04)
    tok = tiny.build_tokenizer()
    return GRPOTrainer(tiny.build_model(tok, seed=0), [tiny.first_char_reward, tiny.short_reward],
                       GRPOConfig(**{**base, **kw}), processing_class=tok,
                       train_dataset=Dataset.from_list(tiny.addition_rows(16)))


# ---------------------------------------------------------------- the reference model
def test_beta_zero_builds_no_reference_model(tmp_path):
    trainer = make(tmp_path, beta=0.0, ref_model_offload=True)
    assert trainer.ref_model is None
    batch, _ = trainer._generate_and_score()
    assert batch.ref_logprobs is None


def test_frozen_reference_is_a_separate_frozen_copy_on_the_asked_device():
    model = tiny.build_model(tiny.build_tokenizer(), tie=True)
    ref = frozen_reference(model, "cpu")
    pairs = list(zip(model.parameters(), ref.parameters()))
    assert all(torch.equal(p, q) and p.data_ptr() != q.data_ptr() for p, q in pairs)
    assert not any(q.requires_grad for _, q in pairs) and not ref.training
    assert ref.get_input_embeddings().weight is ref.get_output_embeddings().weight  # still tied, once
    assert all(q.device.type == "cpu" for q in ref.parameters())


def test_ref_model_offload_moves_the_reference_only_for_its_pass_and_changes_nothing(tmp_path):
    kept = make(tmp_path / "kept")
    offloaded = make(tmp_path / "offloaded", ref_model_offload=True)
    moves = []
    real_to = offloaded.ref_model.to
    offloaded.ref_model.to = lambda device: moves.append(str(device)) or real_to(device)
    torch.manual_seed(1)
    batch, _ = kept._generate_and_score()
    torch.manual_seed(1)
    batch_off, _ = offloaded._generate_and_score()
    assert torch.equal(batch.completion_ids, batch_off.completion_ids)
    assert torch.equal(batch.ref_logprobs, batch_off.ref_logprobs)  # same weights, same ops: bit-identical
    assert moves == [str(offloaded.device), "cpu"]  # to the device for the pass, back to host memory after it
    assert all(p.device.type == "cpu" for p in offloaded.ref_model.parameters())


# ---------------------------------------------------------------- gradient checkpointing (+ offload)
def loss_and_grads(trainer, batch, info):
    trainer._buffer_info = info
    trainer.model.zero_grad(set_to_none=True)
    loss, _ = trainer._micro_batch_loss(batch)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}


def test_checkpointing_on_off_and_offloaded_give_the_same_loss_and_gradients(tmp_path):
    off = make(tmp_path / "off", gradient_checkpointing=False)
    on = make(tmp_path / "on", gradient_checkpointing=True)
    offload = make(tmp_path / "offload", gradient_checkpointing=True, gradient_checkpointing_offload=True)
    batch, info = off._generate_and_score()  # one batch (with reference logprobs), the same for all three
    want_loss, want = loss_and_grads(off, batch, info)
    assert len(want) == sum(1 for _ in off.model.parameters()) and want_loss != 0
    for trainer in (on, offload):
        loss, grads = loss_and_grads(trainer, batch, info)
        # fp32, the recompute runs the same ops in the same order: equal up to summation-order noise (0 seen)
        torch.testing.assert_close(loss, want_loss, rtol=1e-6, atol=1e-7)
        assert grads.keys() == want.keys()
        for n in want:
            torch.testing.assert_close(grads[n], want[n], rtol=1e-5, atol=1e-7, msg=n)


def test_offload_hooks_see_the_layer_inputs_and_not_the_head(tmp_path, monkeypatch):
    packed = []

    class Spy(torch.autograd.graph.saved_tensors_hooks):  # records what save_on_cpu would move to host memory
        def __init__(self, pin_memory=False, device_type="cuda"):
            super().__init__(lambda t: packed.append(tuple(t.shape)) or t, lambda t: t)

    trainer = make(tmp_path, gradient_checkpointing=True, gradient_checkpointing_offload=True)
    batch, info = trainer._generate_and_score()
    monkeypatch.setattr(torch.autograd.graph, "save_on_cpu", Spy)
    loss_and_grads(trainer, batch, info)
    # the decoder's input layout: one packed row [1, S] (padding_free), else [B, P+T]
    b, s = (1, PackedBatch.from_rollout(batch).input_ids.numel()) if trainer.args.padding_free \
        else batch.input_ids()[0].shape
    hidden, vocab = trainer.model.config.hidden_size, trainer.model.config.vocab_size
    layers = trainer.model.config.num_hidden_layers
    assert packed.count((b, s, hidden)) >= layers  # each checkpointed layer's input
    assert not any(vocab in shape for shape in packed)  # the head and the loss stay on the device
    assert len(packed) < 12 * layers  # checkpointed: a few boundary tensors, not every activation


def test_offload_without_checkpointing_is_refused():
    with pytest.raises(ValueError, match="gradient_checkpointing_offload"):
        GRPOConfig(gradient_checkpointing=False, gradient_checkpointing_offload=True)
