"""Padding-free training steps against the padded path and TRL, on a long-tailed ragged batch -> a results CSV.

    PYTHONPATH=. .venv/bin/python bench/bench_packed.py [--quick] [--out bench/results/packed.csv]
    PYTHONPATH=. .venv/bin/python bench/bench_packed.py --case qwen0.5b     # -> bench/results/packed-qwen0.5b.csv

Cases (`CASES`): "small", tiny_model's Llama (4 layers, hidden 256, head_dim 64) at V 32768 and 151936, with
B = 8, prompts uniform in [8, 24] tokens and completions of up to 256; "qwen0.5b", the Qwen2.5-0.5B architecture
(Qwen2, 24 layers × 896, 14 query / 2 KV heads of 64, MLP 4864, V 151936, tied head; random weights, tiny_model's
builder) with B = 8 and completions of up to 128.
The batch (seed 0, the same for every provider): completion lengths 8 + Geometric(mean tail), capped at
max_completion_length, the longest set to max_completion_length (a truncated completion sets the padded width,
as in real batches), with the tail's mean chosen so that the mean completion is about a quarter of the longest.
One training step = decoder forward + backward + GRPO loss (dapo, beta 0, on-policy) + AdamW step; generation is
not part of it. Providers, each in a fresh process (MALLOC_MMAP_THRESHOLD_=65536 so freed memory is returned,
one intra-op thread), timing `steps` steps after one warm-up step:
- fastrl-packed   GRPOTrainer's micro-batch loss with padding_free=True
- fastrl-dense-mask  the same with sdpa left to transformers' dense block-diagonal [S, S] mask instead of
                  attention per sequence (fastrl.packed_attention): the packed path before it, for the ratio
- fastrl-padded   the same with padding_free=False (the [B, P+T] padded twin)
- fastrl-equal    padding-free on B sequences all of the batch's mean length: the same total tokens without the
                  tail, i.e. what the valid-token count alone predicts for fastrl-packed
- trl             TRL's GRPOTrainer.compute_loss (materialized logits) on the padded batch, same model, AdamW
Time: the step's CPU time (time.process_time; one thread, so it is the work done, little changed by other jobs
on a shared machine) as `step_cpu_time` / `steps_per_cpu_s`, and its wall time as `step_time` (contention shows).
Peak memory: the process's peak RSS above its RSS once model, optimizer and batch are built.
Each CSV row records the git commit it was measured at; timings on a shared machine say so in their config.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

PROVIDERS = ("fastrl-packed", "fastrl-dense-mask", "fastrl-padded", "fastrl-equal", "trl")
B, PROMPT_RANGE = 8, (8, 24)


@dataclass(frozen=True)
class Case:
    model: str  # as recorded in the CSV
    vocabs: tuple[int, ...]
    max_completion: int
    mean_tail: int  # mean of the geometric tail added to 8 tokens
    steps: int  # timed steps after one warm-up step
    build: dict  # build_tiny_model's arguments besides vocab_size


CASES = {
    "small": Case("llama L4 H256 head_dim 64, random weights", (32768, 151936), 256, 56, 4,
                  dict(num_layers=4, hidden_size=256, head_dim=64)),
    # Qwen2.5-0.5B's architecture (its config.json), tied head
    "qwen0.5b": Case("qwen2 L24 H896 (Qwen2.5-0.5B shape), random weights", (151936,), 128, 24, 1,
                     dict(arch="qwen2", num_layers=24, hidden_size=896, num_heads=14, num_key_value_heads=2,
                          head_dim=64, intermediate_size=4864)),
}


def lengths(case: Case, seed: int = 0) -> tuple[list[int], list[int]]:
    """(prompt lengths, completion lengths) of the benchmark batch."""
    from fastrl.bench.ragged import long_tail_lengths

    return long_tail_lengths(B, PROMPT_RANGE, case.max_completion, case.mean_tail, seed)


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _fastrl_step(model_dir, batch, padding_free):
    from datasets import Dataset

    from fastrl import GRPOConfig, GRPOTrainer

    args = GRPOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=B, num_generations=4,
                      max_completion_length=batch.completion_ids.shape[1], bf16=False, save_strategy="no", disable_tqdm=True,
                      padding_free=padding_free, beta=0.0, loss_type="dapo", learning_rate=1e-5,
                      gradient_checkpointing=False)
    trainer = GRPOTrainer(model_dir, lambda completions, **k: [0.0] * len(completions), args,
                          train_dataset=Dataset.from_list([{"prompt": "1"}] * 8))
    optimizer = trainer._build_optimizer()
    trainer._buffer_info = {"loss_tokens": float(batch.completion_mask.sum())}

    def step():
        loss, _ = trainer._micro_batch_loss(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def _trl_step(model_dir, batch):
    import torch
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    args = GRPOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=B, num_generations=4,
                      max_completion_length=batch.completion_ids.shape[1], bf16=False, use_cpu=True, report_to=[], beta=0.0,
                      loss_type="dapo", learning_rate=1e-5, gradient_checkpointing=False)
    trainer = GRPOTrainer(model_dir, lambda completions, **k: [0.0] * len(completions), args=args,
                          train_dataset=Dataset.from_list([{"prompt": "1"}] * 8))
    trainer.current_gradient_accumulation_steps = 1
    trainer.model.train()
    optimizer = torch.optim.AdamW(trainer.model.parameters(), lr=1e-5)
    inputs = dict(prompt_ids=batch.prompt_ids, prompt_mask=batch.prompt_mask, completion_ids=batch.completion_ids,
                  completion_mask=batch.completion_mask, advantages=batch.advantages,
                  num_items_in_batch=batch.completion_mask.sum())

    def step():
        trainer.compute_loss(trainer.model, inputs).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def worker(case: str, provider: str, model_dir: str, vocab: int, steps: int) -> dict:
    """Time `steps` training steps of one provider after a warm-up step; peak RSS above the built state."""
    import torch

    from fastrl.bench.ragged import random_rollout

    torch.set_num_threads(1)
    torch.manual_seed(0)
    prompts, completions = lengths(CASES[case])
    if provider == "fastrl-equal":
        mean = round(sum(completions) / B)
        completions = [mean] * B
    batch = random_rollout(prompts, completions, vocab)
    if provider == "fastrl-dense-mask":  # this process only: the pack check keeps sdpa (and its [S, S] mask)
        from fastrl import packed_attention

        packed_attention.install = lambda model: False
    step = _trl_step(model_dir, batch) if provider == "trl" else _fastrl_step(model_dir, batch,
                                                                                provider != "fastrl-padded")
    built = _rss_mib()
    cpu, wall = [], []
    for _ in range(steps + 1):
        c0, w0 = time.process_time(), time.perf_counter()
        step()
        cpu.append(time.process_time() - c0)
        wall.append(time.perf_counter() - w0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"cpu_s": cpu[1:], "wall_s": wall[1:], "peak_mib": peak - built, "prompt_lengths": prompts,
            "completion_lengths": completions}


def build_model(name: str, vocab: int) -> str:
    """The case's random-init model folder (cached under ~/.cache/fastrl/bench_models)."""
    from fastrl.tasks.tiny_model import build_tiny_model

    root = os.path.join(os.path.expanduser("~"), ".cache", "fastrl", "bench_models")
    return build_tiny_model(os.path.join(root, f"bench_packed-{name}-v{vocab}"), vocab_size=vocab,
                            **CASES[name].build)


