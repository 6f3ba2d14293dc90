"""fastrl's sampling loop with fp32 weights against the same loop on a bf16 copy of them, and with its CPU linear
layers in the plain x @ Wᵀ order instead of W @ xᵀ (fastrl/generation/skinny_linear.py) -> a results CSV.

    PYTHONPATH=. .venv/bin/python bench/bench_decode.py [--size qwen2.5-0.5b] [--tokens 16] [--reps 3]
                                                        [--out bench/results/decode.csv]

Issue 17's question for CPU generation: does sampling from bf16 weights (half the bytes read per token) beat fp32
on a CPU without bf16 instructions (AVX2 here), and how far are its logprobs from the fp32 policy's (what an
importance-sampling correction would have to absorb)? One process, both variants interleaved `reps` times:
`fastrl.generation.decode.sample` on 8 prompts of 16 tokens, `tokens` new tokens each, the same per-row random
streams for both. Times: wall and CPU seconds per decode step (CPU time: the work done, less changed by other
jobs on a shared machine). Gap: the bf16 sampler's logprobs of its tokens against the fp32 model's log_softmax of
the same tokens (mean and max |difference| over the sampled tokens). Each row records the commit it measured.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import time

B, PROMPT = 8, 16


def timed_sample(model, ids, mask, sampling, keys):
    from fastrl.generation.decode import sample

    wall, cpu = time.perf_counter(), time.process_time()
    tokens, logps = sample(model, ids, mask, sampling, eos_token_ids=[-1], pad_token_id=0, stream_keys=keys)
    return tokens, logps, time.perf_counter() - wall, time.process_time() - cpu


def logprob_gap(model, ids, tokens, sampler_logps) -> tuple[float, float]:
    """mean, max |sampler logprob - fp32 model logprob| over the sampled tokens."""
    import torch

    with torch.no_grad():
        logits = model(input_ids=torch.cat([ids, tokens], 1)).logits[:, ids.shape[1] - 1:-1].float()  # [B, T, V]
    own = logits.log_softmax(-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)  # [B, T]
    diff = (own - sampler_logps).abs()
    return float(diff.mean()), float(diff.max())


def run(size: str, tokens: int, reps: int, out: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from fastrl.bench.e2e import build_model, real_size_cases
    from fastrl.bench.measure import quantiles
    from fastrl.bench.results import row, run_facts, write_csv
    from fastrl.generation import skinny_linear
    from fastrl.generation.base import SamplingConfig
    from fastrl.generation.streams import stream_keys

    case = next(c for c in real_size_cases() if c.size.startswith(size))
    path = build_model(case)
    fp32 = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    bf16 = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    # name -> (model, skinny_linear.MAX_ROWS): 0 turns the W @ xᵀ order off
    variants = {"fp32 weights": (fp32, skinny_linear.MAX_ROWS), "fp32 weights, x @ W^T": (fp32, 0),
                "bf16 weights": (bf16, skinny_linear.MAX_ROWS)}
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, 90, (B, PROMPT), generator=g)
    mask = torch.ones_like(ids)
    sampling = SamplingConfig(max_completion_length=tokens)
    keys = stream_keys(0, 0, torch.arange(B))
    samples = {name: {"wall": [], "cpu": []} for name in variants}
    gaps = {}
    for _ in range(reps):
        for name, (model, max_rows) in variants.items():
            skinny_linear.MAX_ROWS = max_rows
            toks, logps, wall, cpu = timed_sample(model, ids, mask, sampling, keys)
            samples[name]["wall"].append(wall / tokens)
            samples[name]["cpu"].append(cpu / tokens)
            gaps[name] = logprob_gap(fp32, ids, toks, logps)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    facts = run_facts(f"python bench/bench_decode.py --size {size} --tokens {tokens} --reps {reps}")
    rows, machine = [], f"2-core CPU, 1-minute load average {os.getloadavg()[0]:.1f} at the end"
    for name in variants:
        config = {"commit": commit, "size": case.size, "batch": B, "prompt_tokens": PROMPT, "new_tokens": tokens,
                  "reps": reps, "threads": torch.get_num_threads(), "machine": machine,
                  "logprob_gap_mean": gaps[name][0], "logprob_gap_max": gaps[name][1]}
        base = dict(operation="decode_step", provider=name, mode="sample", x_name="B", x_value=B, config=config,
                    run=facts)
        rows.append(row(metric="step_time", unit="s", values=quantiles(samples[name]["wall"]), **base))
        rows.append(row(metric="step_cpu_time", unit="s", values=quantiles(samples[name]["cpu"]), **base))
        print(f"{name}: wall p50 {quantiles(samples[name]['wall'])[1]:.3f} s/step, cpu p50 "
              f"{quantiles(samples[name]['cpu'])[1]:.3f} s/step, |logprob gap| mean {gaps[name][0]:.2e} "
              f"max {gaps[name][1]:.2e}")
    write_csv(rows, out)
    print(f"wrote {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="qwen2.5-0.5b", help="an e2e real-size case: qwen2.5-0.5b or qwen2.5-1.5b")
    parser.add_argument("--tokens", type=int, default=16, help="new tokens per completion")
    parser.add_argument("--reps", type=int, default=3, help="interleaved repetitions of each variant")
    parser.add_argument("--out", default=os.path.join("bench", "results", "decode.csv"))
    args = parser.parse_args()
    run(args.size, args.tokens, args.reps, args.out)


if __name__ == "__main__":
    main()
