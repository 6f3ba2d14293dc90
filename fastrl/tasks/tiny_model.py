"""A tiny causal LM and a character-level tokenizer, built locally (no downloads).

`build_tiny_model(dir)` writes a random-init transformers model (Llama or Qwen2) and a tokenizer whose
vocabulary is one token per character (digits, operators, letters, space, punctuation) plus special tokens.
The folder loads with `AutoModelForCausalLM.from_pretrained`, `AutoTokenizer.from_pretrained` and
`PreTrainedTokenizerFast.from_pretrained`, and vLLM's CPU backend can serve it (its attention needs a head
size in {32, 64, 80, 96, 112, 128, ...}).

Building is idempotent: the build arguments are stored in the folder, and a later call with the same
arguments returns at once. The folder is written under a temporary name and renamed, so a crash mid-build
never leaves a half-written model behind.
"""
from __future__ import annotations

import json
import os
import shutil
import string
import tempfile

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast, Qwen2Config

PAD, BOS, EOS, IM_START = "<pad>", "<bos>", "<|im_end|>", "<|im_start|>"
SPECIAL_TOKENS = [PAD, BOS, EOS, IM_START]  # ids 0..3, in this order
CHARACTERS = string.digits + string.ascii_letters + string.punctuation + " \n"

# ChatML, as Qwen uses it; <|im_end|> doubles as eos, so a chat completion ends where the turn ends.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

