"""fastrl.packed_attention: sdpa per sequence of a packed row, against three independent references on tiny random
models of four families (Llama with GQA; Mistral, whose attention is given its sliding window; Qwen2-MoE, whose
window reaches attention only through the mask; Gemma3, sliding and full layers mixed), ragged random lengths,
fp32 and bf16:
- each sequence run alone (no packing at all);
- the padded twin: the sequences right-padded into [B, L_max] with an attention mask;
- transformers' own packed path: sdpa with the dense block-diagonal [S, S] mask (the model before install).
Gradients of every parameter equal the dense-mask path's, with and without gradient checkpointing. No mask wider
than the longest sequence is ever built.

Tolerances: fp32 rtol 1e-4 / atol 1e-5 (GEMMs over other shapes sum in another order: measured ~1e-6), for
gradients atol 1e-5 of each tensor's largest entry (an embedding row's gradient sums many rows: Gemma3's ~300 differ
by ~2e-4, 6e-7 relative in norm); bf16
against the same computation in fp32, no worse than the dense-mask path's own bf16 error plus 2e-2 x the largest
|value| (the reference path's error at bf16 is itself ~1e-2 of the scale: 8 mantissa bits through two layers).
"""
import pytest
import torch
from transformers import AutoModelForCausalLM, CONFIG_MAPPING

from fastrl import packed_attention
from fastrl.policy import final_hidden, packed_attention_problem, packed_completion_hidden

pytestmark = pytest.mark.usefixtures("one_thread")
SIZES = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, max_position_embeddings=256)
FAMILIES = {  # model_type -> config fields beyond SIZES: windows of 5, shorter than most sequences
    "llama": {},
    "mistral": dict(sliding_window=5),
    "qwen2_moe": dict(use_sliding_window=True, sliding_window=5, max_window_layers=2, num_experts=4,
                      num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=32),
    "gemma3_text": dict(sliding_window=5, layer_types=["sliding_attention", "full_attention"]),
}


def build(model_type: str, seed: int, dtype=torch.float32) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = CONFIG_MAPPING[model_type](**SIZES, **FAMILIES[model_type])
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").to(dtype)


def ragged(seed: int, n: int = 5, longest: int = 23):
    """(input_ids [S], position_ids [S], cu_seqlens [n + 1]) of n sequences of random lengths in [1, longest]."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, longest + 1, (n,), generator=g)
    lengths[0] = longest
    ids = torch.randint(0, SIZES["vocab_size"], (int(lengths.sum()),), generator=g)
    cu_seqlens = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)])
    return ids, torch.cat([torch.arange(int(n)) for n in lengths]), cu_seqlens


def as_batch(ids, pos, cu):
    return type("Packed", (), dict(input_ids=ids, position_ids=pos, cu_seqlens=cu, predict_index=slice(None)))


def packed(model, ids, pos, cu):
    """The padding-free path as the trainer takes it: the pack check switches sdpa to attention per sequence."""
    assert packed_attention_problem(model) is None and model.config._attn_implementation == packed_attention.NAME
    return packed_completion_hidden(model, as_batch(ids, pos, cu))  # [S, H]


def dense(model, ids, pos):
    """transformers' own packed path: sdpa with the dense block-diagonal [S, S] mask."""
    assert model.config._attn_implementation == "sdpa"
    return final_hidden(model, input_ids=ids[None], position_ids=pos[None])[0]  # [S, H]


def alone(model, ids, pos, cu):
    spans = list(zip(cu[:-1].tolist(), cu[1:].tolist()))
    return torch.cat([final_hidden(model, input_ids=ids[None, a:b], position_ids=pos[None, a:b])[0] for a, b in spans])


def padded(model, ids, pos, cu):
    """The sequences right-padded into [B, L_max] with an attention mask, their valid rows back in packed order."""
    lengths = (cu[1:] - cu[:-1]).tolist()
    rows = torch.arange(max(lengths))[None] < torch.tensor(lengths)[:, None]  # [B, L_max]
    batch_ids = torch.zeros(rows.shape, dtype=ids.dtype)
    batch_ids[rows] = ids
    hidden = final_hidden(model, input_ids=batch_ids, attention_mask=rows.long(),
                          position_ids=torch.arange(max(lengths)).expand(rows.shape))
    return hidden[rows]  # [S, H]


