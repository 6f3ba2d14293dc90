"""The tiny model builder: the folder loads with transformers, the tokenizer is character-level and round-trips
text, the chat template applies, generation runs, rebuilding is idempotent, bad arguments are rejected."""
import json
import os

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from fastrl.tasks.tiny_model import CHARACTERS, MARKER_FILE, build_tiny_model

TEXT = "reverse 4821= 1284\n(a+b)*c, 'Hello' World! ~{x_y}?"


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return build_tiny_model(str(tmp_path_factory.mktemp("tiny") / "llama"), seed=1)


def test_model_loads_with_the_requested_shape(llama_dir):
    model = AutoModelForCausalLM.from_pretrained(llama_dir)
    config = model.config
    assert (config.model_type, config.num_hidden_layers, config.hidden_size) == ("llama", 2, 64)
    assert config.head_dim == 32 and config.num_attention_heads == 2
    assert config.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight


@pytest.mark.parametrize("tokenizer_class", [AutoTokenizer, PreTrainedTokenizerFast])
def test_tokenizer_is_character_level_and_round_trips(llama_dir, tokenizer_class):
    tokenizer = tokenizer_class.from_pretrained(llama_dir)
    ids = tokenizer(TEXT)["input_ids"]
    assert len(ids) == len(TEXT)  # one token per character, no bos/eos added
    assert tokenizer.decode(ids) == TEXT
    assert tokenizer.convert_ids_to_tokens(ids[:3]) == ["r", "e", "v"]
    every_character = tokenizer(CHARACTERS)["input_ids"]
    assert len(set(every_character)) == len(CHARACTERS)


def test_special_tokens_and_padding(llama_dir):
    tokenizer = PreTrainedTokenizerFast.from_pretrained(llama_dir)
    config = AutoModelForCausalLM.from_pretrained(llama_dir).config
    assert tokenizer.pad_token == "<pad>" and tokenizer.eos_token == "<|im_end|>" and tokenizer.bos_token == "<bos>"
    assert (config.pad_token_id, config.eos_token_id, config.bos_token_id) == (
        tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id)
    batch = tokenizer(["12", "3456"], padding=True)["input_ids"]
    assert batch[0][:2] == [tokenizer.pad_token_id] * 2  # left padding, for generation
    assert tokenizer.decode(batch[0] + [tokenizer.eos_token_id], skip_special_tokens=True) == "12"


def test_chat_template_applies(llama_dir):
    tokenizer = AutoTokenizer.from_pretrained(llama_dir)
    messages = [{"role": "user", "content": "sort 312="}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nsort 312=<|im_end|>\n<|im_start|>assistant\n"
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>")  # special tokens stay whole
    assert tokenizer.eos_token_id in ids


def test_generation_runs(llama_dir):
    tokenizer = PreTrainedTokenizerFast.from_pretrained(llama_dir)
    model = AutoModelForCausalLM.from_pretrained(llama_dir)
    inputs = tokenizer(["copy 12=", "copy 3456="], return_tensors="pt", padding=True)
    torch.manual_seed(0)
    out = model.generate(**inputs, max_new_tokens=6, do_sample=True, pad_token_id=tokenizer.pad_token_id)
    assert out.shape[0] == 2 and 1 <= out.shape[1] - inputs["input_ids"].shape[1] <= 6
    assert all(0 <= i < model.config.vocab_size for i in out.flatten().tolist())


def test_rebuild_with_same_arguments_reuses_the_folder(llama_dir):
    weights = os.path.join(llama_dir, "model.safetensors")
    before = os.stat(weights).st_mtime_ns
    assert build_tiny_model(llama_dir, seed=1) == llama_dir
    assert os.stat(weights).st_mtime_ns == before


def test_rebuild_with_other_arguments_replaces_the_model(tmp_path):
    path = build_tiny_model(str(tmp_path / "m"), seed=0)
    first = AutoModelForCausalLM.from_pretrained(path).model.embed_tokens.weight.clone()
    build_tiny_model(path, seed=2)
    second = AutoModelForCausalLM.from_pretrained(path).model.embed_tokens.weight
    assert not torch.equal(first, second)
    with open(os.path.join(path, MARKER_FILE)) as f:
        assert json.load(f)["seed"] == 2


def test_same_seed_gives_same_weights(tmp_path):
    a = AutoModelForCausalLM.from_pretrained(build_tiny_model(str(tmp_path / "a"), seed=3))
    b = AutoModelForCausalLM.from_pretrained(build_tiny_model(str(tmp_path / "b"), seed=3))
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(pa, pb), name


def test_padded_vocabulary_and_untied_qwen2(tmp_path):
    path = build_tiny_model(str(tmp_path / "q"), arch="qwen2", hidden_size=128, head_dim=64, vocab_size=1024,
                            tie_word_embeddings=False)
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(path)  # AutoTokenizer swaps Qwen2's pre-tokenizer in
    assert model.config.model_type == "qwen2" and model.config.num_attention_heads == 2
    assert model.lm_head.weight.shape == (1024, 128) and not model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    # ids no character maps to decode to nothing
    assert tokenizer.decode([tokenizer.convert_tokens_to_ids("7"), 1000]) == "7"
    logits = model(**tokenizer(["1+1="], return_tensors="pt")).logits
    assert logits.shape == (1, 4, 1024)


@pytest.mark.parametrize("kwargs, argument", [
    (dict(arch="gpt2"), "arch"),
    (dict(head_dim=48, hidden_size=96), "head_dim"),
    (dict(num_heads=3), "num_heads"),
    (dict(num_layers=0), "num_layers"),
    (dict(vocab_size=50), "vocab_size"),
    (dict(initializer_range=0.0), "initializer_range"),
])
def test_bad_arguments_name_the_argument(tmp_path, kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        build_tiny_model(str(tmp_path / "bad"), **kwargs)


def test_refuses_to_overwrite_a_foreign_folder(tmp_path):
    (tmp_path / "mine.txt").write_text("keep me")
    with pytest.raises(ValueError, match="output_dir"):
        build_tiny_model(str(tmp_path))
    assert (tmp_path / "mine.txt").read_text() == "keep me"
