"""Several processes on one CPU machine (issue 12): step time and rank 0's peak RSS, 1 process against 2.

    python -m fastrl.bench.distributed                           # -> bench/results/distributed.csv
    python -m fastrl.bench.distributed --steps 4 --out /tmp/d.csv   # quick

The demo's run (examples/demo.yaml) for --steps steps at the same global batch (64 completions per step), as
one plain process and under `torchrun --standalone --nproc_per_node 2` (gloo), replicated and with
fsdp=full_shard; one thread per process (with two threads, one process on this shared machine was ~15x
slower per step than with one: oversubscribed cores, not a property of the trainer).
Rows: step time (p20/p50/p80 over the steps after the first two) and rank 0's peak RSS (the trainer's
peak_memory_mb, which includes the model, optimizer, Python and torch themselves). A record of the overhead of
the collectives and of sharding on 2 shared CPU cores, not a speed claim: two ranks share the cores that one
process uses alone. The config of every row records the commit and the load average around the run.

Memory per rank, beside `fastrl plan --nproc`'s prediction: the demo's model is too small for its memory to show
above the torch runtime's, so each placement is also measured at the benchmark size (2 layers, width 256,
vocabulary 32768, 16 completions of 128 tokens per step, beta 0.04) by fastrl.plan.measure_ranks: every rank's
peak RSS above its warmed-up baseline over two whole GRPOTrainer steps, one row per rank, and the plan's per-rank
peak for the same run in the row beside it.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

from fastrl.bench.results import command_line, row, run_facts, write_csv

DEFAULT_OUT = os.path.join("bench", "results", "distributed.csv")
CONFIG = os.path.join("examples", "demo.yaml")
CASES = ((1, "one process"), (2, "replicated"), (2, "fsdp"))
MEMORY_CASES = {"one process": "one_full_beta", "replicated": "replicated_full_beta", "fsdp": "fsdp_full_beta"}
GLOBAL_BATCH = 64


def run_case(nproc: int, placement: str, steps: int, out: str) -> list[dict]:
    """One training run; its metrics.jsonl records, one per step."""
    launch = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                  f"--nproc_per_node={nproc}"]
    args = ["-m", "fastrl.cli", "train", CONFIG, "--max_steps", str(steps), "--output_dir", out,
            "--per_device_train_batch_size", str(GLOBAL_BATCH // nproc), "--save_strategy", "no",
            "--disable_tqdm", "true"] + (["--fsdp", "full_shard"] if placement == "fsdp" else [])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(launch + args, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                   timeout=3600)
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if "step_time" in line]


def memory_rows(case: str, placement: str, commit: str, run: dict) -> list[dict]:
    """Each rank's measured peak above its baseline and the plan's per-rank prediction, for one placement."""
    from fastrl.plan.measure_ranks import compare

    rows = []
    for r in compare(case, timeout=3600):  # an FSDP2 launch passed 900 s at load average ~25 here
        config = {"commit": commit, "memory_case": case, "rank": r["rank"], "per_device_batch": r["per_device_batch"],
                  "completion_len": r["completion_len"], "model": f"L{r['layers']}-H{r['hidden']}-V{r['vocab']}",
                  "plan_peak_phase": r["plan_peak_phase"]}
        common = dict(operation="grpo_train_step_memory", provider=placement, mode="train", x_name="processes",
                      x_value=r["processes"], unit="MiB", config=config, run=run)
        for metric, value in (("rank_peak_rss_above_baseline", r["measured_mib"]),
                              ("plan_predicted_rank_peak", r["predicted_mib"])):
            rows.append(row(**common, metric=metric, values=(value, value, value)))
        print(f"  rank {r['rank']}: peak {r['measured_mib']} MiB above baseline, plan {r['predicted_mib']} MiB "
              f"({r['error_pct']:+.1f}%)")
    return rows


def quantiles(values: list[float]) -> tuple[float, float, float]:
    q = statistics.quantiles(values, n=10, method="inclusive") if len(values) > 1 else values * 9
    return q[1], statistics.median(values), q[7]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", default=DEFAULT_OUT)
    a = parser.parse_args(argv)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    run = run_facts(command_line(argv, "python -m fastrl.bench.distributed"))
    rows = []
    for nproc, placement in CASES:
        load_before = os.getloadavg()[0]
        with tempfile.TemporaryDirectory() as out:
            records = run_case(nproc, placement, a.steps, out)
        timed = [r["step_time"] for r in records[2:]] or [r["step_time"] for r in records]
        config = {"commit": commit, "steps": a.steps, "global_batch": GLOBAL_BATCH, "config": CONFIG,
                  "load_before": round(load_before, 2), "load_after": round(os.getloadavg()[0], 2)}
        common = dict(operation="demo_train_step", provider=placement, mode="train", x_name="processes",
                      x_value=nproc, config=config, run=run)
        rows.append(row(**common, metric="step_time", unit="s", values=quantiles(timed)))
        peak = max(r["peak_memory_mb"] for r in records)
        rows.append(row(**common, metric="rank0_peak_rss", unit="MiB", values=(peak, peak, peak)))
        print(f"{nproc} x {placement}: step {rows[-2]['p50']:.3f} s (median), rank 0 peak RSS {peak:.0f} MiB")
        rows += memory_rows(MEMORY_CASES[placement], placement, commit, run)
    print(write_csv(rows, a.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
