"""Per-phase peak memory of a GRPO step, predicted from a model's config.json and the run's batch and lengths.

    generation        transformers (KV cache) or colocated vLLM (its share of the GPU, sleeping or not)
    weight push       vLLM only: its weights awake, the policy's streamed one parameter at a time
    logprob passes    reference (beta > 0) and old logprobs: no-grad forwards through the fused logprob kernel
    policy fwd + bwd  weights, saved activations (with/without gradient checkpointing), the fused loss's
                      dh [N, H] and dW [V, H] fp32 and its bounded tiles, gradients as backward produces them
    optimizer step    AdamW: two states per trainable parameter, in the parameter's dtype (torch's rule)

Every phase also holds what lives across the whole run: the policy's weights, a frozen reference copy (full
fine-tuning with beta > 0; none with LoRA, whose reference is the same model with the adapter disabled) and the
optimizer states. The formulas are in memory.py; `python -m fastrl.plan.measure` checks them against peak RSS
measured on CPU (bench/results/plan_validation.csv).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from fastrl.kernels.forward_sweep import sweep_tile_elements
from fastrl.plan.memory import (BF16, CUDA_CONTEXT_BYTES, FP32, Phase, checkpointed_bytes_per_token, fused_loss_bytes,
                                grad_timeline, kv_cache_bytes, materializing_loss_bytes, per_rank, root_params,
                                trainable_params)
from fastrl.plan.shapes import ModelShape, RunShape, loaded_dtype, model_shape, run_shape

DEVICES = ("cpu", "cuda")


@dataclass
class Plan:
    device: str
    model: ModelShape
    run: RunShape
    phases: list[Phase]
    materializing_policy: int  # the policy phase if the loss materialized [N, V] logits (TRL without kernels)
    notes: list[str] = field(default_factory=list)

    @property
    def materializing_peak(self) -> int:
        """The run's peak with the materializing loss: its policy phase grows, the other phases stay."""
        return max([p.total for p in self.phases if p.name != "policy forward+backward"]
                   + [self.materializing_policy])

    @property
    def peak_phase(self) -> Phase:
        return max(self.phases, key=lambda p: p.total)

    @property
    def peak(self) -> int:
        return self.peak_phase.total

    def phase(self, name: str) -> Phase:
        for p in self.phases:
            if p.name == name:
                return p
        raise KeyError(f"no phase {name!r}; phases are {[p.name for p in self.phases]}")

    def fits(self, budget: int) -> bool:
        return self.peak <= budget

    def as_dict(self) -> dict:
        return {"device": self.device, "world_size": self.run.world_size, "fsdp": self.run.fsdp, "peak": self.peak,
                "peak_phase": self.peak_phase.name,
                "materializing_peak": self.materializing_peak, "materializing_policy": self.materializing_policy,
                "phases": {p.name: {"total": p.total, "parts": p.parts, "host": p.host} for p in self.phases}}


# ---------------------------------------------------------------------------------------------- prediction
def predict(model_config: dict, run: dict, device: str = "cpu", device_memory: int | None = None,
            mean_lengths: tuple[float, float] | None = None, world_size: int = 1) -> Plan:
    """Per-phase peak bytes of a GRPO run, on one rank of a world_size-process launch. model_config: a
    transformers config.json as a dict; run: GRPOConfig fields (TRL's names; `fsdp` shards) plus an optional
    `peft` dict (r, lora_alpha, target_modules). device_memory: the accelerator's total bytes, needed to size
    vLLM's share (vllm_gpu_memory_utilization × total). mean_lengths: expected mean (prompt, completion) tokens
    of a padding-free run (None: the maxima)."""
    if device not in DEVICES:
        raise ValueError(f"device: expected one of {DEVICES}, got {device!r}")
    return predict_shapes(model_shape(model_config, loaded_dtype(run)), run_shape(run, mean_lengths, world_size),
                          device, device_memory)


def predict_shapes(model: ModelShape, run: RunShape, device: str, device_memory: int | None = None) -> Plan:
    if run.use_vllm and device == "cuda" and not device_memory:
        raise ValueError("device_memory: use_vllm on cuda needs the GPU's total memory "
                         "(vLLM takes vllm_gpu_memory_utilization × total)")
    if device == "cpu":  # offloading to host memory moves nothing on a CPU run
        run = run.replace(offload_activations=False)
    resident, host = resident_parts(model, run, device, device_memory)
    phases = [generation_phase(model, run, device, device_memory, resident)]
    if run.use_vllm:
        phases.append(weight_push_phase(model, run, device, device_memory, resident))
    if run.beta > 0 or run.use_vllm:
        phases.append(logprob_phase(model, run, device, resident))
    policy = policy_phase(model, run, resident, fused_loss_bytes)
    if run.world_size > 1 and not run.fsdp:
        phases.append(gradient_average_phase(model, run, resident))
    if run.checkpointing and run.offload_activations:
        policy.host["checkpointed activations (offloaded)"] = (
            model.layers * checkpointed_bytes_per_token(model, run) * run.micro_tokens)
    phases += [policy, optimizer_phase(model, run, resident)]
    for p in phases:
        if device == "cuda":
            p.parts["CUDA context (typical, not measured)"] = CUDA_CONTEXT_BYTES
        awake = p.name in ("generation", "weight push")  # vLLM's weights are on the device then
        p.host.update({k: v for k, v in host.items() if not (awake and "vLLM" in k)})
    # the same run if the loss materialized the logits: its policy phase grows, the other phases stay
    materializing = policy_phase(model, run, resident, materializing_loss_bytes).total + (
        CUDA_CONTEXT_BYTES if device == "cuda" else 0)
    return Plan(device, model, run, phases, materializing, notes(model, run, device, device_memory))


