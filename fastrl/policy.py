"""The policy model: loading it, the fast kernels around it, its final hidden states and its lm_head.

The trainer never asks the model for logits. It runs the decoder (the model without its head) to get the final
hidden states (after the final norm) and hands them with the head's weight to the fused loss.
"""
from __future__ import annotations

import contextlib
import copy
import importlib.util
import logging
import os
from types import SimpleNamespace
from typing import NamedTuple

import torch
from torch.distributed.fsdp import FSDPModule
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from fastrl import packed_attention

log = logging.getLogger(__name__)


def pick_attn_implementation(device_type: str, model_class: type | None = None) -> str | None:
    """flash_attention_2 when flash-attn is installed, the run is on CUDA and the model class supports it; else None:
    transformers' own choice for the class (sdpa where it supports sdpa, eager or the model's own kernels where
    not: GPT-OSS, for one, refuses sdpa)."""
    if (device_type == "cuda" and importlib.util.find_spec("flash_attn") is not None
            and getattr(model_class, "_supports_flash_attn", True)):
        return "flash_attention_2"
    return None


def training_device(use_cpu: bool = False) -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() and not use_cpu else "cpu")


def load_policy(model: str | PreTrainedModel, args, device: torch.device) -> PreTrainedModel:
    """A model id/path (loaded with args.model_init_kwargs) or an already loaded causal LM, moved to `device`."""
    if isinstance(model, str):
        kwargs = dict(args.model_init_kwargs or {})
        kwargs.setdefault("trust_remote_code", args.trust_remote_code)
        attn = pick_attn_implementation(device.type, _causal_lm_class(model, kwargs["trust_remote_code"]))
        if attn is not None:
            kwargs.setdefault("attn_implementation", attn)
        try:
            model = AutoModelForCausalLM.from_pretrained(model, **kwargs)
        except (OSError, ValueError) as e:
            where = "a local folder" if os.path.isdir(model) else "an existing local folder"
            raise ValueError(f"model: {model!r} could not be loaded (is it {where} or a cached model id?): {e}") \
                from None
    elif not isinstance(model, torch.nn.Module) or not hasattr(model, "get_output_embeddings"):
        raise ValueError(f"model: expected a model id/path or a causal LM (PreTrainedModel), got {type(model)}")
    return model.to(device)


def _causal_lm_class(model: str, trust_remote_code: bool) -> type | None:
    """The AutoModelForCausalLM class a model id/path resolves to (None when its config can not be read here)."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    try:
        config = AutoConfig.from_pretrained(model, trust_remote_code=trust_remote_code)
        return MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except (OSError, ValueError, KeyError):
        return None


def load_tokenizer(model_name_or_path: str):
    try:
        tok = AutoTokenizer.from_pretrained(model_name_or_path)
    except (OSError, ValueError) as e:
        raise ValueError(f"processing_class: no tokenizer could be loaded from {model_name_or_path!r}: {e}") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def apply_liger(model: PreTrainedModel) -> None:
    """Liger's Triton kernels for RMSNorm, SwiGLU MLP and RoPE; never its loss (the fused GRPO loss replaces it)."""
    try:
        from liger_kernel.transformers.monkey_patch import _apply_liger_kernel_to_instance
    except ImportError:
        raise ValueError("use_liger_kernel=True needs the liger-kernel package (pip install liger-kernel)") from None
    _apply_liger_kernel_to_instance(model=base_model(model), cross_entropy=False, fused_linear_cross_entropy=False,
                                    rms_norm=True, swiglu=True, rope=True)