def run(case_name: str, quick: bool, out: str) -> None:
    from fastrl.bench.measure import quantiles
    from fastrl.bench.results import row, run_facts, write_csv

    case = CASES[case_name]
    facts = run_facts("python bench/bench_packed.py" + (" --quick" if quick else "")
                      + ("" if case_name == "small" else f" --case {case_name}"))
    steps, rows = (min(2, case.steps) if quick else case.steps), []
    for vocab in case.vocabs[:1] if quick else case.vocabs:
        model_dir = build_model(case_name, vocab)
        for provider in PROVIDERS:
            env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
            code = f"import json, sys; sys.path.insert(0, 'bench'); import bench_packed as b; " \
                   f"print(json.dumps(b.worker({case_name!r}, {provider!r}, {model_dir!r}, {vocab}, {steps})))"
            done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
            if done.returncode:
                raise RuntimeError(f"{provider} V={vocab} failed:\n{done.stderr[-3000:]}")
            res = json.loads(done.stdout.strip().splitlines()[-1])
            config = {"model": case.model, "batch": B,
                      "max_completion_length": case.max_completion, "completion_lengths": res["completion_lengths"],
                      "prompt_lengths": res["prompt_lengths"], "timed_steps": steps, "threads": 1,
                      "loss_type": "dapo", "beta": 0.0,
                      "note": "shared, busy 2-core machine: compare providers within this run, by CPU time"}
            cpu_q, wall_q = quantiles(res["cpu_s"]), quantiles(res["wall_s"])
            common = dict(operation="grpo_train_step", provider=provider, mode="packed-bench", x_name="V",
                          x_value=vocab, config=config, run=facts)
            rows.append(row(metric="step_cpu_time", unit="s", values=cpu_q, **common))
            rows.append(row(metric="steps_per_cpu_s", unit="1/s", values=tuple(1 / v for v in reversed(cpu_q)),
                            **common))
            rows.append(row(metric="step_time", unit="s", values=wall_q, **common))
            rows.append(row(metric="peak_memory", unit="MiB", values=(res["peak_mib"],) * 3, **common))
            print(f"V={vocab} {provider:14s} step p50 {cpu_q[1]:.3f} s CPU ({wall_q[1]:.3f} s wall)  "
                  f"peak +{res['peak_mib']:.0f} MiB", flush=True)
            write_csv(rows, out)  # after every provider: a long run stopped midway keeps what it measured


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--case", choices=list(CASES), default="small")
    parser.add_argument("--quick", action="store_true", help="the case's first vocabulary only, 2 timed steps")
    parser.add_argument("--out", help="default: bench/results/packed.csv (small), packed-CASE.csv (others)")
    a = parser.parse_args()
    run(a.case, a.quick, a.out or ("bench/results/packed.csv" if a.case == "small" else
                                   f"bench/results/packed-{a.case}.csv"))
