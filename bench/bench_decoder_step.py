"""The decoder's training pass at a real size: fp32 against bf16 autocast, each with and without gradient
checkpointing -> a results CSV.

    PYTHONPATH=. .venv/bin/python bench/bench_decoder_step.py [--layers 1] [--reps 3]
                                                              [--out bench/results/decoder_step.csv]

Issue 17 asks what gradient checkpointing costs at the Qwen2.5-0.5B shape and whether bf16 autocast is faster there.
The policy's forward + backward is the same decoder code in fastrl and TRL, so it is measured on its own: `layers`
of Qwen2.5-0.5B's decoder (896 wide, 14 heads / 2 KV heads of 64, MLP 4864; random weights, fp32 parameters) on
one micro-batch of the e2e case (8 sequences × (16 prompt + 128 completion) tokens), loss = mean(hidden²),
forward + backward, the variants interleaved `reps` rounds in one process, two threads. Time scales with the layer
count (24 in the real model); the ratios between variants are the result. Peak memory is not measured here
(fastrl plan and bench/results/e2e-qwen2.5-0.5b.csv have it). Each row records the commit it measured.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import time

from _bench_env import load_note

BATCH, TOKENS = 8, 16 + 128
VARIANTS = {  # name -> (autocast dtype or None, gradient checkpointing)
    "fp32": (None, False), "fp32, checkpointing": (None, True),
    "bf16 autocast": ("bfloat16", False), "bf16 autocast, checkpointing": ("bfloat16", True),
}


def build_decoder(layers: int):
    """Qwen2.5-0.5B's decoder cut to `layers` layers, random init, fp32, training mode."""
    import torch
    from transformers import Qwen2Config, Qwen2Model

    from fastrl.bench.e2e import QWEN05B

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=QWEN05B["vocab_size"], hidden_size=QWEN05B["hidden_size"],
                         num_hidden_layers=layers, num_attention_heads=QWEN05B["hidden_size"] // QWEN05B["head_dim"],
                         num_key_value_heads=QWEN05B["num_key_value_heads"],
                         intermediate_size=QWEN05B["intermediate_size"], tie_word_embeddings=True, use_cache=False)
    return Qwen2Model(config).train()


def timed_step(model, ids, autocast_dtype: str | None, checkpointing: bool) -> tuple[float, float]:
    """One forward + backward -> (wall s, CPU s); gradients cleared after."""
    import torch

    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_disable()
    amp = (torch.autocast("cpu", dtype=getattr(torch, autocast_dtype)) if autocast_dtype
           else contextlib.nullcontext())
    wall, cpu = time.perf_counter(), time.process_time()
    with amp:
        hidden = model(input_ids=ids).last_hidden_state  # [B, T, H]
    hidden.float().pow(2).mean().backward()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    model.zero_grad(set_to_none=True)
    return wall, cpu


def run(layers: int, reps: int, out: str) -> None:
    import torch

    from fastrl.bench.measure import quantiles
    from fastrl.bench.results import row, run_facts, write_csv

    model = build_decoder(layers)
    ids = torch.randint(0, model.config.vocab_size, (BATCH, TOKENS), generator=torch.Generator().manual_seed(1))
    timed_step(model, ids, None, False)  # warm-up: first-call allocations and kernel selection
    samples = {name: {"wall": [], "cpu": []} for name in VARIANTS}
    for _ in range(reps):
        for name, (dtype, ckpt) in VARIANTS.items():
            wall, cpu = timed_step(model, ids, dtype, ckpt)
            samples[name]["wall"].append(wall)
            samples[name]["cpu"].append(cpu)
    facts = run_facts(f"python bench/bench_decoder_step.py --layers {layers} --reps {reps}")
    machine = load_note()
    base_wall = quantiles(samples["fp32"]["wall"])[1]
    rows = []
    for name, times in samples.items():
        config = {"shape": "qwen2.5-0.5b decoder", "layers": layers, "batch": BATCH,
                  "tokens": TOKENS, "reps": reps, "threads": torch.get_num_threads(), "machine": machine}
        base = dict(operation="decoder_fwd_bwd", provider=name, mode="train", x_name="layers", x_value=layers,
                    config=config, run=facts)
        rows.append(row(metric="step_time", unit="s", values=quantiles(times["wall"]), **base))
        rows.append(row(metric="step_cpu_time", unit="s", values=quantiles(times["cpu"]), **base))
        wall = quantiles(times["wall"])[1]
        print(f"{name}: wall p50 {wall:.2f} s ({wall / base_wall:.2f}x fp32), cpu p50 "
              f"{quantiles(times['cpu'])[1]:.2f} s")
    write_csv(rows, out)
    print(f"wrote {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=1, help="decoder layers of the 0.5B shape (the model has 24)")
    parser.add_argument("--reps", type=int, default=3, help="interleaved rounds of every variant")
    parser.add_argument("--out", default=os.path.join("bench", "results", "decoder_step.csv"))
    args = parser.parse_args()
    if args.layers < 1 or args.reps < 1:
        parser.error(f"--layers and --reps: expected >= 1, got {args.layers} and {args.reps}")
    run(args.layers, args.reps, args.out)


if __name__ == "__main__":
    main()