@pytest.mark.parametrize("model_type", FAMILIES)
def test_fp32_equals_alone_padded_and_dense(model_type):
    seed = list(FAMILIES).index(model_type)
    model = build(model_type, seed).eval()
    ids, pos, cu = ragged(seed)
    with torch.no_grad():
        references = {"dense": dense(model, ids, pos), "alone": alone(model, ids, pos, cu),
                      "padded": padded(model, ids, pos, cu)}
        got = packed(model, ids, pos, cu)
    for name, want in references.items():
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("model_type", FAMILIES)
def test_bf16_no_worse_than_the_dense_mask(model_type):
    seed = 10 + list(FAMILIES).index(model_type)
    ids, pos, cu = ragged(seed)
    with torch.no_grad():
        truth = dense(build(model_type, seed), ids, pos)  # fp32
        model = build(model_type, seed, torch.bfloat16).eval()
        reference_error = (dense(model, ids, pos).float() - truth).abs().max()
        error = (packed(model, ids, pos, cu).float() - truth).abs().max()
    assert error <= reference_error + 2e-2 * truth.abs().max(), (float(error), float(reference_error))


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("model_type", ["llama", "gemma3_text"])
def test_gradients_equal_the_dense_mask(model_type, checkpointing):
    seed = 20 + list(FAMILIES).index(model_type)
    ids, pos, cu = ragged(seed)
    weights = torch.randn(len(ids), SIZES["hidden_size"], generator=torch.Generator().manual_seed(seed))
    grads = []
    for run in (dense, packed):
        model = build(model_type, seed).train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        hidden = run(model, ids, pos) if run is dense else run(model, ids, pos, cu)
        (hidden * weights).sum().backward()
        grads.append({n: p.grad for n, p in model.get_decoder().named_parameters()})
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-4, atol=1e-5 * float(g.abs().max()), msg=name)


def test_no_mask_wider_than_the_longest_sequence(monkeypatch):
    """The masks built for a packed row are each sequence's own block (or none): never [S, S]."""
    widths = []
    real = packed_attention.sdpa_mask

    def recording(**kwargs):
        widths.append(kwargs["kv_length"])
        return real(**kwargs)

    monkeypatch.setattr(packed_attention, "sdpa_mask", recording)
    ids, pos, cu = ragged(30, n=6, longest=17)
    with torch.no_grad():
        packed(build("gemma3_text", 30).eval(), ids, pos, cu)
    assert widths and max(widths) == 17 < len(ids)


def test_plain_causal_blocks_build_no_mask():
    """A model without windows gets None for every block: sdpa runs is_causal, with no mask tensor."""
    ids, pos, cu = ragged(31)
    model = build("llama", 31).eval()
    assert packed_attention_problem(model) is None
    masks, real = [], packed_attention.packed_sdpa_attention

    def recording(module, query, key, value, attention_mask, **kwargs):
        masks.append(attention_mask)
        return real(module, query, key, value, attention_mask, **kwargs)

    packed_attention.AttentionInterface.register(packed_attention.NAME, recording)
    try:
        with torch.no_grad():
            packed_completion_hidden(model, as_batch(ids, pos, cu))
    finally:
        packed_attention.AttentionInterface.register(packed_attention.NAME, real)
    assert len(masks) == SIZES["num_hidden_layers"]
    assert all(isinstance(m, packed_attention.PackedMask) and m.blocks == (None,) * 5 for m in masks)


def test_a_family_whose_layers_use_the_mask_packs_with_the_dense_mask(caplog):
    """Falcon adds its alibi/mask to the mask tensor itself: attention per sequence fails there, so the pack check
    switches it back to sdpa with transformers' dense mask (exact, quadratic), says so, and still packs."""
    torch.manual_seed(41)
    config = CONFIG_MAPPING["falcon"](vocab_size=97, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      alibi=True)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    with caplog.at_level("INFO", logger="fastrl.policy"):
        assert packed_attention_problem(model) is None
    assert model.config._attn_implementation == "sdpa"
    assert "FalconForCausalLM packs with sdpa's dense [S, S] mask: attention per sequence fails" in caplog.text
    ids, pos, cu = ragged(41)
    with torch.no_grad():
        torch.testing.assert_close(packed_completion_hidden(model, as_batch(ids, pos, cu)), alone(model, ids, pos, cu),
                                   rtol=1e-4, atol=1e-5)
