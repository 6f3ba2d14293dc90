"""LoRA through peft: only the adapter trains, the reference is the same model with the adapter disabled (no second
copy of the model exists), the saved adapter loads with peft, and bad target modules are refused by name.

The independent reference for the KL is the base model rebuilt from its seed (the weights the adapter sits on)
and run through its ordinary forward: full logits, / temperature, log-softmax, picked at each completion token.
"""
import gc

import pytest
import torch
from datasets import Dataset
from transformers import LlamaForCausalLM

import helpers_tiny as tiny
from fastrl import GRPOConfig, GRPOTrainer

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

peft = pytest.importorskip("peft")
TEMPERATURE = 0.7


def variety(completions, **kwargs):
    return [len(set(c)) / 8 for c in completions]


def lora_trainer(out, target_modules=("q_proj", "v_proj"), **kw):
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=list(target_modules), task_type="CAUSAL_LM")
    base = dict(output_dir=str(out), per_device_train_batch_size=8, num_generations=4, max_completion_length=8,
                max_steps=3, logging_steps=1, learning_rate=3e-2, bf16=False, save_strategy="no", disable_tqdm=True,
                temperature=TEMPERATURE, beta=0.04)
    rows = [{"prompt": p, "answer": "1"} for p in ["1+2=", "33+4=", "5=", "12*3+1="]]  # ragged: left padding
    tok = tiny.build_tokenizer()
    return GRPOTrainer(tiny.build_model(tok, seed=0), [tiny.first_char_reward, variety],
                       GRPOConfig(**{**base, **kw}), processing_class=tok, train_dataset=Dataset.from_list(rows),
                       peft_config=config)


def full_forward_logprobs(model, batch) -> torch.Tensor:
    """[B, T] float64 from the model's own logits (no fastrl code)."""
    ids, attention = batch.input_ids()
    position_ids = (attention.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=attention, position_ids=position_ids).logits  # [B, P+T, V]
    p, t = batch.prompt_ids.shape[1], batch.completion_ids.shape[1]
    logp = torch.log_softmax(logits[:, p - 1: p - 1 + t].double() / TEMPERATURE, dim=-1)
    return logp.gather(-1, batch.completion_ids.unsqueeze(-1)).squeeze(-1)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A LoRA run of 3 steps with beta = 0.04, its parameters before training, and its saved adapter."""
    out = tmp_path_factory.mktemp("lora")
    trainer = lora_trainer(out)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    trainer.save_model(str(out / "adapter"))
    return trainer, before, out / "adapter"


def test_only_the_adapter_changes(trained):
    trainer, before, _ = trained
    params = dict(trainer.model.named_parameters())
    changed = {n for n, p in params.items() if not torch.equal(before[n], p.detach())}
    adapter = {n for n in params if "lora_" in n}
    assert {n for n, p in params.items() if p.requires_grad} == adapter
    assert changed and changed <= adapter  # base weights bit-identical
    assert {n for n in adapter if "lora_B" in n} <= changed  # B starts at zero: every B moved
    assert all(e["kl"] is not None for e in trainer.state.log_history if "loss" in e)


def test_no_reference_model_exists(trained):
    trainer, _, _ = trained
    assert trainer.ref_model is None
    gc.collect()
    llamas = [o for o in gc.get_objects() if isinstance(o, LlamaForCausalLM)]
    assert [id(o) for o in llamas if any(p is q for p in o.parameters() for q in trainer.model.parameters())] \
        == [id(trainer.model.get_base_model())]  # one model holds the trainer's weights: no copy of it


def test_reference_logprobs_and_kl_are_the_adapter_disabled_models(trained):
    trainer, _, _ = trained
    batch, info = trainer._generate_and_score()
    base = tiny.build_model(tiny.build_tokenizer(), seed=0)  # the weights under the adapter, rebuilt
    expected_ref = full_forward_logprobs(base, batch)
    m = batch.completion_attention.bool()
    # fused fp32 log-softmax vs float64 on the same fp32 logits: ~1e-6 seen
    torch.testing.assert_close(batch.ref_logprobs[m].double(), expected_ref[m], rtol=0, atol=2e-5)
    policy = full_forward_logprobs(trainer.model, batch)
    assert (policy - expected_ref)[m].abs().max() > 1e-3  # the adapter does change the model: the test can fail

    trainer._buffer_info = info
    with torch.no_grad():
        _, metrics = trainer._micro_batch_loss(batch)
    d = expected_ref - policy  # on-policy: ratio 1, so the bias-corrected KL is k3 itself
    kl = ((torch.exp(d) - d - 1) * m).sum() / m.sum()
    torch.testing.assert_close(float(metrics["kl"]), float(kl), rtol=1e-3, atol=1e-7)


def test_saved_adapter_loads_with_peft(trained):
    trainer, _, path = trained
    assert (path / "adapter_config.json").exists()
    loaded = peft.PeftModel.from_pretrained(tiny.build_model(tiny.build_tokenizer(), seed=0), str(path))
    ours = {n: p for n, p in trainer.model.named_parameters() if "lora_" in n}
    theirs = dict(loaded.named_parameters())
    assert ours and all(torch.equal(p.detach(), theirs[n].detach()) for n, p in ours.items())


@pytest.mark.parametrize("targets", [("q_proj", "not_a_layer"), ("qkv_proj",)], ids=["one-missing", "none"])
def test_missing_target_modules_are_refused_before_training(tmp_path, targets):
    with pytest.raises(ValueError, match=r"peft_config\.target_modules.*q_proj"):
        lora_trainer(tmp_path, target_modules=targets)
