"""A tiny Llama and a character-level tokenizer for trainer tests, built in memory (no downloads).

Independent of fastrl.tasks on purpose: the trainer's tests must not depend on the built-in tasks.
2 layers, hidden 64, head_dim 32, vocabulary = special tokens + digits, letters, a few symbols.
"""
from __future__ import annotations

import os
import string

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SPECIALS = ["<pad>", "<eos>", "<|user|>", "<|assistant|>"]
CHARS = string.digits + string.ascii_lowercase + "+-=*?:. \n"
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] + '<eos>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def build_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {tok: i for i, tok in enumerate(SPECIALS + list(CHARS))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="?"))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")  # one token per character
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(SPECIALS)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                   unk_token="?", chat_template=CHAT_TEMPLATE)


def build_model(tokenizer, seed: int = 0, tie: bool = False, dtype=torch.float32) -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, head_dim=32, max_position_embeddings=256,
                         tie_word_embeddings=tie, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(dtype)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def save_tiny(path: str, seed: int = 0, tie: bool = False) -> str:
    """Write model + tokenizer to `path` (loadable with from_pretrained) and return it."""
    os.makedirs(path, exist_ok=True)
    tok = build_tokenizer()
    build_model(tok, seed=seed, tie=tie).save_pretrained(path)
    tok.save_pretrained(path)
    return path


# ---- reward functions with TRL's signature, importable as "helpers_tiny:<name>" from a config (PYTHONPATH=tests)
def first_char_reward(completions, answer, **kwargs):
    """1 when the completion starts with the answer's first character (learnable by a tiny model)."""
    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return [1.0 if t[:1] == a[:1] else 0.0 for t, a in zip(texts, answer)]


def short_reward(completions, **kwargs):
    """Partial credit for short completions: 1 - len/10, floored at 0."""
    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return [max(0.0, 1.0 - len(t) / 10) for t in texts]


def stall_at_step(completions, trainer_state=None, **kwargs):
    """Crash-test helper: at the step named by FASTRL_TEST_STALL_AT_STEP, write FASTRL_TEST_STALL_MARKER and hang,
    so the test can kill -9 the process mid-step. Otherwise a zero reward."""
    stall = os.environ.get("FASTRL_TEST_STALL_AT_STEP")
    if stall is not None and trainer_state is not None and trainer_state.global_step == int(stall):
        with open(os.environ["FASTRL_TEST_STALL_MARKER"], "w") as f:
            f.write(str(trainer_state.global_step))
        import time

        while True:
            time.sleep(1)
    return [0.0] * len(completions)


def multiply(a: int, b: int) -> int:
    """Multiplies two integers (a tool: its docstring is its schema).

    Args:
        a: The first integer.
        b: The second integer.
    """
    return a * b


def addition_rows(n: int = 40):
    """Plain-text prompts 'a+b=' with the answer column."""
    return [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a in range(10) for b in range(10)][:n]
