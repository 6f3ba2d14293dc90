"""`fastrl plan CONFIG.yaml --memory 24GB [--device cuda|cpu] [--nproc N --nnodes M] [--predict-time]`:
will this GRPO run fit, what makes it fit, and how long a step would take on one H100.

Reads the run's YAML (the `fastrl train` schema) and its model's config.json, prints the predicted peak of each
phase (predict.py) and the settings that make the run fit the budget (advice.py); with --predict-time, the
predicted time of each phase of a step on one H100 (step_time.py; without --memory, only that). With
--nproc/--nnodes the memory plan is one rank's of a launch of N processes on each of M nodes (torchrun's
--nproc_per_node/--nnodes), FSDP2-sharded when the config sets `fsdp: full_shard`, replicated otherwise;
the budget is one device's memory.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile

from fastrl.plan.advice import format_advice, recommend
from fastrl.plan.predict import DEVICES, Plan, fmt, predict

_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(i?B?)\s*$", re.IGNORECASE)


def parse_memory(text: str) -> int:
    """'24GB', '24GiB', '24G', '512MB', '1e9' -> bytes. GB and GiB both mean 2^30: a "24 GB" GPU holds 24 GiB."""
    m = _SIZE.match(str(text))
    if not m:
        raise ValueError(f"--memory: expected a size such as 24GB, 80GiB or 512MB, got {text!r}")
    value, unit = float(m.group(1)), m.group(2).upper()
    size = int(value * {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}[unit])
    if size <= 0:
        raise ValueError(f"--memory: must be positive, got {text!r}")
    return size


def format_plan(plan: Plan, budget: int | None = None) -> str:
    lines = []
    if plan.run.world_size > 1:
        placement = "FSDP2 full_shard" if plan.run.fsdp else "replicated"
        lines.append(f"per rank, {plan.run.world_size} processes, {placement}")
    for p in plan.phases:
        mark = "  <- peak" if p is plan.peak_phase else ""
        lines.append(f"{p.name:<34}{fmt(p.total):>12}{mark}")
        for k, v in p.parts.items():
            if v:
                lines.append(f"    {k:<58}{fmt(v):>12}")
        for k, v in p.host.items():
            lines.append(f"    host: {k:<52}{fmt(v):>12}")
    lines.append(f"{'peak':<34}{fmt(plan.peak):>12}  ({plan.peak_phase.name})")
    lines.append(f"{'materializing path (TRL, no kernels)':<34}{fmt(plan.materializing_peak):>12}  "
                 f"(policy phase {fmt(plan.materializing_policy)} with [N,V] fp32 logits, log_softmax and their "
                 "grads)")
    if budget is not None:
        verdict = "fits" if plan.fits(budget) else "does NOT fit"
        lines.append(f"budget {fmt(budget)}: {verdict} ({fmt(budget - plan.peak)} to spare)" if plan.fits(budget)
                     else f"budget {fmt(budget)}: {verdict} (over by {fmt(plan.peak - budget)})")
    lines += [f"note: {n}" for n in plan.notes]
    return "\n".join(lines)


def parse_mean_lengths(text: str | None) -> tuple[float, float] | None:
    """'40,96' -> (40.0, 96.0); None stays None."""
    if text is None:
        return None
    try:
        prompt, completion = (float(x) for x in text.split(","))
    except ValueError:
        raise ValueError(f"--mean-lengths: expected PROMPT,COMPLETION token counts such as 40,96, "
                         f"got {text!r}") from None
    return prompt, completion


# ---------------------------------------------------------------------------------------------- CLI
def load_plan_inputs(path: str) -> tuple[dict, dict]:
    """CONFIG.yaml -> (model config.json dict, run dict). `model` is a folder (or config.json) or "tiny"."""
    raw = load_run_config_for_plan(path)
    model = raw.get("model")
    if not model:
        raise ValueError("model: required (a folder with config.json, or 'tiny')")
    run = {k: v for k, v in raw.items() if k not in ("model", "tiny_model")}
    if model == "tiny":
        return tiny_model_config(raw.get("tiny_model") or {}), run
    if raw.get("tiny_model") is not None:
        raise ValueError("tiny_model: only used with model: tiny")
    config_path = model if model.endswith(".json") else os.path.join(model, "config.json")
    if not os.path.isfile(config_path):
        raise ValueError(f"model: {config_path!r} does not exist (plan reads the model's config.json; "
                         "a hub id must be downloaded to a folder first)")
    with open(config_path) as f:
        return json.load(f), run


def load_run_config_for_plan(path: str) -> dict:
    """The YAML as `fastrl train` reads it (yes/no words, seed defaults), checked for what plan needs."""
    from fastrl.plan.shapes import check_run_keys
    from fastrl.run_config import load_run_config

    raw = load_run_config(path)
    check_run_keys(raw)
    return raw


def tiny_model_config(kwargs: dict) -> dict:
    """The built-in tiny model's config.json, built in a temporary folder from the `tiny_model:` kwargs."""
    from fastrl.tasks.tiny_model import build_tiny_model

    if not isinstance(kwargs, dict):
        raise ValueError(f"tiny_model: expected a mapping, got {kwargs!r}")
    with tempfile.TemporaryDirectory(prefix="fastrl_plan_") as tmp:
        folder = build_tiny_model(os.path.join(tmp, "tiny"), **kwargs)
        with open(os.path.join(folder, "config.json")) as f:
            return json.load(f)


