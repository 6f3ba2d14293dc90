"""Issue 6's memory benchmark: peak memory of two GRPO steps, fastrl's GRPOTrainer against TRL's, full fine-tuning
and LoRA, and the longest completions each fits under a fixed memory limit. CPU, one fresh process per run.

    python -m fastrl.bench.memory              # everything (~12 min on 2 cores) -> bench/results/memory.csv + .png
    python -m fastrl.bench.memory --no-limit   # only the four peak-memory runs (~4 min)
    python -m fastrl.bench.memory --limit-mib 3072 --lengths 256,512,1024,2048

The run (both trainers, one import apart, fastrl.bench.e2e.trainer_module): a random-init Llama (fastrl.tasks
.tiny_model: 2 layers, hidden 256, head_dim 64, vocabulary 32768, tied embeddings, fp32), 2 prompts × 8
completions = 16 completions of up to 256 tokens per step, one micro-batch, beta 0.04, two optimizer steps,
transformers generation, each trainer's defaults otherwise (gradient checkpointing on in both); LoRA: r 8, alpha
16, all linear layers of the decoder. A random model samples eos with probability ~1/32768 per token, so
completions run to max_completion_length (the mean length is recorded per run).

Memory: the child sets nothing itself; the parent starts it with MALLOC_MMAP_THRESHOLD_=65536 (freed tensors go
back to the OS, so RSS follows live memory) and one thread. Peak = VmHWM during train() − VmRSS once the
trainer is built (policy, reference copy when there is one, tokenizer, data): what training adds above the model.

Memory limit: the child builds the trainer, then sets RLIMIT_AS (`ulimit -v`) to its current address space plus
the limit, and trains; a run that fails to allocate does not fit. The longest length that fits is found by binary
search over the candidate lengths (memory grows with the length).

Runs of the two trainers go two at a time (separate processes; RSS is per process), so the seconds recorded are
those of a shared machine, not a timing benchmark (see fastrl.bench.e2e for steps/s).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time

from fastrl.peak_rss import reset_peak_rss, status_kib

MODEL = dict(num_layers=2, hidden_size=256, head_dim=64, vocab_size=32768, seed=0)
RUN = dict(per_device_train_batch_size=16, num_generations=8, max_completion_length=256, beta=0.04, max_steps=2,
           learning_rate=1e-5, loss_type="dapo", seed=0)
LORA = dict(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                "down_proj"])
TRAINERS = ("fastrl", "trl")
MODES = ("full", "lora")
ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
       "TRANSFORMERS_VERBOSITY": "error"}
DEFAULT_LIMIT_MIB = 2048
DEFAULT_LENGTHS = (64, 128, 256, 512, 1024, 2048)
OOM_WORDS = ("alloc", "memory", "MemoryError", "bad_alloc", "Resource temporarily unavailable")


def model_dir(root: str | None = None) -> str:
    from .e2e import model_cache_dir

    from fastrl.tasks.tiny_model import build_tiny_model

    name = "llama-L{num_layers}-H{hidden_size}-V{vocab_size}-s{seed}".format(**MODEL)
    return build_tiny_model(os.path.join(root or model_cache_dir(), name), **MODEL)


# ------------------------------------------------------------------------------------------- the child
def prompts() -> list[dict]:
    return [{"prompt": f"{a}+{b}="} for a in range(10) for b in range(10)]


def lengths_reward(completions=None, completion_ids=None, **kwargs):
    """A cheap reward with some spread (so advantages are not all zero)."""
    return [float(len(set(ids)) % 3) / 2 for ids in completion_ids]


def child(job: dict) -> dict:
    import resource

    import torch
    from datasets import Dataset

    from .e2e import trainer_module

    torch.set_num_threads(1)
    module = trainer_module(job["trainer"])
    peft_config = None
    if job["mode"] == "lora":
        from peft import LoraConfig

        peft_config = LoraConfig(task_type="CAUSAL_LM", **LORA)
    lengths = []

    def reward(completions=None, completion_ids=None, **kwargs):
        lengths.extend(len(c) for c in completion_ids)
        return lengths_reward(completions=completions, completion_ids=completion_ids)

    with tempfile.TemporaryDirectory(prefix="fastrl-bench-memory-") as out:
        args = module.GRPOConfig(output_dir=out, **{**RUN, "max_completion_length": job["length"]}, logging_steps=1,
                                 use_cpu=True, bf16=False, save_strategy="no", report_to="none", disable_tqdm=True)
        trainer = module.GRPOTrainer(model=job["model_dir"], reward_funcs=[reward], args=args,
                                     train_dataset=Dataset.from_list(prompts()), peft_config=peft_config)
        model_bytes = sum(p.numel() * p.element_size() for p in trainer.model.parameters())
        reset_peak_rss()
        before = status_kib("VmRSS")
        if job.get("limit_mib"):
            limit = status_kib("VmSize") * 1024 + job["limit_mib"] * 2**20
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        t0 = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - t0
        peak = status_kib("VmHWM")
    return {"peak_mib": (peak - before) / 1024, "baseline_mib": before / 1024, "model_mib": model_bytes / 2**20,
            "seconds": seconds, "mean_completion_length": sum(lengths) / max(1, len(lengths)),
            "reference_model": getattr(trainer, "ref_model", None) is not None}


# ------------------------------------------------------------------------------------------- the parent
class DoesNotFit(RuntimeError):
    pass


def run_child(job: dict, timeout: float = 1800) -> dict:
    env = {**os.environ, **ENV}
    proc = subprocess.run([sys.executable, "-m", "fastrl.bench.memory", "--child", json.dumps(job)], env=env,
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode == 0:
        return json.loads(proc.stdout.strip().splitlines()[-1])
    tail = proc.stderr.strip().splitlines()[-1:] or [f"exit code {proc.returncode}"]
    if job.get("limit_mib") and (proc.returncode < 0 or any(w in proc.stderr[-4000:] for w in OOM_WORDS)):
        raise DoesNotFit(tail[0][:300])
    raise RuntimeError(f"{job['trainer']} {job['mode']} T={job['length']} failed:\n{proc.stderr[-3000:]}")


def largest_fitting(trainer: str, mode: str, lengths, limit_mib: int, path: str, on_run=lambda: None):
    """Binary search over sorted `lengths` for the longest completion that trains under the limit (memory grows
    with the length). -> (that length or 0 if none fits, {length: outcome} for each length tried)."""
    lengths, tried = sorted(lengths), {}
    lo, hi, best = 0, len(lengths) - 1, 0
    while lo <= hi:
        mid = (lo + hi) // 2
        try:
            m = run_child({"trainer": trainer, "mode": mode, "length": lengths[mid], "model_dir": path,
                           "limit_mib": limit_mib})
            tried[lengths[mid]] = {"fits": True, "peak_mib": round(m["peak_mib"], 1), "seconds": round(m["seconds"]),
                                   "mean_completion_length": m["mean_completion_length"]}
            best, lo = lengths[mid], mid + 1
        except DoesNotFit as e:
            tried[lengths[mid]] = {"fits": False, "error": str(e)}
            hi = mid - 1
        on_run()
    return best, dict(sorted(tried.items()))


def run_benchmark(*, modes=MODES, trainers=TRAINERS, limit_mib: int | None = DEFAULT_LIMIT_MIB,
                  lengths=DEFAULT_LENGTHS, limit_modes=("full",), command: str, progress: bool = True,
                  model_root: str | None = None, parallel: int = 2) -> list[dict]:
    """The peak-memory runs (one per trainer and mode), then the longest-completion search under the limit.
    Runs of different trainers go `parallel` at a time: each is its own process, and RSS is per process
    (the seconds recorded are then those of a shared machine, not a timing)."""
    from concurrent.futures import ThreadPoolExecutor

    from tqdm.auto import tqdm

    from .results import row, run_facts

    run = run_facts(command)
    path = model_dir(model_root)
    base = dict(operation="grpo_two_steps", x_name="completion_length")
    t = RUN["max_completion_length"]
    rows = []
    searches = len(limit_modes) * len(trainers) * math.ceil(math.log2(len(lengths) + 1)) if limit_mib else 0
    bar = tqdm(total=len(modes) * len(trainers) + searches, desc="memory", unit="run", disable=not progress,
               dynamic_ncols=True)

    def peak_run(trainer: str, mode: str) -> dict:
        m = run_child({"trainer": trainer, "mode": mode, "length": t, "model_dir": path})
        bar.update(1)
        return m

    try:
        with ThreadPoolExecutor(parallel) as pool:
            for mode in modes:
                bar.set_postfix_str(f"{mode}, T={t}", refresh=True)
                peaks = dict(zip(trainers, pool.map(lambda tr: peak_run(tr, mode), trainers)))
                for trainer, m in peaks.items():
                    cfg = {**MODEL, **RUN, "lora": LORA if mode == "lora" else None, "env": ENV, **m,
                           "method": "VmHWM during train() - VmRSS after the trainer is built"}
                    rows.append(row(metric="memory", unit="MiB", values=[m["peak_mib"]] * 3, provider=trainer,
                                    mode=mode, x_value=t, config=cfg, run=run, **base))
                if {"fastrl", "trl"} <= set(peaks):
                    ratio = peaks["fastrl"]["peak_mib"] / peaks["trl"]["peak_mib"]
                    rows.append(row(metric="memory_ratio_to_trl", unit="x", values=[ratio] * 3, provider="fastrl",
                                    mode=mode, x_value=t, run=run, config={"goal": "<= 0.5", "met": ratio <= 0.5},
                                    **base))
            for mode in limit_modes if limit_mib else ():
                bar.set_postfix_str(f"{mode}, longest under {limit_mib} MiB", refresh=True)
                found = pool.map(lambda tr: largest_fitting(tr, mode, lengths, limit_mib, path,
                                                            lambda: bar.update(1)), trainers)
                for trainer, (best, tried) in zip(trainers, found):
                    cfg = {**MODEL, **RUN, "max_completion_length": None, "limit_mib": limit_mib,
                           "lengths": sorted(lengths), "tried": tried, "lora": LORA if mode == "lora" else None,
                           "limit": "RLIMIT_AS = address space once the trainer is built + limit_mib",
                           "result": "0 = not even the shortest length fits",
                           "longest_candidate_fits": best == max(lengths)}
                    rows.append(row(metric="max_completion_length_under_limit", unit="tokens", values=[best] * 3,
                                    provider=trainer, mode=mode, run=run, config=cfg,
                                    **{**base, "x_name": "memory_limit_mib", "x_value": limit_mib}))
    finally:
        bar.close()
    return rows


# ------------------------------------------------------------------------------------------- the plot
def plot(rows: list[dict], path: str) -> str:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4))
    FigureCanvasAgg(fig)
    ax1, ax2 = fig.subplots(1, 2)
    mem = [r for r in rows if r["metric"] == "memory"]
    modes = list(dict.fromkeys(r["mode"] for r in mem))
    for i, trainer in enumerate(TRAINERS):
        vals = [next((r["p50"] for r in mem if r["provider"] == trainer and r["mode"] == m), 0) for m in modes]
        bars = ax1.bar([j + 0.4 * i for j in range(len(modes))], vals, width=0.4, label=trainer)
        ax1.bar_label(bars, fmt="%.0f")
    ax1.set_xticks([j + 0.2 for j in range(len(modes))], [f"{m} fine-tuning" if m == "full" else "LoRA r=8"
                                                          for m in modes])
    ax1.set_ylabel("peak RSS above the built trainer (MiB)")
    ax1.set_title("2 GRPO steps, 16 × 256 tokens, beta 0.04", fontsize=10)
    ax1.legend()
    ax1.margins(y=0.1)
    lim = [r for r in rows if r["metric"] == "max_completion_length_under_limit"]
    if lim:
        labels = [f"{r['provider']} {r['mode']}" for r in lim]
        bars = ax2.bar(labels, [r["p50"] for r in lim], color=["C0" if r["provider"] == "fastrl" else "C1"
                                                                for r in lim])
        ax2.bar_label(bars, labels=[_fits_label(r) for r in lim])
        ax2.margins(y=0.1)
        ax2.set_ylabel("longest completion that fits (tokens)")
        ax2.set_title(f"under a {lim[0]['x_value']} MiB limit above the built trainer", fontsize=10)
    else:
        ax2.set_axis_off()
    fig.suptitle("fastrl vs TRL GRPOTrainer: memory (CPU, Llama L2 H256 V32768)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def _fits_label(r: dict) -> str:
    """'>= 2048' when the longest candidate length fit (the real limit lies beyond the search), else the length."""
    lengths = r["config"].get("lengths") if isinstance(r["config"], dict) else None
    top = lengths and r["p50"] >= max(lengths)
    return f"≥ {r['p50']:.0f}" if top else f"{r['p50']:.0f}"


def summary(rows: list[dict]) -> str:
    lines = []
    for r in rows:
        if r["metric"] == "max_completion_length_under_limit":
            lines.append(f"{r['provider']:>7} {r['mode']:<5} {r['metric']:<34} {_fits_label(r):>10} {r['unit']} "
                         f"(limit {r['x_value']} MiB)")
        elif r["metric"] in ("memory", "memory_ratio_to_trl"):
            lines.append(f"{r['provider']:>7} {r['mode']:<5} {r['metric']:<34} {r['p50']:>10.2f} {r['unit']}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="peak memory of 2 GRPO steps, fastrl vs TRL (issue 6)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--out", default="bench/results/memory.csv", help="CSV path (the PNG goes beside it)")
    parser.add_argument("--modes", default=",".join(MODES), help="full,lora")
    parser.add_argument("--limit-mib", type=int, default=DEFAULT_LIMIT_MIB,
                        help="memory limit above the built trainer for the longest-completion search")
    parser.add_argument("--lengths", default=",".join(map(str, DEFAULT_LENGTHS)))
    parser.add_argument("--limit-modes", default="full", help="modes searched under the limit (full,lora)")
    parser.add_argument("--no-limit", action="store_true", help="skip the longest-completion search")
    parser.add_argument("--plot-only", action="store_true", help="redraw the PNG and summary from --out, no runs")
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return 0
    from .results import command_line, read_csv, write_csv

    if args.plot_only:
        rows = read_csv(args.out)
        plot(rows, os.path.splitext(args.out)[0] + ".png")
        print(summary(rows))
        return 0

    command = command_line(sys.argv[1:] if argv is None else argv, prog="python -m fastrl.bench.memory")
    rows = run_benchmark(modes=tuple(args.modes.split(",")), limit_mib=None if args.no_limit else args.limit_mib,
                         lengths=tuple(int(x) for x in args.lengths.split(",")),
                         limit_modes=tuple(args.limit_modes.split(",")), command=command)
    write_csv(rows, args.out)
    plot(rows, os.path.splitext(args.out)[0] + ".png")
    print(summary(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
