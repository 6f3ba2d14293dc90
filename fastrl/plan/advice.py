"""Recommendations of `fastrl plan`: settings that make a run fit a budget, each with its predicted peak.

Each lever is tried alone on the run as configured, then the levers are stacked in order of how little they
change the training itself (checkpointing and sleep mode change nothing but speed; a smaller micro-batch with
more accumulation keeps the effective batch; LoRA changes what trains) until the run fits. If even every lever
at once, with one completion per micro-batch, does not fit, the budget cannot be met and the plan says why.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from fastrl.plan.predict import Plan, fmt, predict_shapes
from fastrl.plan.memory import kv_cache_bytes
from fastrl.plan.shapes import LINEAR_NAMES, LoraShape, RunShape

LORA_DEFAULT = LoraShape(r=16, targets=LINEAR_NAMES)


@dataclass
class Option:
    label: str  # what to set, in config terms
    peak: int
    fits: bool


@dataclass
class Advice:
    fits: bool
    single: list[Option] = field(default_factory=list)  # each lever alone
    combined: Option | None = None  # the first stack of levers that fits
    impossible: str | None = None  # why no setting fits

    def as_dict(self) -> dict:
        return {"fits": self.fits, "single": [vars(o) for o in self.single],
                "combined": None if self.combined is None else vars(self.combined), "impossible": self.impossible}


def _levers(plan: Plan, budget: int) -> list[tuple[str, dict]]:
    """(config text, RunShape changes) for each lever that changes something in this run."""
    run, out = plan.run, []
    if run.world_size > 1 and not run.fsdp:
        out.append(("fsdp: full_shard (weights, gradients and AdamW states split across the ranks)", {"fsdp": True}))
    if not run.checkpointing:
        out.append(("gradient_checkpointing: true", {"checkpointing": True}))
    if plan.device == "cuda" and not run.offload_activations:
        out.append(("gradient_checkpointing_offload: true (checkpointed activations in host memory)",
                    {"checkpointing": True, "offload_activations": True}))
    if run.use_vllm and plan.device == "cuda":
        if not run.vllm_sleep or run.vllm_sleep_level != 2:
            out.append(("vllm_enable_sleep_mode: true, vllm_sleep_level: 2",
                        {"vllm_sleep": True, "vllm_sleep_level": 2}))
        full, start = _vllm_floor(plan, budget, run.generation_batch), _vllm_floor(plan, budget, 1)
        if full < run.vllm_utilization:
            out.append((f"vllm_gpu_memory_utilization: {full:.2f} (weights + this batch's KV cache)",
                        {"vllm_utilization": full}))
        elif start > run.vllm_utilization:  # vLLM can not hold its weights and one sequence's KV cache
            out.append((f"vllm_gpu_memory_utilization: {start:.2f} (needed for vLLM to start at all)",
                        {"vllm_utilization": start}))
    if run.has_reference_copy and plan.device == "cuda" and not run.offload_reference:
        out.append(("ref_model_offload: true (reference in host memory between uses)",
                    {"offload_reference": True}))
    if run.micro_batch > 1 and run.token_budget is None:  # a token budget, not b, sizes packed micro-batches
        out.append(("smaller micro-batch", {"micro_batch": 1}))  # refined by _best_micro_batch
    if run.lora is None:
        out.append((f"LoRA: peft: {{r: {LORA_DEFAULT.r}, target_modules: all-linear}}", {"lora": LORA_DEFAULT}))
    return out


def _vllm_floor(plan: Plan, budget: int, sequences: int) -> float:
    """The smallest utilization (a multiple of 0.05) holding vLLM's weights and `sequences` sequences' KV cache."""
    m = plan.model
    dtype_bytes = 2 if plan.run.bf16 else m.weight_bytes  # vLLM's dtype (generation/vllm.py)
    kv = kv_cache_bytes(m, plan.run.replace(generation_batch=sequences), dtype_bytes)
    need = m.total_params() * dtype_bytes + kv
    return min(1.0, round(math.ceil(need / budget / 0.05) * 0.05, 2))


def _stack(run: RunShape, levers: list[tuple[str, dict]]) -> RunShape:
    for _, changes in levers:
        run = run.replace(**changes)
    return run


def _predict(plan: Plan, run: RunShape, budget: int) -> Plan:
    return predict_shapes(plan.model, run, plan.device, budget)


def _best_micro_batch(plan: Plan, run: RunShape, budget: int) -> tuple[RunShape, str]:
    """The largest micro-batch (halving) that fits; accumulation grows so the effective batch stays."""
    b = run.micro_batch
    while b > 1 and not _predict(plan, run.replace(micro_batch=b), budget).fits(budget):
        b = max(1, b // 2)
    factor = plan.run.micro_batch / b
    text = (f"per_device_train_batch_size: {b} (gradient_accumulation_steps × {factor:g}, same effective "
            "batch)")
    return run.replace(micro_batch=b), text


def recommend(plan: Plan, budget: int) -> Advice:
    advice = Advice(fits=plan.fits(budget))
    if advice.fits:
        return advice
    levers = _levers(plan, budget)
    for label, changes in levers:  # each lever alone
        run = plan.run.replace(**changes)
        if "micro_batch" in changes:
            run, label = _best_micro_batch(plan, plan.run, budget)
        p = _predict(plan, run, budget)
        advice.single.append(Option(label, p.peak, p.fits(budget)))
    stacked, used = plan.run, []
    for label, changes in levers:  # stacked in order until the run fits (micro-batch at its floor of 1)
        stacked, used = stacked.replace(**changes), used + [(label, changes)]
        if _predict(plan, stacked, budget).fits(budget):
            break
    else:
        advice.impossible = _why_impossible(plan, stacked, budget)
        return advice
    for lever in reversed(used[:-1]):  # drop levers a later one made unnecessary (offload once LoRA is on)
        fewer = [u for u in used if u is not lever]
        if _predict(plan, _stack(plan.run, fewer), budget).fits(budget):
            used = fewer
    stacked = _stack(plan.run, used)
    labels = [label for label, changes in used if "micro_batch" not in changes]
    if len(labels) < len(used):  # then the largest micro-batch that fits with the other levers
        stacked, label = _best_micro_batch(plan, stacked.replace(micro_batch=plan.run.micro_batch), budget)
        if stacked.micro_batch != plan.run.micro_batch:
            labels.append(label)
    p = _predict(plan, stacked, budget)
    advice.combined = Option(" + ".join(labels), p.peak, p.fits(budget))
    return advice


def _why_impossible(plan: Plan, floor_run: RunShape, budget: int) -> str:
    """floor_run: every lever applied, one completion per micro-batch."""
    floor = _predict(plan, floor_run.replace(micro_batch=1), budget)
    weights = plan.model.total_params() * plan.model.weight_bytes
    if weights > budget:
        return (f"the model's weights alone ({fmt(weights)}) exceed the budget ({fmt(budget)}); "
                "no batch, checkpointing or LoRA setting changes that")
    phase = floor.peak_phase
    part, size = max(phase.parts.items(), key=lambda kv: kv[1])
    return (f"with every lever (checkpointing, sleep, offload, LoRA, one completion per micro-batch) the peak is "
            f"still {fmt(floor.peak)} in '{phase.name}', over {fmt(budget)}; its largest part is {part} "
            f"({fmt(size)})")


def format_advice(advice: Advice, plan: Plan, budget: int) -> str:
    if advice.fits:
        return ""
    lines = ["", "to make it fit:" if advice.single else "no lever applies to this run:"]
    for o in advice.single:
        lines.append(f"  {o.label:<88} peak {fmt(o.peak):>11}  {'fits' if o.fits else 'still over'}")
    if advice.combined is not None:
        lines.append(f"  together: {advice.combined.label}")
        lines.append(f"  {'':<88} peak {fmt(advice.combined.peak):>11}  fits")
    if advice.impossible:
        lines.append(f"no setting fits {fmt(budget)}: {advice.impossible}")
    return "\n".join(lines)