def add_plan_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML run config (the `fastrl train` schema, plus optional `peft`)")
    parser.add_argument("--memory", default=None,
                        help="memory budget, e.g. 24GB (GB = GiB = 2^30 bytes); required unless --predict-time")
    parser.add_argument("--device", choices=DEVICES, default="cuda",
                        help="cuda: the budget is one GPU's memory; cpu: host memory (default: cuda)")
    parser.add_argument("--nproc", type=int, default=1, help="processes per node (torchrun's --nproc_per_node)")
    parser.add_argument("--nnodes", type=int, default=1, help="nodes (torchrun's --nnodes)")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    parser.add_argument("--predict-time", action="store_true",
                        help="also predict each phase's time on one H100 from flops, bytes and peak rates")
    parser.add_argument("--mean-lengths", metavar="PROMPT,COMPLETION",
                        help="padding_free: the expected mean prompt and completion lengths in tokens, which size a "
                             "packed micro-batch (default: max_prompt_length,max_completion_length, the worst case)")


def run_plan(args: argparse.Namespace) -> int:
    if args.memory is None and not args.predict_time:
        raise ValueError("--memory: required (a budget such as 24GB), unless only --predict-time is asked")
    for name in ("nproc", "nnodes"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name}: expected a positive integer, got {getattr(args, name)}")
    model_config, run = load_plan_inputs(args.config)
    times = {}
    if args.predict_time:
        from fastrl.plan.step_time import format_time, predict_time

        phases = predict_time(model_config, run)
        times = {"predicted_step_time_h100": [vars(p) for p in phases]}
        if not args.json:
            print(format_time(phases))
    if args.memory is None:
        if args.json:
            print(json.dumps(times, indent=2))
        return 0
    budget = parse_memory(args.memory)
    plan = predict(model_config, run, args.device, device_memory=budget,
                   mean_lengths=parse_mean_lengths(args.mean_lengths), world_size=args.nproc * args.nnodes)
    advice = recommend(plan, budget)
    if args.json:
        print(json.dumps({"plan": plan.as_dict(), "budget": budget, "fits": plan.fits(budget),
                          "advice": advice.as_dict(), **times}, indent=2))
    else:
        print(format_plan(plan, budget))
        print(format_advice(advice, plan, budget))
    return 0 if plan.fits(budget) else 1


def plan_main(argv: list[str] | None = None) -> int:
    """`fastrl plan CONFIG.yaml --memory 24GB [--device cuda|cpu]`. Exit 0 fits, 1 does not fit, 2 bad input."""
    parser = argparse.ArgumentParser(prog="fastrl plan", description=__doc__.split("\n")[0])
    add_plan_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run_plan(args)
    except ValueError as e:
        print(f"fastrl plan: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(plan_main())
