"""The memory formulas behind `fastrl plan`: bytes held by each part of a GRPO step, phase by phase.

Notation: L layers, H hidden, I intermediate, Hq = heads·head_dim, V vocab, b completions per micro-batch,
P prompt and T completion length, S tokens in a micro-batch and N completion tokens: b·(P + T) and b·T padded,
the valid tokens only with padding_free (RunShape.micro_tokens / micro_rows).

Activations are counted tensor by tensor from what autograd saves in a transformers Llama layer with sdpa
attention (listed with `torch.autograd.graph.saved_tensors_hooks`, torch 2.13 / transformers 5.23), per token:

    attention norm   x [H], rsqrt [1], x·rsqrt [H] (only if the norm weight trains)
    q/k/v input      normed [H] once, if q, k or v trains (under bf16 autocast: one bf16 copy per trained linear)
    attention        q, k, v (k, v repeated to all heads), output: 4·Hq; log-sum-exp [heads] fp32;
                     the attention mask, a fresh fp32 copy in every layer: [b, 1, P+T, P+T] padded (P+T per
                     token); none packed (sdpa per sequence with is_causal: fastrl.packed_attention)
    MLP norm         x [H], rsqrt [1], x·rsqrt [H] (if the norm trains), normed [H] if gate or up trains
    MLP              gate, up, silu(gate): 3·I; their product [I] if down trains
    LoRA             the adapter's A output [r] per adapted linear (A and B train, the base does not)

A frozen linear (LoRA's base weights) saves no input, and a frozen norm weight saves no x·rsqrt. Under bf16
autocast with fp32 weights, every linear also saves its bf16 weight copy, and linear inputs/outputs are bf16
while the residual stream and norms stay fp32. With gradient checkpointing a layer saves only its input [H];
backward recomputes one layer at a time.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from fastrl.kernels.grpo_single_pass import loss_tile_elements
from fastrl.plan.shapes import ModelShape, RunShape

FP32 = 4
BF16 = 2
# A CUDA context and the caching allocator's slack hold memory outside any tensor. A typical figure, not
# measured here (these machines have no GPU): shown as its own line so a reader can discount it.
CUDA_CONTEXT_BYTES = 512 << 20


@dataclass
class Phase:
    name: str
    parts: dict[str, int] = field(default_factory=dict)  # what is live at this phase's peak -> bytes
    host: dict[str, int] = field(default_factory=dict)  # on a GPU run: what sits in host memory meanwhile

    @property
    def total(self) -> int:
        return sum(self.parts.values())


def _trains(model: ModelShape, run: RunShape, name: str) -> bool:
    """Whether a layer's linear `name` has a trainable weight (full fine-tuning) or adapter (LoRA)."""
    return run.lora is None or name in run.lora.targets


def _autocast(model: ModelShape, run: RunShape) -> bool:
    """bf16 autocast over fp32 weights (the trainer's bf16=True on an fp32 model)."""
    return run.bf16 and model.weight_bytes == FP32