# fastrl/generation/vllm.py: on CPU the KV cache is kv_cache_memory_bytes, 64 MiB unless the caller passes more.
CPU_VLLM_KV_CACHE_BYTES = 64 << 20


def _vllm_weights(model: ModelShape, run: RunShape) -> int:
    """vLLM samples in bf16 when the run is bf16, else in the policy's dtype (generation/vllm.py, _vllm_dtype)."""
    return model.total_params() * (BF16 if run.bf16 else model.weight_bytes)


def resident_parts(model: ModelShape, run: RunShape, device: str, device_memory) -> tuple[dict, dict]:
    """What every phase holds on the device (and, on a GPU run, in host memory) across the whole step. Under
    FSDP2 weights, reference and AdamW states are this rank's 1/world_size shards."""
    p = model.weight_bytes
    parts = {"policy weights": per_rank(model.total_params() * p, run)}
    if run.lora is not None:
        parts["LoRA adapters"] = per_rank(run.lora.params(model) * p, run)
    host = {}
    if run.has_reference_copy:
        if run.offload_reference and device == "cuda":
            host["reference copy (offloaded)"] = per_rank(model.total_params() * p, run)
        else:
            parts["reference copy"] = per_rank(model.total_params() * p, run)
    # FSDP2: the reference's root is gathered only during its own pass, which reshards it after (the trainer's
    # distributed.reshard): counted there by fsdp_gathered, as the root in flight, not in every phase
    parts["AdamW states (2 per trainable param)"] = per_rank(2 * trainable_params(model, run) * p, run)
    if run.use_vllm and device == "cpu":  # no sleep mode on CPU: the generator keeps weights and KV cache
        parts["vLLM weights"] = _vllm_weights(model, run)
        parts["vLLM KV cache (kv_cache_memory_bytes)"] = CPU_VLLM_KV_CACHE_BYTES
    elif run.use_vllm and not run.vllm_sleep:  # awake all the time: its whole share stays allocated
        parts["vLLM pool (no sleep mode)"] = int(run.vllm_utilization * device_memory)
    elif run.use_vllm and run.vllm_sleep_level == 1:  # level 1 keeps the weights in host memory while asleep
        host["vLLM weights (asleep, level 1)"] = _vllm_weights(model, run)
    return parts, host


def generation_phase(model, run, device, device_memory, resident) -> Phase:
    phase = Phase("generation", dict(resident))
    if run.use_vllm and device == "cuda":
        if run.vllm_sleep:  # awake for generation: its share of the GPU, weights + KV cache
            phase.parts["vLLM pool (utilization × total)"] = int(run.vllm_utilization * device_memory)
        return phase
    if run.use_vllm:
        return phase  # CPU vLLM is counted in the resident parts
    phase.parts.update(fsdp_gathered(model, run, layers=1))  # model.generate through the sharded policy
    a = BF16 if (run.bf16 or model.weight_bytes == BF16) else FP32
    phase.parts["KV cache (generation batch)"] = kv_cache_bytes(model, run, a)
    prompt_tokens = run.generation_batch * run.prompt_len
    # prefill: one layer's no-grad intermediates (gate, up, silu, q, k, v, attention out) and its mask
    phase.parts["prefill working set (one layer)"] = prompt_tokens * (3 * model.intermediate + 4 * model.hidden
                                                                      + run.prompt_len) * a
    # fastrl/generation/decode.py keeps no per-step scores: at a step, the model's last-position logits, their
    # fp32 copy, the processed scores, a warper's temporary and the cumulative probabilities the token is drawn
    # from are alive at most, each [B_gen, V] fp32.
    phase.parts["sampling step: 5×[B_gen,V] fp32"] = 5 * run.generation_batch * model.vocab * FP32
    return phase


def weight_push_phase(model, run, device, device_memory, resident) -> Phase:
    """vLLM awake with its weights (woken from host at level 1, re-allocated at level 2) while the policy's
    parameters stream in one at a time."""
    phase = Phase("weight push", dict(resident))
    if device == "cuda" and run.vllm_sleep:
        phase.parts["vLLM weights (awake)"] = _vllm_weights(model, run)
    phase.parts["one parameter in flight"] = model.largest_param() * model.weight_bytes
    phase.parts.update(fsdp_gathered(model, run, layers=1, root=False))  # the shards gathered layer by layer
    return phase


