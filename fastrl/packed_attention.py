"""Packed (padding-free) sdpa attention per sequence, without the dense [S, S] mask.

For a packed row [1, S] (position ids restarting at 0, no attention mask) transformers builds one block-diagonal
mask over all S tokens for sdpa: S² bytes, 1.07 GB at S = 32,676, and sdpa then does S² work per head. Only the
diagonal blocks are ever True, so here each sequence attends on its own slice instead: sdpa with is_causal where
its block is plain causal (no mask tensor at all), with its own [L, L] block otherwise (a sliding window or a chunk
shorter than the sequence). Memory and work O(Σ L²) instead of O(S²). flash_attention_2 (varlen) and
flex_attention (a sparse BlockMask) need none of this; eager models, and sdpa families whose layers use the mask
themselves (fastrl.policy.packed_attention_problem tries, and switches back), keep transformers' dense mask.

How it plugs in: `install(model)` (called by packed_attention_problem, the trainer's pack check) switches an sdpa
model to the attention NAME, registered in transformers' AttentionInterface and AttentionMaskInterface. Outside `packed_spans(...)` both are sdpa's own (sdpa_mask,
sdpa_attention_forward), so generation and the padded path do not change. Inside, the mask function returns a
PackedMask: for each sequence, the block of the mask transformers would have built (its own mask function
evaluated at that block's offsets, so windows and chunks are the model's), or None where the block is plain causal.
Masks are made once per forward, outside the layers, so a layer recomputed by gradient checkpointing gets the
same PackedMask again.
"""
from __future__ import annotations

import contextlib
from contextvars import ContextVar
from typing import NamedTuple

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "fastrl_packed_sdpa"
_SPANS: ContextVar[tuple[tuple[int, int], ...] | None] = ContextVar("fastrl_packed_spans", default=None)


class PackedMask(NamedTuple):
    spans: tuple[tuple[int, int], ...]  # [start, end) of each sequence in the packed row
    blocks: tuple[torch.Tensor | None, ...]  # [1, 1, L, L] bool (True = attend) per sequence; None = plain causal


@contextlib.contextmanager
def packed_spans(cu_seqlens: torch.Tensor):
    """Masks made inside the block are PackedMasks for the sequences cu_seqlens [B + 1] delimits."""
    cu = cu_seqlens.tolist()
    token = _SPANS.set(tuple(zip(cu[:-1], cu[1:])))
    try:
        yield
    finally:
        _SPANS.reset(token)


def install(model: torch.nn.Module) -> bool:
    """Switch a model (and its sub-configs) from sdpa to NAME -> whether it did; other attentions stay as they are."""
    if getattr(model.config, "_attn_implementation", None) != "sdpa":
        return False
    model.config._attn_implementation = NAME
    return True


def uninstall(model: torch.nn.Module) -> None:
    """Back to sdpa (transformers' dense mask on packed rows): for a family whose layers use the mask themselves."""
    if model.config._attn_implementation == NAME:
        model.config._attn_implementation = "sdpa"


def packed_sdpa_mask(batch_size: int, q_length: int, kv_length: int, q_offset=0, kv_offset=0, *,
                     mask_function, attention_mask=None, **kwargs):
    """sdpa_mask, or inside packed_spans (one packed row, no cache) a PackedMask of its diagonal blocks."""
    spans = _SPANS.get()
    if (spans is None or batch_size != 1 or attention_mask is not None or not isinstance(q_offset, int)
            or q_offset or kv_offset or not q_length == kv_length == spans[-1][1]):
        return sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                         kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask, **kwargs)
    blocks = []
    for start, end in spans:
        block = sdpa_mask(batch_size=1, q_length=end - start, kv_length=end - start, q_offset=start,
                          kv_offset=start, mask_function=mask_function, allow_is_causal_skip=False,
                          use_vmap=kwargs.get("use_vmap", False), device=kwargs.get("device", "cpu"))  # [1, 1, L, L]
        causal = torch.ones(end - start, end - start, dtype=torch.bool, device=block.device).tril_()
        blocks.append(None if torch.equal(block[0, 0], causal) else block)
    return PackedMask(spans, tuple(blocks))


def packed_sdpa_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attention_mask, **kwargs):
    """sdpa_attention_forward, or for a PackedMask sdpa on each sequence's slice.
    query [1, Hq, S, D], key/value [1, Hkv, S, D] -> ([1, S, Hq, D], None)."""
    if not isinstance(attention_mask, PackedMask):
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    outs = []
    for (start, end), block in zip(attention_mask.spans, attention_mask.blocks):
        q, k, v = query[:, :, start:end], key[:, :, start:end], value[:, :, start:end]  # [1, H, L, D]
        out, _ = sdpa_attention_forward(module, q, k, v, block, **{**kwargs, "is_causal": block is None})
        outs.append(out)  # [1, L, Hq, D]
    return torch.cat(outs, dim=1), None


AttentionInterface.register(NAME, packed_sdpa_attention)
AttentionMaskInterface.register(NAME, packed_sdpa_mask)
