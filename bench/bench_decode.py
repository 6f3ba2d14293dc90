"""fastrl's sampling loop with fp32 weights against the same loop on a bf16 copy of them, and with its CPU linear
layers in the plain x @ Wᵀ order instead of W @ xᵀ (fastrl/generation/skinny_linear.py) -> a results CSV.

    PYTHONPATH=. .venv/bin/python bench/bench_decode.py [--size qwen2.5-0.5b] [--tokens 16] [--reps 3]
                                                        [--batch 8[,32,...]] [--variants fp32,fp32-xWt,bf16]
                                                        [--out bench/results/decode.csv]

Issue 17's question for CPU generation: does sampling from bf16 weights (half the bytes read per token) beat fp32
on a CPU without bf16 instructions (AVX2 here), and how far are its logprobs from the fp32 policy's (what an
importance-sampling correction would have to absorb)? One process, both variants interleaved `reps` times:
`fastrl.generation.decode.sample` on B prompts of 16 tokens (B = 8 by default; --batch 8,32,64 asks how the cost of
a decode step grows with the rows sampled together, i.e. with a larger generation batch), `tokens` new tokens each,
the same per-row random streams for every variant. Times: wall and CPU seconds per decode step (CPU time: the work
done, less changed by other jobs on a shared machine). Gap: the bf16 sampler's logprobs of its tokens against the
fp32 model's log_softmax of the same tokens (mean and max |difference| over the sampled tokens). Each row records
the commit it measured.
"""
from __future__ import annotations

import argparse
import os
import time

from _bench_env import load_note

PROMPT = 16
VARIANTS = {"fp32": "fp32 weights", "fp32-xWt": "fp32 weights, x @ W^T", "bf16": "bf16 weights"}


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


def run(size: str, tokens: int, reps: int, batches: list[int], chosen: list[str], out: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from fastrl.bench.e2e import build_model, real_size_cases
    from fastrl.bench.measure import quantiles
    from fastrl.bench.results import row, run_facts, write_csv
    from fastrl.generation import skinny_linear

    case = next(c for c in real_size_cases() if c.size.startswith(size))
    path = build_model(case)
    fp32 = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    bf16 = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval() if "bf16" in chosen else None
    # key -> (model, skinny_linear.MAX_ROWS): 0 turns the W @ xᵀ order off
    models = {"fp32": (fp32, skinny_linear.MAX_ROWS), "fp32-xWt": (fp32, 0), "bf16": (bf16, skinny_linear.MAX_ROWS)}
    sample_batch(fp32, batches[0], 2)  # warm-up: first-call allocations and kernel selection
    samples = {(k, b): {"wall": [], "cpu": []} for k in chosen for b in batches}
    gaps = {}
    for _ in range(reps):
        for (key, b), times in samples.items():
            model, skinny_linear.MAX_ROWS = models[key]
            toks, logps, wall, cpu, ids = sample_batch(model, b, tokens)
            times["wall"].append(wall / tokens)
            times["cpu"].append(cpu / tokens)
            gaps[key, b] = logprob_gap(fp32, ids, toks, logps)
    facts = run_facts(f"python bench/bench_decode.py --size {size} --tokens {tokens} --reps {reps} "
                      f"--batch {','.join(map(str, batches))} --variants {','.join(chosen)}")
    rows, machine = [], load_note()
    for (key, b), times in samples.items():
        config = {"size": case.size, "batch": b, "prompt_tokens": PROMPT, "new_tokens": tokens,
                  "reps": reps, "threads": torch.get_num_threads(), "machine": machine,
                  "logprob_gap_mean": gaps[key, b][0], "logprob_gap_max": gaps[key, b][1]}
        base = dict(operation="decode_step", provider=VARIANTS[key], mode="sample", x_name="B", x_value=b,
                    config=config, run=facts)
        rows.append(row(metric="step_time", unit="s", values=quantiles(times["wall"]), **base))
        rows.append(row(metric="step_cpu_time", unit="s", values=quantiles(times["cpu"]), **base))
        wall = quantiles(times["wall"])[1]
        print(f"{VARIANTS[key]}, B {b}: wall p50 {wall:.3f} s/step ({wall / b * 1e3:.1f} ms per row), cpu p50 "
              f"{quantiles(times['cpu'])[1]:.3f} s/step, |logprob gap| mean {gaps[key, b][0]:.2e} "
              f"max {gaps[key, b][1]:.2e}")
    write_csv(rows, out)
    print(f"wrote {out}")


def sample_batch(model, b: int, tokens: int):
    """`tokens` new tokens on b random prompts (seeded by b, so every variant samples the same prompts)."""
    import torch

    from fastrl.generation.base import SamplingConfig
    from fastrl.generation.streams import stream_keys

    ids = torch.randint(4, 90, (b, PROMPT), generator=torch.Generator().manual_seed(b))
    keys = stream_keys(0, 0, torch.arange(b))
    toks, logps, wall, cpu = timed_sample(model, ids, torch.ones_like(ids),
                                          SamplingConfig(max_completion_length=tokens), keys)
    return toks, logps, wall, cpu, ids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="qwen2.5-0.5b", help="an e2e real-size case: qwen2.5-0.5b or qwen2.5-1.5b")
    parser.add_argument("--tokens", type=int, default=16, help="new tokens per completion")
    parser.add_argument("--reps", type=int, default=3, help="interleaved repetitions of each variant")
    parser.add_argument("--batch", default="8", help="comma-separated rows sampled together (default 8)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {','.join(VARIANTS)}")
    parser.add_argument("--out", default=os.path.join("bench", "results", "decode.csv"))
    args = parser.parse_args()
    chosen = args.variants.split(",")
    unknown = [v for v in chosen if v not in VARIANTS]
    if unknown:
        parser.error(f"--variants: unknown {unknown}; expected a comma-separated subset of {','.join(VARIANTS)}")
    batches = [int(b) for b in args.batch.split(",")]
    if min(batches) < 1:
        parser.error(f"--batch: rows must be >= 1, got {args.batch}")
    run(args.size, args.tokens, args.reps, batches, chosen, args.out)


if __name__ == "__main__":
    main()
