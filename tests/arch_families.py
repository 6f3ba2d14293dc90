"""Tiny random models of every causal-LM family the installed transformers can build offline from its config class,
and one GRPO run on each: the fused path's self-check, two steps, the sampler. Used by test_architectures.py and
run as a script to print the README's family table:

    PYTHONPATH=$PWD:tests .venv/bin/python tests/arch_families.py
(or FASTRL_ARCH_TABLE=table.md with `pytest tests/test_architectures.py`, which writes the same table).
"""
from __future__ import annotations

import math
import tempfile
import warnings

import torch
from datasets import Dataset
from transformers import CONFIG_MAPPING, AutoModelForCausalLM
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

import helpers_tiny as tiny

FAMILIES = sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
MAX_PARAMS = 3_000_000  # a family whose config keeps a large part at our sizes (vision towers, huge vocab) is left
LOGIT_STD = 8.0  # the head is scaled so logits have this std, as a trained model's do (random init gives ~0.1)
# Every size field some family names, at tiny values; each config takes the ones it knows.
TINY = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=4, head_dim=16,
            max_position_embeddings=256, moe_intermediate_size=32, num_experts=4, num_local_experts=4,
            n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1, kv_lora_rank=16, q_lora_rank=16,
            qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, rotary_dim=8, n_embd=64, n_head=4, d_model=64,
            n_positions=256, n_ctx=256, ffn_dim=128, tie_word_embeddings=False,
            # state-space parts (Mamba/Bamba/FalconH1/Nemotron-H): few heads, a small state, chunks of 16 (the
            # default 256-long chunks make the CPU scan ~50× slower on 8 tokens), attention at layer 1 where listed
            attn_layer_indices=[1], mamba_n_heads=4, mamba_d_ssm=128, mamba_d_state=16, mamba_chunk_size=16,
            chunk_size=16, ssm_state_size=16, mamba_num_heads=4, mamba_head_dim=32, n_groups=1,
            # logit post-processing away from 1 where a family's default is 1 (Granite, HyperCLOVAX, MiniCPM3,
            # FalconH1), so the fused path must really apply it
            logits_scaling=4.0, lm_head_multiplier=2.5)
LAYERS = (2, 4, 8)  # hybrid families put attention every k-th layer: more layers until one is attention


class NotBuilt(Exception):
    """The family can not be built tiny and offline here (the reason is the message)."""


def _config(model_type: str, layers: int, tok):
    cls = CONFIG_MAPPING[model_type]
    known = cls().to_dict()
    ids = dict(vocab_size=len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
               bos_token_id=tok.eos_token_id, num_hidden_layers=layers, n_layer=layers)
    return cls(**{k: v for k, v in {**TINY, **ids}.items() if k in known})


def _build_once(model_type: str, layers: int, tok, seed: int) -> torch.nn.Module:
    config = _config(model_type, layers, tok)
    if getattr(config, "is_encoder_decoder", False):
        raise NotBuilt("encoder-decoder")
    with torch.device("meta"):
        size = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    if size > MAX_PARAMS:
        raise NotBuilt(f"{size / 1e6:.0f}M parameters at tiny sizes (parts the tiny sizes do not reach)")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).float()
    probe = torch.randint(0, len(tok), (2, 8), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        std = float(model(input_ids=probe).logits.float().std())
        model.get_output_embeddings().weight.mul_(LOGIT_STD / max(std, 1e-6))
    return model


def _generates(model, tok) -> None:
    """The scope is what transformers can generate with: its own generate on left-padded prompts, or NotBuilt."""
    probe = torch.randint(0, len(tok), (2, 8), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(probe)
    mask[0, :2] = 0
    try:
        model.generate(input_ids=probe, attention_mask=mask, max_new_tokens=2, do_sample=True,
                       pad_token_id=tok.pad_token_id)
    except Exception as e:  # noqa: BLE001
        raise NotBuilt(f"transformers' own generate fails: {type(e).__name__}: {str(e).splitlines()[0][:80]}")


def build(model_type: str, tok, seed: int = 0) -> torch.nn.Module:
    """A tiny fp32 model of this family with its head sharpened to logits of std ≈ LOGIT_STD, or NotBuilt."""
    last = None
    for layers in LAYERS:
        try:
            model = _build_once(model_type, layers, tok, seed)
        except NotBuilt:
            raise
        except Exception as e:  # noqa: BLE001 - any failure to build or run the family's own forward
            last = e
            continue
        _generates(model, tok)
        return model
    raise NotBuilt(f"{type(last).__name__}: {str(last).splitlines()[0][:100]}")


def checksum_reward(completions, **kwargs):
    """A reward that differs between almost any two different completions (their characters' sum mod 7)."""
    return [float(sum(map(ord, c)) % 7) for c in completions]


def train_two_steps(model, tok, out_dir: str):
    """GRPOTrainer on `model` for two steps (the transformers sampler, the fused loss): the trainer's log."""
    from fastrl import GRPOConfig, GRPOTrainer

    # temperature 8 on logits of std 8: varied completions, so the advantages are not all zero and the weights move.
    # No gradient checkpointing (CTRL refuses it), another question than the logits'. padding_free is left at its
    # default: families whose attention can not pack train padded (fastrl.policy.use_padding_free).
    args = GRPOConfig(output_dir=out_dir, per_device_train_batch_size=4, num_generations=4, max_completion_length=3,
                      max_steps=2, learning_rate=1e-3, logging_steps=1, save_strategy="no", report_to="none",
                      disable_tqdm=True, bf16=False, temperature=8.0, gradient_checkpointing=False)
    rows = [{"prompt": f"{a}+{b}="} for a, b in zip(range(4), range(3, 7))]
    trainer = GRPOTrainer(model, checksum_reward, args, train_dataset=Dataset.from_list(rows),
                          processing_class=tok)
    trainer.train()
    return trainer


def run_family(model_type: str, tok) -> tuple[str, str]:
    """(status, detail): "trains" (self-check passed, two finite steps, sampler ran), "refused" (the trainer's
    ValueError), "not built" (NotBuilt's reason), or a failure: "error" (any other exception), "not finite", "no update"."""
    try:
        model = build(model_type, tok)
    except NotBuilt as e:
        return "not built", str(e)
    with tempfile.TemporaryDirectory() as out, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        before = [p.detach().clone() for p in model.parameters()]
        try:
            trainer = train_two_steps(model, tok, out)
        except ValueError as e:
            return "refused", str(e).splitlines()[0]
        except Exception as e:  # noqa: BLE001 - reported as the family's failure, not raised, so the table is whole
            return "error", f"{type(e).__name__}: {str(e).splitlines()[0][:150]}"
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    after = list(trainer.model.parameters())
    if not (len(losses) == 2 and all(math.isfinite(x) for x in losses) and all(torch.isfinite(p).all() for p in after)):
        return "not finite", f"losses {losses}"
    moved = sum(not torch.equal(a, b) for a, b in zip(before, after))
    return ("trains" if moved else "no update"), f"losses {[round(x, 4) for x in losses]}, {moved} tensors moved"


def markdown_table(results: dict) -> str:
    """{model_type: (status, detail)} -> the README's table."""
    lines = ["| model_type | status | detail |", "|---|---|---|"]
    lines += [f"| {f} | {s} | {d.replace('|', '/')} |" for f, (s, d) in sorted(results.items())]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    tokenizer = tiny.build_tokenizer()
    torch.set_num_threads(1)
    print(markdown_table({family: run_family(family, tokenizer) for family in FAMILIES}))