ARCHITECTURES = {"llama": LlamaConfig, "qwen2": Qwen2Config}
SUPPORTED_HEAD_DIMS = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256)  # vLLM CPU attention
MARKER_FILE = "fastrl_tiny_model.json"


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer: every character of CHARACTERS is one token, special tokens first."""
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + list(CHARACTERS))}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token=None))
    # Split into single characters, keeping every one (spaces and newlines are tokens too).
    tokenizer.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    tokenizer.add_special_tokens(SPECIAL_TOKENS)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        padding_side="left",  # decoder-only: prompts are left-padded for generation
        chat_template=CHAT_TEMPLATE,
        model_max_length=4096,
    )
    wrapped.add_special_tokens({"additional_special_tokens": [IM_START]})
    return wrapped


def _check_args(arch, num_layers, hidden_size, num_heads, head_dim, vocab_size, initializer_range,
                base_vocab) -> None:
    if arch not in ARCHITECTURES:
        raise ValueError(f"arch must be one of {sorted(ARCHITECTURES)}, got {arch!r}")
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    if head_dim not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head_dim must be one of {SUPPORTED_HEAD_DIMS} (vLLM's CPU attention), got {head_dim}")
    if num_heads < 1 or num_heads * head_dim != hidden_size:
        raise ValueError(
            f"num_heads * head_dim must equal hidden_size: num_heads={num_heads}, head_dim={head_dim}, "
            f"hidden_size={hidden_size}"
        )
    if not initializer_range > 0:
        raise ValueError(f"initializer_range must be > 0, got {initializer_range}")
    if vocab_size is not None and vocab_size < base_vocab:
        raise ValueError(f"vocab_size must be >= the tokenizer's {base_vocab} tokens, got {vocab_size}")


def _model_config(arch, num_layers, hidden_size, num_heads, num_key_value_heads, head_dim, intermediate_size,
                  vocab_size, tie_word_embeddings, initializer_range, tokenizer, max_position_embeddings):
    return ARCHITECTURES[arch](
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_key_value_heads,
        head_dim=head_dim,
        max_position_embeddings=max_position_embeddings,
        initializer_range=initializer_range,
        tie_word_embeddings=tie_word_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        dtype="float32",
    )


def _already_built(output_dir: str, build_args: dict) -> bool:
    marker = os.path.join(output_dir, MARKER_FILE)
    if not os.path.isfile(marker):
        return False
    with open(marker) as f:
        return json.load(f) == build_args


def build_tiny_model(
    output_dir: str,
    *,
    arch: str = "llama",
    num_layers: int = 2,
    hidden_size: int = 64,
    num_heads: int | None = None,
    num_key_value_heads: int | None = None,
    head_dim: int = 32,
    intermediate_size: int | None = None,
    vocab_size: int | None = None,
    tie_word_embeddings: bool = True,
    initializer_range: float = 0.02,
    seed: int = 0,
    max_position_embeddings: int = 512,
    chat_template: str | None = None,
) -> str:
    """Write a random-init causal LM and its character tokenizer to `output_dir`; return the path.

    num_heads defaults to hidden_size // head_dim, num_key_value_heads to num_heads (grouped-query attention when
    fewer), intermediate_size to 4 * hidden_size; initializer_range is the std of the random weights.
    Qwen2.5-0.5B's shape, for example: arch="qwen2", num_layers=24, hidden_size=896, num_heads=14,
    num_key_value_heads=2, head_dim=64, intermediate_size=4864, vocab_size=151936.
    vocab_size defaults to the tokenizer's size (100 tokens); a larger value (e.g. 32768, for benchmarks)
    pads the embedding and lm_head with rows no text maps to. chat_template replaces the ChatML one (tool calling
    needs a template with tool roles, e.g. Qwen's; at one token per character its prompts need a longer context).
    An existing folder built with the same arguments is reused as it is.
    """
    tokenizer = build_tokenizer()
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    num_heads = num_heads if num_heads is not None else hidden_size // head_dim
    num_key_value_heads = num_key_value_heads if num_key_value_heads is not None else num_heads
    intermediate_size = intermediate_size if intermediate_size is not None else 4 * hidden_size
    _check_args(arch, num_layers, hidden_size, num_heads, head_dim, vocab_size, initializer_range, len(tokenizer))
    if num_key_value_heads < 1 or num_heads % num_key_value_heads:
        raise ValueError(f"num_key_value_heads must divide num_heads={num_heads}, got {num_key_value_heads}")
    if intermediate_size < 1:
        raise ValueError(f"intermediate_size must be >= 1, got {intermediate_size}")
    vocab_size = vocab_size if vocab_size is not None else len(tokenizer)
    build_args = dict(arch=arch, num_layers=num_layers, hidden_size=hidden_size, num_heads=num_heads,
                      head_dim=head_dim, vocab_size=vocab_size, tie_word_embeddings=tie_word_embeddings,
                      initializer_range=initializer_range, seed=seed)
    if (num_key_value_heads, intermediate_size) != (num_heads, 4 * hidden_size):  # older folders stay valid
        build_args.update(num_key_value_heads=num_key_value_heads, intermediate_size=intermediate_size)
    if max_position_embeddings != 512 or chat_template is not None:  # earlier builds' markers stay valid
        build_args.update(max_position_embeddings=max_position_embeddings, chat_template=chat_template)
    output_dir = os.path.abspath(output_dir)
    if _already_built(output_dir, build_args):
        return output_dir
    if os.path.isdir(output_dir) and os.listdir(output_dir) and not os.path.isfile(
            os.path.join(output_dir, MARKER_FILE)):
        raise ValueError(f"output_dir {output_dir!r} is a non-empty folder that holds no tiny model; "
                         "refusing to overwrite it")

    config = _model_config(arch, num_layers, hidden_size, num_heads, num_key_value_heads, head_dim, intermediate_size,
                           vocab_size, tie_word_embeddings, initializer_range, tokenizer, max_position_embeddings)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)

    parent = os.path.dirname(output_dir) or "."
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".tiny_model_", dir=parent)
    try:
        model.save_pretrained(staging)
        model.generation_config.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        with open(os.path.join(staging, MARKER_FILE), "w") as f:
            json.dump(build_args, f, indent=2)
        if os.path.exists(output_dir):  # a tiny model built with other arguments: replace it
            shutil.rmtree(output_dir)
        os.rename(staging, output_dir)
    finally:
        if os.path.exists(staging):
            shutil.rmtree(staging)
    return output_dir
