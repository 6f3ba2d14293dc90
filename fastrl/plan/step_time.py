"""`fastrl plan --predict-time`: a prediction of one GRPO step's time per phase on one H100, from the flops and
bytes each phase moves and the device's peak rates. A prediction, not a measurement: no GPU ran it.

Per phase, time = max(flops / peak matmul rate, bytes / peak memory bandwidth): the roofline at 100% of peak, so
a lower bound (no kernel runs at peak). Generation is the exception: a small model's decode step is bound by
per-step overheads (kernel launches, scheduling), not by reading its weights, so each decode step takes at least a
published vLLM time per output token (below); fastrl's transformers loop launches more per step, not less. Counted per generation batch (one optimizer step at
TRL's default steps_per_generation = gradient_accumulation_steps), with N = completions × completion length rows:

    generation       prefill: 2·P_dec·B·S_prompt flops; each of T decode steps max(weights + KV cache bytes /
                     bandwidth, 2·P_dec·B flops / rate, PUBLISHED_TPOT)
    weight push      vLLM only: the policy's weights copied into vLLM's (read + write, bf16)
    old / reference  no-grad forwards: 2·P_dec flops per token + attention + the forward sweep 2·N·H·V
    policy forward   the same forward with grad
    fused loss       8·N·H·V (DESIGN.md: forward sweep + the gradient sweep's three products)
    backward         2x the decoder forward (activation and weight gradients; LoRA: 1x, the frozen weights get
                     none), + 1x forward recomputed under gradient checkpointing
    optimizer        AdamW: per trainable parameter reads p, g, m, v and writes p, m, v (7 × its bytes)

P_dec = the decoder's linear weights (embedding excluded; the head is in the sweeps). Attention adds
4·S_ctx·heads·head_dim flops per token and layer (QKᵀ and AV, S_ctx the average causal context). Rewards are the
user's functions and are not predicted.
"""
from __future__ import annotations

from dataclasses import dataclass

from fastrl.config import GRPOConfig
from fastrl.plan.shapes import RUN_ONLY_KEYS, ModelShape, RunShape, loaded_dtype, model_shape, run_shape


@dataclass(frozen=True)
class Device:
    name: str
    matmul_bf16: float  # dense tensor-core flop/s
    matmul_tf32: float
    fp32: float  # non-tensor-core fp32 flop/s (torch's default fp32 matmul precision, "highest")
    bandwidth: float  # bytes/s


# NVIDIA H100 SXM5 (80 GB HBM3) datasheet: BF16 tensor core 1,979 TFLOPS and TF32 989 TFLOPS "with sparsity"
# (dense: half), FP32 67 TFLOPS, memory bandwidth 3.35 TB/s.
H100 = Device("H100 SXM5 80GB", matmul_bf16=989.4e12, matmul_tf32=494.7e12, fp32=66.9e12, bandwidth=3.35e12)

# A published vLLM decode time per output token at this model size on an H100: Qwen3-0.6B (28 layers, bf16),
# vLLM 0.19.0, `vllm bench serve` random 512 in / 128 out at 16 requests/s (latency-bound): TPOT 2.39 ms
# (kvcached project, ovg-project/kvcached pull request 331, benchmarks/bench_layout/H100_results.md).
PUBLISHED_TPOT_S = 2.39e-3


@dataclass
class PhaseTime:
    name: str
    flops: float
    bytes: float
    seconds: float
    bound: str  # "compute", "memory" or "per-token overhead (published vLLM TPOT)"


def matmul_rate(device: Device, model: ModelShape, run: RunShape, tf32: bool) -> float:
    if run.bf16 or model.weight_bytes == 2:
        return device.matmul_bf16
    return device.matmul_tf32 if tf32 else device.fp32


def decoder_linear_params(model: ModelShape) -> int:
    """The decoder layers' linear weights: what every token multiplies through (embedding and head excluded)."""
    return model.layers * sum(a * b for a, b in model.linear_shapes().values())


def forward_flops(model: ModelShape, sequences: int, seq_len: int) -> float:
    """One decoder forward over `sequences` causal sequences of seq_len tokens (head excluded)."""
    tokens = sequences * seq_len
    attention = 4 * (seq_len / 2) * model.heads * model.head_dim * model.layers  # per token: QKᵀ and AV
    return tokens * (2 * decoder_linear_params(model) + attention)


