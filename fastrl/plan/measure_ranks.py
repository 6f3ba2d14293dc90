"""Measured per-rank peak memory of whole GRPOTrainer steps under torchrun on CPU, to check `fastrl plan --nproc`.

Each case is one `torchrun --standalone --nproc_per_node N` launch (gloo) with MALLOC_MMAP_THRESHOLD_=65536 and one
thread per rank. Every rank trains one step of the case's run on a throw-away tiny model first (process group,
FSDP2 and kernel code paths warmed up), resets the kernel's high-water mark, records its RSS as the baseline, then
trains two steps of the case (generation, rewards, reference, fused loss, the gradient all-reduce or FSDP2's
collectives, AdamW). Peak = VmHWM − baseline, per rank. Predicted = `fastrl.plan.predict(..., world_size=N).peak`,
the same for every rank.

    python -m fastrl.plan.measure_ranks --csv bench/results/plan_ranks.csv      # every case, a few minutes
    python -m fastrl.plan.measure_ranks --case fsdp_full_beta                   # one case, printed
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from fastrl.peak_rss import reset_peak_rss, status_kib
from fastrl.plan.measure import BASE_RUN, LORA_ALL, TINY_BENCH, _mib, _train

# name -> (tiny model kwargs, run overrides, processes). The benchmark's tiny model (its [V, H] embedding, tied,
# is most of it: the root FSDP2 gathers whole), and a model whose decoder layers hold most of the weights.
LAYERS = {"hidden_size": 512, "vocab_size": 4096, "num_layers": 4, "head_dim": 64}
TRAINER_RUN = {"per_device_train_batch_size": 8, "num_generations": 8, "beta": 0.04, "max_prompt_length": 12,
               "max_completion_length": 128, "gradient_checkpointing": False}
CASES = {
    "one_full_beta": (TINY_BENCH, {**TRAINER_RUN, "per_device_train_batch_size": 16}, 1),  # the 2-rank batch
    "replicated_full_beta": (TINY_BENCH, TRAINER_RUN, 2),
    "fsdp_full_beta": (TINY_BENCH, {**TRAINER_RUN, "fsdp": "full_shard"}, 2),
    "fsdp_full_beta_t64": (TINY_BENCH, {**TRAINER_RUN, "fsdp": "full_shard", "max_completion_length": 64}, 2),
    "fsdp_lora_beta": (TINY_BENCH, {**TRAINER_RUN, "fsdp": "full_shard", "peft": LORA_ALL}, 2),
    "fsdp_layers_full": (LAYERS, {**TRAINER_RUN, "beta": 0.0, "fsdp": "full_shard"}, 2),
    "replicated_layers_full": (LAYERS, {**TRAINER_RUN, "beta": 0.0}, 2),
}


def case_run(name: str) -> tuple[dict, dict, int]:
    """A case name, or a JSON list [tiny model kwargs, run overrides, processes] (tests pass their own cases)."""
    if name.startswith("["):
        tiny, run, nproc = json.loads(name)
    elif name in CASES:
        tiny, run, nproc = CASES[name]
    else:
        raise ValueError(f"case {name!r}: known cases are {sorted(CASES)}")
    return tiny, {**BASE_RUN, **run}, nproc


# ------------------------------------------------------------------------------------------- one rank
def rank_child(name: str, out: str) -> dict:
    """Runs on every rank of the launch: warm-up step, baseline, two measured steps."""
    import gc

    import torch

    from fastrl.tasks.tiny_model import build_tiny_model

    torch.set_num_threads(1)
    tiny, run, _ = case_run(name)
    rank = int(os.environ["RANK"])
    models = os.path.join(out, "models")
    warm = build_tiny_model(os.path.join(models, f"warm-{rank}"))  # each rank its own folder: no write race
    path = build_tiny_model(os.path.join(models, f"case-{rank}"), **tiny)
    _train(warm, {**run, "max_completion_length": 8}, steps=1, output_dir=os.path.join(out, "warm"))
    gc.collect()
    reset_peak_rss()
    baseline = status_kib("VmRSS") * 1024
    t0 = time.perf_counter()
    _train(path, run, steps=2, output_dir=os.path.join(out, "run"))
    return {"case": name, "rank": rank, "baseline": baseline, "peak": status_kib("VmHWM") * 1024 - baseline,
            "seconds": time.perf_counter() - t0}


# ------------------------------------------------------------------------------------------- the parent
def measure(name: str, timeout: float = 900) -> list[dict]:
    """One torchrun launch of the case; every rank's measured peak (bytes above its baseline), rank order."""
    _, _, nproc = case_run(name)
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false", "TRANSFORMERS_VERBOSITY": "error"}
    with tempfile.TemporaryDirectory(prefix="fastrl_plan_ranks_") as out:
        launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                  "-m", "fastrl.plan.measure_ranks", "--child", name, "--out", out]
        proc = subprocess.Popen(launch, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        finally:
            if proc.poll() is None:  # the launcher and its ranks: nothing left behind
                os.killpg(proc.pid, 9)
                proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"measuring {name!r} failed:\n{stderr[-3000:]}")
    ranks = [json.loads(line) for line in stdout.splitlines() if line.startswith('{"case"')]
    if sorted(r["rank"] for r in ranks) != list(range(nproc)):
        raise RuntimeError(f"measuring {name!r}: expected one result per rank, got {stdout[-2000:]}")
    return sorted(ranks, key=lambda r: r["rank"])


def predicted(name: str):
    from fastrl.plan.cli import tiny_model_config
    from fastrl.plan.predict import predict

    tiny, run, nproc = case_run(name)
    return predict(tiny_model_config(tiny), run, device="cpu", world_size=nproc)


def compare(name: str, timeout: float = 900) -> list[dict]:
    """One row per rank: the plan's per-rank peak beside the rank's measured one."""
    plan, (tiny, run, nproc) = predicted(name), case_run(name)
    return [{"case": name, "processes": nproc, "placement": "fsdp" if run.get("fsdp") else "replicated",
             "rank": m["rank"], "layers": tiny["num_layers"], "hidden": tiny["hidden_size"],
             "vocab": tiny["vocab_size"], "per_device_batch": run["per_device_train_batch_size"],
             "completion_len": run["max_completion_length"], "beta": run["beta"],
             "lora": json.dumps(run["peft"]) if run.get("peft") else "",
             "predicted_mib": _mib(plan.peak), "measured_mib": _mib(m["peak"]),
             "error_pct": round(100 * (plan.peak - m["peak"]) / m["peak"], 1), "plan_peak_phase": plan.peak_phase.name,
             "seconds": round(m["seconds"], 1)} for m in measure(name, timeout)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="measured vs predicted per-rank peak memory under torchrun, CPU")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--case", action="append", help=f"one of {sorted(CASES)} (default: all)")
    parser.add_argument("--csv", help="write the comparison to this CSV file")
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(rank_child(args.child, args.out)), flush=True)
        return 0
    rows = []
    for name in args.case or list(CASES):
        for r in compare(name):
            rows.append(r)
            print(json.dumps(r), flush=True)
    if args.csv:
        from fastrl.plan.measure import write_csv

        write_csv(args.csv, rows, "fastrl.plan.measure_ranks", args.case)
    return 0


if __name__ == "__main__":
    sys.exit(main())