def prepare_for_training(model: PreTrainedModel, args, device: torch.device, peft_config=None) -> PreTrainedModel:
    if args.use_liger_kernel:
        if device.type != "cuda":
            raise ValueError("use_liger_kernel=True needs a CUDA device (Liger's kernels are Triton GPU kernels)")
        apply_liger(model)
    if peft_config is not None:
        model = apply_peft(model, peft_config)
    if args.disable_dropout:
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
    if args.gradient_checkpointing:
        kwargs = args.gradient_checkpointing_kwargs or {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2's name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        if peft_config is not None:
            model.enable_input_require_grads()  # reentrant checkpointing needs an input that requires grad
    model.config.use_cache = False
    model.train()
    return model


def apply_peft(model: PreTrainedModel, peft_config) -> torch.nn.Module:
    """The model wrapped by peft. Target modules the model does not have are refused by name, before any work:
    peft itself only refuses a list none of whose names match, and trains the rest silently."""
    from peft import get_peft_model

    if getattr(peft_config, "is_prompt_learning", False):
        raise ValueError(f"peft_config: {type(peft_config).__name__} (prompt learning: virtual tokens or a prefix) is "
                         "not supported: the fused loss reads the decoder's hidden states without the virtual tokens, "
                         "so the prompt encoder would never train; use LoRA or another adapter method")
    targets = getattr(peft_config, "target_modules", None)
    linear = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
    names = {name for name, _ in model.named_modules()}
    if isinstance(targets, (list, tuple, set)):  # a string is a regex or "all-linear": peft checks it below
        missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
        if missing:
            raise ValueError(f"peft_config.target_modules: {missing} match no module of the model; its linear "
                             f"layers are {linear} (or use 'all-linear')")
    try:
        return get_peft_model(model, peft_config)
    except ValueError as e:
        raise ValueError(f"peft_config.target_modules={targets!r} could not be applied to the model ({e}); "
                         f"its linear layers are {linear} (or use 'all-linear')") from None


def is_peft(model: torch.nn.Module) -> bool:
    return hasattr(model, "get_base_model")


def base_model(model: torch.nn.Module) -> PreTrainedModel:
    """The transformers model under a PEFT wrapper (LoRA layers stay injected in it), else the model itself."""
    return model.get_base_model() if is_peft(model) else model


class Head(NamedTuple):
    weight: torch.Tensor  # [V, H], the embedding matrix itself when tied
    bias: torch.Tensor | None  # [V]


def lm_head(model: torch.nn.Module) -> Head:
    """The output projection's weight (and bias). What the model does to its output after the head (scales,
    softcapping) is model_logits.logit_transform's, checked against the model by model_logits.check_fused_logits."""
    inner = base_model(model)
    head = inner.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear) and not hasattr(head, "weight"):
        raise ValueError(f"model: the output embedding {type(head).__name__} is not a linear layer")
    weight = head.base_layer.weight if hasattr(head, "base_layer") else head.weight  # LoRA on lm_head: base only
    if hasattr(head, "lora_A") and len(getattr(head, "lora_A", {})):
        raise ValueError("peft_config: LoRA on lm_head is not supported by the fused loss (target other modules)")
    return Head(weight, getattr(head, "bias", None))


def completion_hidden(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      prompt_width: int) -> torch.Tensor:
    """Final hidden states at the positions that predict each completion token.

    input_ids [B, P + T] = left-padded prompts (width P) then right-padded completions (width T).
    Returns [B, T, H]: positions P-1 .. P+T-2. Position ids count only real tokens, as in generation.
    """
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # [B, P+T]
    hidden = final_hidden(model, input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)
    t = input_ids.shape[1] - prompt_width
    return hidden[:, prompt_width - 1: prompt_width - 1 + t]  # [B, T, H]


def packed_completion_hidden(model: torch.nn.Module, packed) -> torch.Tensor:
    """Final hidden states [N, H] predicting each completion row of a PackedBatch, padding-free.

    The decoder reads all sequences as one row [1, S] with no attention mask; each attention keeps them apart:
    flash_attention_2 by varlen cu_seqlens and flex_attention by a document BlockMask (transformers finds the
    sequences from the position ids restarting at 0), sdpa per sequence once packed_attention_problem has
    switched it to fastrl.packed_attention (no [S, S] mask), eager by transformers' dense block-diagonal mask.
    """
    with packed_attention.packed_spans(packed.cu_seqlens):
        hidden = final_hidden(model, input_ids=packed.input_ids[None], position_ids=packed.position_ids[None])
    return hidden[0, packed.predict_index]  # [S, H] -> [N, H]


def final_hidden(model: torch.nn.Module, **inputs) -> torch.Tensor:
    """The decoder's final (normed) hidden states [B, S, H], no cache. A model sharded with FSDP2 runs through its
    root instead, whose forward gathers the root's parameters (lm_head among them) and keeps them gathered until
    its backward; its hidden_states[-1] is the normed last hidden state, and logits_to_keep=1 makes its logits
    [B, 1, V]."""
    if isinstance(model, FSDPModule):
        return model(**inputs, use_cache=False, logits_to_keep=1, output_hidden_states=True).hidden_states[-1]
    return base_model(model).get_decoder()(**inputs, use_cache=False).last_hidden_state


def packed_attention_problem(model: torch.nn.Module) -> str | None:
    """Why the decoder can not take packed sequences (packed_completion_hidden), or None. An sdpa model is first
    switched to attention per sequence (fastrl.packed_attention); a family whose layers handle the mask themselves
    (and so fail on it) goes back to sdpa with transformers' dense [S, S] mask. Either way the pack is then checked
    (_packed_mismatch), and its answer decides."""
    inner = base_model(model)
    if packed_attention.install(inner):
        problem = _packed_mismatch(inner)
        if problem is None:
            return None
        packed_attention.uninstall(inner)
        if _packed_mismatch(inner) is None:
            log.info("padding_free: %s packs with sdpa's dense [S, S] mask: attention per sequence fails (%s)",
                     type(inner).__name__, problem)
            return None
    return _packed_mismatch(inner)


