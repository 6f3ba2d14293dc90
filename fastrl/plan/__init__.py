"""`fastrl plan`: predicted peak memory of a GRPO run, phase by phase, and the settings that make it fit.

    shapes.py   what the plan reads from a model's config.json and a run config
    memory.py   the byte formulas of each part of a step
    predict.py  the phases of a step and their peaks (`predict`)
    advice.py   levers that make a run fit a budget
    cli.py      `fastrl plan CONFIG.yaml --memory 24GB [--nproc N --nnodes M]`
    measure.py  measured peaks on CPU to check the formulas against (`python -m fastrl.plan.measure`)
    measure_ranks.py  every rank's measured peak under torchrun, against the per-rank plan
"""
from fastrl.plan.cli import parse_memory, plan_main
from fastrl.plan.predict import Plan, predict

__all__ = ["Plan", "parse_memory", "plan_main", "predict"]