def fsdp_gathered(model: ModelShape, run: RunShape, layers: int, root: bool = True) -> dict[str, int]:
    """FSDP2's whole parameters on a rank at a phase's peak: the policy's root (gathered from its first forward of
    the step until its backward) and `layers` decoder layers. Nothing without fsdp."""
    out = {}
    if run.fsdp and root:
        out["FSDP: policy root gathered (embedding, norm, lm_head)"] = root_params(model) * model.weight_bytes
    if run.fsdp and layers:
        out["FSDP: one gathered decoder layer"] = layers * model.layer_params() * model.weight_bytes
    return out


def logprob_phase(model, run, device, resident) -> Phase:
    """No-grad forwards of one micro-batch (reference, and old logprobs when the batch is reused)."""
    phase = Phase("logprob passes (reference/old)", dict(resident))
    if run.has_reference_copy and run.offload_reference and device == "cuda":
        phase.parts["reference copy (brought back)"] = model.total_params() * model.weight_bytes
    tokens, n_rows = run.micro_tokens, run.micro_rows
    a = BF16 if (run.bf16 or model.weight_bytes == BF16) else FP32
    phase.parts["forward working set (one layer)"] = tokens * (3 * model.intermediate + 4 * model.hidden
                                                               + run.attention_row) * a
    phase.parts["hidden states [S,H]"] = tokens * model.hidden * FP32
    phase.parts["logprob tiles fp32"] = sweep_tile_elements(n_rows, model.vocab) * FP32
    phase.parts.update(fsdp_gathered(model, run, layers=1))
    return phase


def policy_phase(model, run, resident, loss_parts) -> Phase:
    phase = Phase("policy forward+backward", dict(resident))
    tokens, n_rows = run.micro_tokens, run.micro_rows
    loss = loss_parts(model, run, n_rows, tokens)
    live, where = grad_timeline(model, run, tokens, loss)
    phase.parts[f"activations + gradients ({where})"] = live
    phase.parts.update(fsdp_gathered(model, run, layers=0))  # the layers' own gathering is in the timeline
    return phase


def optimizer_phase(model, run, resident) -> Phase:
    """AdamW's step: all gradients live; torch's CPU loop makes two temporaries the size of the largest
    trainable parameter (sqrt of the second moment, then its scaled copy). FSDP2: the shards of both."""
    phase = Phase("optimizer step", dict(resident))
    p = model.weight_bytes
    phase.parts["gradients"] = per_rank(trainable_params(model, run) * p, run)
    largest = model.largest_param() if run.lora is None else max(
        run.lora.r * sum(model.linear_shapes()[n]) for n in run.lora.targets)
    phase.parts["AdamW temporaries (2 × largest param)"] = 2 * per_rank(largest * p, run)
    return phase


def gradient_average_phase(model, run, resident) -> Phase:
    """Replicated ranks: every gradient and one fp32 bucket of them at a time, all-reduced in place
    (fastrl.distributed.average_gradients: ddp_bucket_cap_mb, or DDP's 25 MiB; a larger parameter is a bucket
    of its own); 16-bit gradients are then cast back."""
    phase = Phase("gradient all-reduce (replicated)", dict(resident))
    n = trainable_params(model, run)
    largest = model.largest_param() if run.lora is None else 0  # LoRA's factors are far below a bucket
    phase.parts["gradients"] = n * model.weight_bytes
    phase.parts["fp32 all-reduce bucket"] = min(n * FP32, max(run.bucket_bytes, largest * FP32))
    return phase


def notes(model, run, device, device_memory) -> list[str]:
    out = []
    if run.world_size > 1:
        out.append(f"one rank of {run.world_size}: " + (
            "FSDP2 shards weights, reference, gradients and AdamW states 1/world_size per rank; the root (embedding, "
            "norm, lm_head) and the layer in flight are gathered whole" if run.fsdp else
            "each rank holds a whole replica; gradients are averaged by fp32 all-reduces, one bucket at a time")
            + f"; each rank generates {run.generation_batch} completions and trains on micro-batches of "
              f"{run.micro_batch}")
    if run.use_vllm and device == "cuda":
        share = run.vllm_utilization * device_memory
        need = _vllm_weights(model, run)
        kv = kv_cache_bytes(model, run, BF16 if run.bf16 else model.weight_bytes)
        if share < need:
            out.append(f"vLLM's share ({fmt(share)}) is smaller than its weights ({fmt(need)}): it will not start")
        elif share < need + kv:
            out.append(f"vLLM's KV cache ({fmt(share - need)}) holds less than the generation batch needs "
                       f"({fmt(kv)}): it will queue requests (slower, not out of memory)")
    if device == "cpu" and run.use_vllm:
        out.append("vLLM on CPU has no sleep mode: its weights and KV cache stay allocated (not validated here)")
    if run.padding_free:
        out.append(f"padding_free: a micro-batch is {run.micro_tokens} tokens ({run.micro_rows} completion rows)"
                   + ("" if run.mean_completion_len is not None else
                      ", every sequence at its maximum length (--mean-lengths gives the expected means)"))
    return out


def fmt(n: float) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"
