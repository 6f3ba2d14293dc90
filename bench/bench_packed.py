"""Padding-free training steps against the padded path and TRL, on a long-tailed ragged batch -> a results CSV.

    PYTHONPATH=. .venv/bin/python bench/bench_packed.py [--quick] [--out bench/results/packed.csv]

The batch (seed 0, the same for every provider): B = 8 completions; prompts uniform in [8, 24] tokens; completion
lengths 8 + Geometric(mean 56), capped at max_completion_length = 256, the longest set to 256 (a truncated
completion sets the padded width, as in real batches), so the mean completion is about a quarter of the longest.
One training step = decoder forward + backward + GRPO loss (dapo, beta 0, on-policy) + AdamW step; generation is
not part of it. Providers, each in a fresh process (MALLOC_MMAP_THRESHOLD_=65536 so freed memory is returned,
one intra-op thread), timing `steps` steps after one warm-up step:
- fastrl-packed   GRPOTrainer's micro-batch loss with padding_free=True
- fastrl-padded   the same with padding_free=False (the [B, P+T] padded twin)
- fastrl-equal    padding-free on B sequences all of the batch's mean length: the same total tokens without the
                  tail, i.e. what the valid-token count alone predicts for fastrl-packed
- trl             TRL's GRPOTrainer.compute_loss (materialized logits) on the padded batch, same model, AdamW
Time: the step's CPU time (time.process_time; one thread, so it is the work done, little changed by other jobs
on a shared machine) as `step_cpu_time` / `steps_per_cpu_s`, and its wall time as `step_time` (contention shows).
Peak memory: the process's peak RSS above its RSS once model, optimizer and batch are built.
Models: tiny_model's Llama, 4 layers, hidden 256, head_dim 64, random weights, at V 32768 and 151936.
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

PROVIDERS = ("fastrl-packed", "fastrl-padded", "fastrl-equal", "trl")
B, MAX_COMPLETION, MEAN_TAIL, PROMPT_RANGE = 8, 256, 56, (8, 24)


def lengths(seed: int = 0) -> tuple[list[int], list[int]]:
    """(prompt lengths, completion lengths) of the benchmark batch."""
    import torch

    g = torch.Generator().manual_seed(seed)
    prompts = torch.randint(PROMPT_RANGE[0], PROMPT_RANGE[1] + 1, (B,), generator=g).tolist()
    torch.manual_seed(seed)  # torch.distributions samples from the global generator
    tail = torch.distributions.Geometric(probs=torch.tensor(1.0 / MEAN_TAIL)).sample((B,))
    completions = [min(MAX_COMPLETION, 8 + int(x)) for x in tail]
    completions[completions.index(max(completions))] = MAX_COMPLETION
    return prompts, completions


def rollout(prompts, completions, vocab, seed=0):
    import torch

    from fastrl.rollout_batch import RolloutBatch

    g = torch.Generator().manual_seed(seed)
    P, T = max(prompts), max(completions)
    prompt, prompt_mask = torch.zeros(B, P, dtype=torch.long), torch.zeros(B, P, dtype=torch.long)
    completion, attention = torch.zeros(B, T, dtype=torch.long), torch.zeros(B, T, dtype=torch.long)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        prompt[i, P - p:], prompt_mask[i, P - p:] = torch.randint(4, vocab, (p,), generator=g), 1
        completion[i, :c], attention[i, :c] = torch.randint(4, vocab, (c,), generator=g), 1
    return RolloutBatch(prompt, prompt_mask, completion, attention, attention.clone(), torch.randn(B, generator=g))


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _fastrl_step(model_dir, batch, padding_free):
    from datasets import Dataset

    from fastrl import GRPOConfig, GRPOTrainer

    args = GRPOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=B, num_generations=4,
                      max_completion_length=MAX_COMPLETION, bf16=False, save_strategy="no", disable_tqdm=True,
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
                      max_completion_length=MAX_COMPLETION, bf16=False, use_cpu=True, report_to=[], beta=0.0,
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


def worker(provider: str, model_dir: str, vocab: int, steps: int) -> dict:
    """Time `steps` training steps of one provider after a warm-up step; peak RSS above the built state."""
    import torch

    torch.set_num_threads(1)
    torch.manual_seed(0)
    prompts, completions = lengths()
    if provider == "fastrl-equal":
        mean = round(sum(completions) / B)
        completions = [mean] * B
    batch = rollout(prompts, completions, vocab)
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


def build_model(vocab: int) -> str:
    from fastrl.tasks.tiny_model import build_tiny_model

    root = os.path.join(os.path.expanduser("~"), ".cache", "fastrl", "bench_models", f"packed-L4-H256-v{vocab}")
    return build_tiny_model(root, num_layers=4, hidden_size=256, head_dim=64, vocab_size=vocab)


def run(quick: bool, out: str) -> None:
    from fastrl.bench.measure import quantiles
    from fastrl.bench.results import row, run_facts, write_csv

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    facts = run_facts("python bench/bench_packed.py" + (" --quick" if quick else ""))
    steps, rows = (2 if quick else 4), []
    for vocab in ((32768,) if quick else (32768, 151936)):
        model_dir = build_model(vocab)
        for provider in PROVIDERS:
            env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
            code = f"import json, sys; sys.path.insert(0, 'bench'); import bench_packed as b; " \
                   f"print(json.dumps(b.worker({provider!r}, {model_dir!r}, {vocab}, {steps})))"
            done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
            if done.returncode:
                raise RuntimeError(f"{provider} V={vocab} failed:\n{done.stderr[-3000:]}")
            res = json.loads(done.stdout.strip().splitlines()[-1])
            config = {"commit": commit, "model": "llama L4 H256 head_dim 64, random weights", "batch": B,
                      "max_completion_length": MAX_COMPLETION, "completion_lengths": res["completion_lengths"],
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
    write_csv(rows, out)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="V 32768 only, 2 timed steps")
    parser.add_argument("--out", default="bench/results/packed.csv")
    a = parser.parse_args()
    run(a.quick, a.out)
