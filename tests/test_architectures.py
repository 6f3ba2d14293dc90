"""Right logprobs on every architecture (fastrl/model_logits.py, policy loading, the sampler's cache).

Every causal-LM family the installed transformers builds offline from its config class (tests/arch_families.py:
tiny sizes, the head sharpened to logits of std ≈ 8) either trains (the trainer's self-check finds the fused
logprobs equal to log_softmax of the model's own forward, two GRPO steps are finite, the sampler runs) or is
refused by name before any work. The families whose post-processing fastrl folds into the kernels, and those TRL's
own tests train, must train. The README's family table is this test's output (`python tests/arch_families.py`).
"""
import math
import os
import re

import pytest
import torch
from datasets import Dataset

import arch_families as fam
import helpers_tiny as tiny
from fastrl import GRPOConfig, GRPOTrainer
from fastrl.model_logits import FAMILY_FACTORS, check_fused_logits, logit_transform
from fastrl.policy import completion_hidden, lm_head, load_policy

pytestmark = pytest.mark.usefixtures("one_thread")

# Families TRL's tests train (issue 14 item 9) and every family with a logit transform or a hybrid cache that builds
# tiny here: these must train, not merely be refused.
MUST_TRAIN = {"llama", "qwen2", "qwen3", "qwen3_moe", "gemma", "gemma2", "gemma3_text", "phi3", "mistral", "gpt_oss",
              "nemotron_h", "falcon_h1", "granite", "granitemoe", "granitemoeshared", "hyperclovax", "minicpm3",
              "cohere", "cohere2", "nanochat", "vaultgemma", "gpt2", "opt", "phi", "mixtral", "mamba"}


@pytest.fixture(scope="module")
def tok():
    return tiny.build_tokenizer()


@pytest.fixture(scope="module")
def table():
    """Collects each family's status; with FASTRL_ARCH_TABLE=path set, writes them there as the README's table."""
    rows = {}
    yield rows
    if os.environ.get("FASTRL_ARCH_TABLE"):
        with open(os.environ["FASTRL_ARCH_TABLE"], "w") as f:
            f.write(fam.markdown_table(rows))


@pytest.mark.parametrize("model_type", fam.FAMILIES)
def test_family_trains_or_is_refused_by_name(model_type, tok, table):
    status, detail = table[model_type] = fam.run_family(model_type, tok)
    if model_type in MUST_TRAIN:
        assert status == "trains", f"{model_type}: {status}: {detail}"
    assert status in ("trains", "refused", "not built"), f"{model_type}: {status}: {detail}"
    if status == "refused":  # the self-check's error: the model class, then what differs and by how much
        assert re.match(r"model: \w+('s own logits differ .* = \d| does not give fastrl)", detail), detail


def test_every_mapped_family_is_a_causal_lm_family():
    assert set(FAMILY_FACTORS) <= set(fam.FAMILIES), set(FAMILY_FACTORS) - set(fam.FAMILIES)


def test_unknown_post_processing_is_refused_with_the_class_and_error(tok, monkeypatch):
    """Granite divides its logits by logits_scaling; without the table's row the self-check must stop the run."""
    model = fam.build("granite", tok)
    monkeypatch.delitem(FAMILY_FACTORS, "granite")
    with pytest.raises(ValueError, match=r"GraniteForCausalLM's own logits differ .*max \|Δ logprob\| = \d"):
        check_fused_logits(model, lm_head(model), completion_hidden)


@pytest.mark.parametrize("model_type,field", [("granite", "logit_scale"), ("minicpm3", "hidden_scale"),
                                              ("gemma2", "softcap"), ("falcon_h1", "logit_scale")])
def test_transform_is_read_from_the_config(model_type, field, tok):
    model = fam.build(model_type, tok)
    t = logit_transform(model)
    assert getattr(t, field) not in (None, 1.0), t
    assert check_fused_logits(model, lm_head(model), completion_hidden) <= 1e-3


def test_family_whose_attention_can_not_pack_trains_padded(tok, tmp_path, caplog):
    """BioGPT's decoder ignores packed sequences' boundaries (with attention per sequence too: its learned positions
    do not read the position ids): by default (padding_free=None) the trainer takes the
    padded path, with one log line naming the class and why, and trains; padding_free=True is refused by name."""
    model = fam.build("biogpt", tok)
    args = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=4, max_completion_length=3,
                max_steps=1, report_to="none", save_strategy="no", disable_tqdm=True, bf16=False,
                gradient_checkpointing=False)
    data = Dataset.from_list([{"prompt": f"{a}+1="} for a in range(4)])
    with caplog.at_level("INFO", logger="fastrl.policy"):
        trainer = GRPOTrainer(model, fam.checksum_reward, GRPOConfig(**args), train_dataset=data, processing_class=tok)
    assert trainer.args.padding_free is False
    assert [r.getMessage() for r in caplog.records if r.name == "fastrl.policy"] == [
        "padding_free: BioGptForCausalLM trains on padded batches: its attention (attn_implementation='sdpa') mixes "
        "packed sequences"]
    trainer.train()
    assert math.isfinite(trainer.state.log_history[0]["loss"])
    with pytest.raises(ValueError, match="padding_free=True: BioGptForCausalLM can not run packed sequences"):
        GRPOTrainer(model, fam.checksum_reward, GRPOConfig(**args, padding_free=True), train_dataset=data,
                    processing_class=tok)


def test_gpt_oss_loads_by_path_with_an_attention_it_supports(tok, tmp_path):
    """GPT-OSS refuses sdpa; load_policy no longer forces it, so transformers picks what the class supports."""
    fam.build("gpt_oss", tok).save_pretrained(tmp_path)
    model = load_policy(str(tmp_path), GRPOConfig(output_dir=str(tmp_path / "out")), torch.device("cpu"))
    assert type(model).__name__ == "GptOssForCausalLM"
    assert model.config._attn_implementation != "sdpa"


def test_prompt_tuning_is_refused_by_name_before_work(tok, tmp_path):
    from peft import PromptTuningConfig

    model = tiny.build_model(tok)
    args = GRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=2, max_steps=1,
                      report_to="none", save_strategy="no")
    with pytest.raises(ValueError, match="peft_config: PromptTuningConfig"):
        GRPOTrainer(model, tiny.short_reward, args, train_dataset=Dataset.from_list([{"prompt": "1+1="}] * 4),
                    processing_class=tok, peft_config=PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
