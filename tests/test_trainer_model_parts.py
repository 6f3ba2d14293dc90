"""The pieces around the model: hidden states + head vs the model's own logits, sampler logprobs, head variants
(tied, biased, soft-capped), LoRA, Liger on CPU, dashboards.

The independent reference for the logprob path is the model's ordinary forward: full logits for the whole
sequence, divided by the temperature, log-softmaxed, picked at each completion token (one position back).
"""
import os

import pytest
import torch
from datasets import Dataset

import helpers_tiny as tiny
from fastrl import GRPOConfig, GRPOTrainer

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

TEMPERATURE = 0.7


def variety(completions, **kwargs):
    """A reward that differs between almost any two random completions: distinct characters / 8."""
    return [len(set(c)) / 8 for c in completions]


def make(model, out, peft_config=None, **kw):
    base = dict(output_dir=str(out), per_device_train_batch_size=8, num_generations=4, max_completion_length=8,
                max_steps=1, logging_steps=1, learning_rate=1e-3, bf16=False, save_strategy="no", disable_tqdm=True,
                temperature=TEMPERATURE)
    rows = [{"prompt": p, "answer": "1"} for p in ["1+2=", "33+4=", "5=", "12*3+1="]]  # ragged: left padding
    return GRPOTrainer(model, [tiny.first_char_reward, variety], GRPOConfig(**{**base, **kw}),
                       processing_class=tiny.build_tokenizer(), train_dataset=Dataset.from_list(rows),
                       peft_config=peft_config)


def model_variant(kind):
    tok = tiny.build_tokenizer()
    model = tiny.build_model(tok, tie=(kind == "tied"))
    if kind == "bias":
        head = torch.nn.Linear(64, len(tok), bias=True)
        head.weight.data.copy_(model.lm_head.weight.data)
        torch.nn.init.normal_(head.bias, std=0.5)
        model.lm_head = head
    return model


def full_forward_logprobs(model, batch) -> torch.Tensor:
    ids, attention = batch.input_ids()
    position_ids = (attention.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=attention, position_ids=position_ids).logits  # [B, P+T, V]
    p, t = batch.prompt_ids.shape[1], batch.completion_ids.shape[1]
    logp = torch.log_softmax(logits[:, p - 1: p - 1 + t].double() / TEMPERATURE, dim=-1)
    return logp.gather(-1, batch.completion_ids.unsqueeze(-1)).squeeze(-1)  # [B, T]


@pytest.mark.parametrize("kind", ["untied", "tied", "bias"])
def test_hidden_state_logprobs_equal_the_models_own_logits(tmp_path, kind):
    trainer = make(model_variant(kind), tmp_path)
    batch, _ = trainer._generate_and_score()
    with torch.no_grad():
        ours = trainer._completion_logprobs(trainer.model, batch)
    expected = full_forward_logprobs(trainer.model, batch)
    m = batch.completion_attention.bool()
    # fp32 model, fused fp32 log-softmax vs float64 on the same fp32 logits: ~1e-6 seen
    torch.testing.assert_close(ours[m].double(), expected[m], rtol=0, atol=2e-5)


def test_sampler_logprobs_equal_the_trainers(tmp_path):
    """The transformers generator's logprobs (processed scores) are the trainer's logprobs at generation time."""
    trainer = make(model_variant("untied"), tmp_path)
    rollouts = []
    real = trainer.generator.generate
    trainer.generator.generate = lambda *a, **k: rollouts.append(real(*a, **k)) or rollouts[-1]
    batch, _ = trainer._generate_and_score()
    sampled = trainer._padded(rollouts[0].logprobs, batch)[trainer._rows_to_train(len(batch))]  # batch is shuffled
    with torch.no_grad():
        ours = trainer._completion_logprobs(trainer.model, batch)
    m = batch.completion_attention.bool()
    torch.testing.assert_close(ours[m], sampled[m], rtol=0, atol=1e-4)  # KV-cached vs full forward, fp32


def test_softcap_attribute_a_family_ignores_changes_nothing(tmp_path):
    """Llama's forward does not read final_logit_softcapping, so neither do the fused logits (soft-capping
    families: tests/test_architectures.py)."""
    model = model_variant("untied")
    model.config.final_logit_softcapping = 30.0
    assert make(model, tmp_path).logit_transform.softcap is None


def test_liger_on_cpu_is_refused_clearly(tmp_path):
    with pytest.raises(ValueError, match="use_liger_kernel"):
        make(model_variant("untied"), tmp_path, use_liger_kernel=True)


def test_tied_embeddings_train_and_stay_tied(tmp_path):
    trainer = make(model_variant("tied"), tmp_path, learning_rate=1e-2)
    before = trainer.model.get_input_embeddings().weight.detach().clone()
    trainer.train()
    emb, head = trainer.model.get_input_embeddings().weight, trainer.model.get_output_embeddings().weight
    assert emb.data_ptr() == head.data_ptr()
    assert not torch.equal(before, emb.detach())


def test_lora_trains_only_the_adapter_with_a_reference(tmp_path):
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    trainer = make(model_variant("untied"), tmp_path, beta=0.04, learning_rate=1e-2, max_steps=2,
                   peft_config=config)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    changed = {n for n, p in trainer.model.named_parameters() if not torch.equal(before[n], p.detach())}
    trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert changed and changed <= trainable and all("lora_" in n for n in trainable)
    assert trainer.state.log_history[1]["kl"] is not None
    trainer.save_model(str(tmp_path / "adapter"))
    assert os.path.exists(tmp_path / "adapter" / "adapter_config.json")


def test_report_to_tensorboard(tmp_path):
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match="report_to: 'tensorboard' is named but tensorboard is not installed"):
            make(model_variant("untied"), tmp_path, report_to="tensorboard").train()
        return
    make(model_variant("untied"), tmp_path, report_to="tensorboard").train()
    found = [f for _, _, files in os.walk(tmp_path / "runs") for f in files if f.startswith("events.out")]
    assert found