def _roofline(name: str, flops: float, nbytes: float, rate: float, bandwidth: float) -> PhaseTime:
    compute, memory = flops / rate, nbytes / bandwidth
    return PhaseTime(name, flops, nbytes, max(compute, memory), "compute" if compute >= memory else "memory")


def predict_step_time(model: ModelShape, run: RunShape, args: GRPOConfig, device: Device = H100) -> list[PhaseTime]:
    """The phases of one generation batch's step on `device` (see the module docstring)."""
    rate, bw = matmul_rate(device, model, run, bool(args.tf32)), device.bandwidth
    act = 2 if (run.bf16 or model.weight_bytes == 2) else 4  # bytes per weight as the matmuls read them
    B, S_p, T = run.generation_batch, run.prompt_len, run.completion_len
    N, H, V = B * T, model.hidden, model.vocab
    weights = model.total_params() * act
    phases = []

    # generation: prefill, then T decode steps, each reading all weights and the KV cache built so far
    kv_per_token = 2 * model.layers * model.kv_heads * model.head_dim * act
    prefill = _roofline("prefill", forward_flops(model, B, S_p) + 2 * B * H * V, weights, rate, bw)
    step_flops = 2 * B * (decoder_linear_params(model) + H * V)
    step_bytes = weights + B * (S_p + T / 2) * kv_per_token
    step = _roofline("decode step", step_flops, step_bytes, rate, bw)
    step_s = max(step.seconds, PUBLISHED_TPOT_S)
    bound = "per-token overhead (published vLLM TPOT)" if step_s > step.seconds else step.bound
    phases.append(PhaseTime("generation", prefill.flops + T * step_flops, prefill.bytes + T * step_bytes,
                            prefill.seconds + T * step_s, bound))
    if run.use_vllm:
        phases.append(_roofline("weight push", 0.0, 2 * model.total_params() * 2, rate, bw))

    seq = S_p + T
    no_grad = forward_flops(model, B, seq) + 2 * N * H * V  # decoder + the forward sweep
    if args.needs_old_logprobs():
        phases.append(_roofline("old logprobs", no_grad, weights, rate, bw))
    if run.beta > 0:
        phases.append(_roofline("reference logprobs", no_grad, weights, rate, bw))
    fwd = forward_flops(model, B, seq)
    phases.append(_roofline("policy forward", fwd, weights, rate, bw))
    phases.append(_roofline("fused loss", 8 * N * H * V, 2 * V * H * act, rate, bw))
    backward = (1 if run.lora is not None else 2) * fwd + (fwd if run.checkpointing else 0)
    phases.append(_roofline("backward", backward, 2 * weights, rate, bw))
    trainable = run.lora.params(model) if run.lora is not None else model.total_params()
    phases.append(_roofline("optimizer", 0.0, 7 * trainable * model.weight_bytes, rate, bw))
    return phases


def predict_time(model_config: dict, run: dict, device: Device = H100) -> list[PhaseTime]:
    """predict_step_time from a config.json dict and a run dict (GRPOConfig fields + optional `peft`)."""
    args = GRPOConfig(**{k: v for k, v in run.items() if k not in RUN_ONLY_KEYS})
    return predict_step_time(model_shape(model_config, loaded_dtype(run)), run_shape(run), args, device)


def format_time(phases: list[PhaseTime], device: Device = H100) -> str:
    total = sum(p.seconds for p in phases)
    lines = [f"predicted step time on one {device.name} (a prediction from peak rates, not a measurement):",
             f"{'phase':<20}{'GFLOP':>12}{'GB moved':>10}{'ms':>10}  bound"]
    for p in phases:
        lines.append(f"{p.name:<20}{p.flops / 1e9:>12,.1f}{p.bytes / 1e9:>10.2f}{1e3 * p.seconds:>10.1f}  {p.bound}")
    lines.append(f"{'total':<20}{'':>22}{1e3 * total:>10.1f}  -> at most {1 / total:.2f} steps/s (rewards not "
                 "included)")
    return "\n".join(lines)