def _packed_mismatch(inner: PreTrainedModel) -> str | None:
    """Checked once on two short sequences: the second one's hidden states packed behind the first must equal its
    own, else a model whose attention ignores the sequences' boundaries would silently attend across them."""
    device = next(inner.parameters()).device
    ids = torch.arange(7, device=device) % inner.config.vocab_size  # [7]: sequences of 3 and 4 tokens
    pos = torch.tensor([0, 1, 2, 0, 1, 2, 3], device=device)
    was_training = inner.training
    inner.eval()  # no dropout
    try:
        with torch.no_grad():
            packed = packed_completion_hidden(inner, SimpleNamespace(
                input_ids=ids, position_ids=pos, cu_seqlens=torch.tensor([0, 3, 7]), predict_index=torch.arange(3, 7)))
            alone = packed_completion_hidden(inner, SimpleNamespace(
                input_ids=ids[3:], position_ids=pos[3:], cu_seqlens=torch.tensor([0, 4]), predict_index=torch.arange(4)))
    except Exception as e:  # noqa: BLE001 - a decoder that can not run a packed row at all is the same answer
        return f"its decoder fails on a packed row ({type(e).__name__}: {str(e).splitlines()[0][:120]})"
    finally:
        inner.train(was_training)
    scale = float(alone.float().abs().max()) + 1e-6
    tol = 1e-4 if alone.dtype == torch.float32 else 3e-2
    if float((packed.float() - alone.float()).abs().max()) > tol * scale:
        return (f"its attention (attn_implementation={inner.config._attn_implementation!r}) mixes packed "
                "sequences")
    return None


def use_padding_free(model: torch.nn.Module, padding_free: bool | None, required_by: str | None = None) -> bool:
    """GRPOConfig.padding_free resolved for this model: False stays False; True (or `required_by`, a setting that
    needs packing) requires packed_attention_problem to find none, else a ValueError; None packs when it finds
    none and otherwise trains padded, saying so in one log line (many families' attention can not pack)."""
    if padding_free is False:
        return False
    problem = packed_attention_problem(model)
    if problem is None:
        return True
    name = type(base_model(model)).__name__
    if padding_free or required_by:
        raise ValueError(f"{'padding_free=True' if padding_free else required_by}: {name} can not run packed "
                         f"sequences: {problem}; use an sdpa, eager, flex_attention or flash_attention_2 model, or "
                         "padding_free=False")
    log.info("padding_free: %s trains on padded batches: %s", name, problem)
    return False


def frozen_reference(model: torch.nn.Module, device: torch.device | str | None = None) -> torch.nn.Module:
    """A frozen copy of the policy's initial weights (built for full fine-tuning with beta > 0; a PEFT policy with
    its adapter disabled is its own reference), its tensors copied one by one straight to `device`
    (default: where they are), so a reference kept in host memory never exists on the accelerator at all."""
    inner = base_model(model)
    memo = {}  # deepcopy takes these copies instead of copying the tensors itself; tied weights stay tied
    for p in inner.parameters():
        memo[id(p)] = torch.nn.Parameter(p.detach().to(device or p.device, copy=True), requires_grad=False)
    for b in inner.buffers():
        memo[id(b)] = b.detach().to(device or b.device, copy=True)
    ref = copy.deepcopy(inner, memo)
    ref.requires_grad_(False)
    ref.eval()
    return ref


@contextlib.contextmanager
def reference_on(ref: torch.nn.Module, device: torch.device, offload: bool):
    """With `offload` (ref_model_offload), the reference is moved to `device` for the block and back to host
    memory after it; without, nothing moves. On a CPU run both are the same. An FSDP2-sharded reference is never
    moved here: FSDP2 itself copies its host shards layer by layer (distributed.shard)."""
    if not offload or isinstance(ref, FSDPModule):
        yield ref
        return
    ref.to(device)
    try:
        yield ref
    finally:
        ref.to("cpu")


@contextlib.contextmanager
def activations_offloaded(enabled: bool, device: torch.device):
    """gradient_checkpointing_offload: tensors autograd saves in the block go to host memory (pinned on CUDA) and
    come back in backward. Around the checkpointed decoder these are each layer's input and the few tensors saved
    outside the layers; the activations inside a layer are recomputed, not saved. On CPU it moves nothing."""
    if not enabled:
        yield
        return
    with torch.autograd.graph.save_on_cpu(pin_memory=device.type == "cuda"):
        yield
