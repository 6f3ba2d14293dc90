"""The PyTorch path's tile shapes at a real vocabulary: whole-vocabulary row tiles against row blocks × vocabulary
chunks, beside PyTorch materializing the logits (TRL's way) -> a results CSV.

    PYTHONPATH=. .venv/bin/python bench/bench_sweep_tiles.py [--reps 3] [--out bench/results/sweep_tiles.csv]

Issue 17: at Qwen2.5's head (H 896, V 151936) a whole-vocabulary tile of the fp32 budget holds 16-48 rows, and
such a short GEMM spends its time re-packing all of W. The sweeps now switch to [≤1024 rows, vocabulary chunk]
tiles when whole rows would be shorter than forward_sweep.GEMM_ROWS. Measured here, interleaved in one process
(`reps` rounds of every variant): the reference pass (fused_linear_logprobs without grad) and the GRPO loss
forward+backward (fused_linear_grpo_loss: token-level IS, beta 0.04), fp32, torch backend, two threads; the
"whole rows" variant sets GEMM_ROWS = 0 (the rule before the change). CPU seconds are the work done (less changed
by other jobs on a shared machine than wall time). Each row records the commit it measured.
"""
from __future__ import annotations

import argparse
import os
import time

from _bench_env import load_note

SHAPES = [  # (name, N rows, H, V)
    ("qwen2.5-0.5b head", 1024, 896, 151936),
    ("e2e model head", 2048, 256, 32768),
]


def inputs(n, h, v, seed=0):
    import torch

    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(n, h, generator=g) * 0.5).requires_grad_()
    weight = (torch.randn(v, h, generator=g) * 0.02).requires_grad_()
    targets = torch.randint(0, v, (n,), generator=g)
    rewards = torch.randn(n // 128, generator=g)  # sequences of 128 rows, groups of 8
    return hidden, weight, targets, rewards


def reference_pass(hidden, weight, targets, _rewards, torch_logits: bool):
    import torch

    from fastrl.kernels import fused_linear_logprobs

    with torch.no_grad():
        if torch_logits:
            return torch.log_softmax(hidden @ weight.T, -1).gather(1, targets[:, None])
        return fused_linear_logprobs(hidden, weight, targets, backend="torch")


def loss_step(hidden, weight, targets, rewards, torch_logits: bool):
    import torch

    from fastrl.kernels import fused_linear_grpo_loss

    b = rewards.shape[0]
    rows = hidden[: hidden.shape[0] // b * b]
    mask = torch.ones(b, rows.shape[0] // b)
    ref = torch.zeros(b, rows.shape[0] // b) - 3.0
    if torch_logits:  # TRL's way: [N, V] logits, log_softmax, gather, its token loss; autograd does the rest
        logp = torch.log_softmax(rows @ weight.T, -1).gather(1, targets[: rows.shape[0], None]).view(b, -1)
        adv = (rewards - rewards.view(-1, 8).mean(1).repeat_interleave(8))[:, None]
        kl = torch.exp(ref - logp) - (ref - logp) - 1
        loss = (-(torch.exp(logp - logp.detach()) * adv) + 0.04 * kl).sum() / mask.sum()
    else:
        loss, _ = fused_linear_grpo_loss(rows.view(b, -1, rows.shape[-1]), weight, targets[: rows.shape[0]].view(b, -1),
                                         mask, rewards=rewards, num_generations=8, ref_logprobs=ref, beta=0.04,
                                         backend="torch")
    loss.backward()
    hidden.grad = weight.grad = None


def timed(fn, *args):
    wall, cpu = time.perf_counter(), time.process_time()
    fn(*args)
    return time.perf_counter() - wall, time.process_time() - cpu


def run(reps: int, out: str) -> None:
    import torch

    from fastrl.bench.measure import quantiles
    from fastrl.bench.results import row, run_facts, write_csv
    from fastrl.kernels import forward_sweep

    variants = {"vocabulary-chunk tiles": (forward_sweep.GEMM_ROWS, False), "whole-row tiles": (0, False),
                "PyTorch logits": (forward_sweep.GEMM_ROWS, True)}
    facts = run_facts(f"python bench/bench_sweep_tiles.py --reps {reps}")
    rows, default_rows = [], forward_sweep.GEMM_ROWS
    for shape, n, h, v in SHAPES:
        args = inputs(n, h, v)
        for op_name, op in (("reference logprobs", reference_pass), ("grpo loss fwd+bwd", loss_step)):
            times = {name: {"wall": [], "cpu": []} for name in variants}
            for _ in range(reps):
                for name, (gemm_rows, torch_logits) in variants.items():
                    forward_sweep.GEMM_ROWS = gemm_rows
                    wall, cpu = timed(op, *args, torch_logits)
                    times[name]["wall"].append(wall)
                    times[name]["cpu"].append(cpu)
            forward_sweep.GEMM_ROWS = default_rows
            base_cpu = quantiles(times["vocabulary-chunk tiles"]["cpu"])[1]
            for name in variants:
                config = {"shape": shape, "N": n, "H": h, "V": v, "dtype": "float32",
                          "reps": reps, "threads": torch.get_num_threads(), "machine": load_note()}
                kw = dict(operation=op_name, provider=name, mode="fwd" if op is reference_pass else "fwd+bwd",
                          x_name="V", x_value=v, config=config, run=facts)
                rows.append(row(metric="time", unit="s", values=quantiles(times[name]["wall"]), **kw))
                rows.append(row(metric="cpu_time", unit="s", values=quantiles(times[name]["cpu"]), **kw))
                cpu = quantiles(times[name]["cpu"])[1]
                print(f"{shape:18s} {op_name:20s} {name:24s} cpu p50 {cpu:7.2f} s  ({cpu / base_cpu:.2f}x chunked)",
                      flush=True)
    write_csv(rows, out)
    print(f"wrote {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=3, help="interleaved rounds of every variant")
    parser.add_argument("--out", default=os.path.join("bench", "results", "sweep_tiles.csv"))
    args = parser.parse_args()
    run(args.reps, args.out)


if __name__ == "__main__":
    main()