def activation_bytes_per_token(model: ModelShape, run: RunShape, seq_len: int) -> int:
    """Bytes one decoder layer saves for backward, per token of a micro-batch (see the module docstring)."""
    h, i, hq = model.hidden, model.intermediate, model.heads * model.head_dim
    a = BF16 if (_autocast(model, run) or model.weight_bytes == BF16) else FP32  # linear inputs/outputs
    norm_x = FP32  # the norm saves its input in fp32 (transformers upcasts 16-bit inputs)
    norms_train = run.lora is None
    trained = [n for n in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj") if _trains(model, run, n)]
    attn_in = [n for n in trained if n in ("q_proj", "k_proj", "v_proj")]
    mlp_in = [n for n in trained if n in ("gate_proj", "up_proj")]
    copies = _autocast(model, run)  # under autocast each trained linear saves its own bf16 input copy
    out = 2 * (norm_x * h + FP32)  # two norms: x [H] and rsqrt [1]
    out += 2 * (norm_x * h) if norms_train else 0  # x·rsqrt [H], saved for the norm weight's gradient
    out += a * h * ((len(attn_in) if copies else min(1, len(attn_in))) + (len(mlp_in) if copies else
                                                                           min(1, len(mlp_in))))
    out += a * 4 * hq + FP32 * model.heads + a * seq_len  # q, k, v, output; lse; the attention mask row
    out += a * 3 * i + (a * i if _trains(model, run, "down_proj") else 0)  # gate, up, silu(gate), product
    if run.lora is not None:
        out += a * run.lora.r * len(run.lora.targets)
    return out


def autocast_weight_copies(model: ModelShape, run: RunShape) -> int:
    """Under bf16 autocast with fp32 weights: each layer's linear weights in bf16, saved for backward."""
    if not _autocast(model, run):
        return 0
    return model.layers * sum(a * b for a, b in model.linear_shapes().values()) * BF16


def top_activation_bytes_per_token(model: ModelShape, run: RunShape) -> int:
    """Outside the layers: the final norm (x, x·rsqrt) and the input ids (int64)."""
    return FP32 * model.hidden * (2 if run.lora is None else 1) + FP32 + 8


def checkpointed_bytes_per_token(model: ModelShape, run: RunShape) -> int:
    """With gradient checkpointing a layer keeps only its input: the residual stream [H]."""
    return model.hidden * (BF16 if model.weight_bytes == BF16 else FP32)


def layer_backward_transient(model: ModelShape, run: RunShape, tokens: int) -> int:
    """The largest gradient burst inside one layer's backward: the SwiGLU product's backward makes the
    gradients of both its [S, I] operands while they are still saved (seen on an RSS timeline per autograd
    node: +2·S·I·4 bytes at MulBackward0 in fp32)."""
    a = BF16 if (_autocast(model, run) or model.weight_bytes == BF16) else FP32
    return tokens * 2 * model.intermediate * a


def fused_loss_bytes(model: ModelShape, run: RunShape, n_rows: int, tokens: int) -> dict[str, dict[str, int]]:
    """The fused loss's working set at its two high points (grpo_single_pass + FusedLinearGRPOLoss):

    forward:  the rows copy [N, H], dh [N, H] fp32, dW [V, H] fp32 (if the head trains) and the logits tiles
              (kernels/grpo_single_pass.loss_tile_elements: whole-vocabulary rows or vocabulary chunks)
    backward: the gradients stored by forward are scaled in place (nothing new), but with 16-bit weights they are
              cast back to 16 bits
    """
    v, h = model.vocab, model.hidden
    head = v * h if run.lora is None else 0
    a = BF16 if (_autocast(model, run) or model.weight_bytes == BF16) else FP32
    tiles = loss_tile_elements(n_rows, v, fp32=a == FP32) * FP32
    forward = {"loss: rows [N,H] + dh [N,H] fp32": n_rows * h * (a + FP32), "loss: dW [V,H] fp32": head * FP32,
               "loss: logit tiles fp32": tiles}
    backward = {"loss: dh [N,H] fp32": n_rows * h * FP32, "loss: dW [V,H] fp32": head * FP32}
    if model.weight_bytes == BF16:  # backward casts the scaled gradients to the 16-bit inputs' dtype
        backward["loss: 16-bit grad copies"] = (n_rows * h + head) * BF16
    return {"forward": forward, "backward": backward}


def materializing_loss_bytes(model: ModelShape, run: RunShape, n_rows: int, tokens: int) -> dict[str, dict]:
    """The materializing path (TRL without kernels): logits [N, V] fp32, log_softmax [N, V] fp32 and the
    gradients of both, held together at the start of backward, plus the same dh and dW."""
    out = fused_loss_bytes(model, run, n_rows, tokens)
    out["backward"]["loss: logits, log_softmax + grads [N,V] fp32 ×4"] = 4 * n_rows * model.vocab * FP32
    return out


def trainable_params(model: ModelShape, run: RunShape) -> int:
    return model.total_params() if run.lora is None else run.lora.params(model)


def per_rank(n: int, run: RunShape) -> int:
    """One rank's part of something FSDP2 shards (1/world_size, rounded up); replicated, all of it."""
    return -(-n // run.world_size) if run.fsdp else n


def root_params(model: ModelShape) -> int:
    """FSDP2's root unit, everything outside the decoder layers: embedding [V, H], final norm [H], an untied
    lm_head [V, H]. Gathered whole from the root's forward to its backward (FSDP2 keeps the root unsharded after
    forward), which is when the fused loss reads lm_head."""
    return model.total_params() - model.layers * model.layer_params()


def fsdp_layer_backward(model: ModelShape, run: RunShape) -> int:
    """FSDP2 in a layer's backward: that layer and the next gathered (one layer of backward prefetch), and the
    layer's unsharded gradient until its reduce-scatter."""
    if not run.fsdp:
        return 0
    grad = model.layer_params() if run.lora is None else run.lora.params(model) // model.layers
    return (2 * model.layer_params() + grad) * model.weight_bytes


def grad_timeline(model: ModelShape, run: RunShape, tokens: int, loss: dict[str, dict[str, int]]) -> tuple[int, str]:
    """The largest (activations + loss working set + gradients) point of forward+backward. Returns (bytes, where).

    Points: the loss's forward (all activations saved, its tiles and dW live); the loss's backward (dh, dW and
    their scaled copies); each layer's backward, top to bottom (a layer's saved tensors are freed as its
    gradients appear, so the sum can grow or shrink layer by layer; with checkpointing the layer in flight is
    recomputed first); the end (the embedding's dense [V, H] gradient, added into the tied head's or its own).
    Under FSDP2 a finished layer keeps its 1/world_size gradient shard; the root's gradients stay whole until
    the end of backward.
    """
    p = model.weight_bytes
    per_layer_act = activation_bytes_per_token(model, run, run.attention_row) * tokens
    per_layer_grad = (model.layer_params() if run.lora is None else run.lora.params(model) // model.layers) * p
    head_grad = model.head_params() * p if run.lora is None else 0
    top = top_activation_bytes_per_token(model, run) * tokens + autocast_weight_copies(model, run)
    saved = checkpointed_bytes_per_token(model, run) * tokens if run.checkpointing else per_layer_act
    back_from_host = 0
    if run.checkpointing and run.offload_activations:  # layer inputs wait in host memory; one comes back at a time
        saved, back_from_host = 0, checkpointed_bytes_per_token(model, run) * tokens
    all_saved = top + model.layers * saved
    points = {"loss forward": all_saved + sum(loss["forward"].values()),
              "loss backward": all_saved + sum(loss["backward"].values())}
    transient = (layer_backward_transient(model, run, tokens) + (per_layer_act if run.checkpointing else 0)
                 + back_from_host + fsdp_layer_backward(model, run))
    kept_grad = per_rank(per_layer_grad, run)
    for k in range(model.layers):  # k layers done, the next one in flight
        points[f"backward of layer {model.layers - k} of {model.layers}"] = (
            top + (model.layers - k) * saved + head_grad + k * kept_grad + transient)
    emb = model.head_params() * p if run.lora is None else 0
    points["end of backward (embedding gradient)"] = head_grad + model.layers * kept_grad + emb
    where = max(points, key=points.get)
    return points[where], where


def kv_cache_bytes(model: ModelShape, run: RunShape, dtype_bytes: int) -> int:
    """K and V for every layer and token of a generation batch: 2·L·kv_heads·head_dim per token."""
    tokens = run.generation_batch * (run.prompt_len + run.completion_len)
    return 2 * model.layers * model.kv_heads * model.head_dim * tokens * dtype_bytes
