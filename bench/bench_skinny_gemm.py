"""A decode step's matrix product against the memory it has to read: Qwen2.5's head (151936 x 896, fp32) times a
few rows, in the orders and formats a CPU sampling loop can use -> a results CSV.

    PYTHONPATH=. .venv/bin/python bench/bench_skinny_gemm.py [--rows 1,8,32,64] [--reps 7]
                                                             [--out bench/results/skinny_gemm.csv]

Issue 17: a decode step of B rows reads every weight once, so its floor is bytes / memory bandwidth. Measured
here, interleaved in one process, two threads: the read bandwidth (`W.sum()`, the rate a streaming read reaches),
x @ Wᵀ (F.linear's order), W @ xᵀ (fastrl/generation/skinny_linear.py's order), and int8 weight-only
(`torch.ops.aten._weight_int8pack_mm`, bf16 activations, per-row scales: a quarter of the bytes; its relative
error against the fp32 product is recorded). `GBps` = bytes of W (in its format) / time: how close each comes to
the read bandwidth. Each row records the commit it measured.
"""
from __future__ import annotations

import argparse
import os
import time

from _bench_env import load_note

V, H = 151936, 896


def timed(fn, reps: int) -> list[float]:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return times


def products(weight, x):
    """name -> (call, bytes of W it reads) for x [n, H] and weight [V, H] fp32."""
    import torch

    scales = weight.abs().amax(1) / 127  # [V]
    w8 = torch.round(weight / scales[:, None]).to(torch.int8)  # [V, H]
    x16, s16 = x.to(torch.bfloat16), scales.to(torch.bfloat16)
    fp32_bytes = weight.numel() * 4
    calls = {"read bandwidth (W.sum)": (lambda: weight.sum(), fp32_bytes),
             "x @ W^T": (lambda: x @ weight.T, fp32_bytes),
             "W @ x^T": (lambda: weight @ x.T, fp32_bytes),
             "int8 weights, bf16 x": (lambda: torch.ops.aten._weight_int8pack_mm(x16, w8, s16), w8.numel() + V * 2)}
    return calls


def run(rows_list: list[int], reps: int, out: str) -> None:
    import torch

    from fastrl.bench.measure import quantiles
    from fastrl.bench.results import row, run_facts, write_csv

    g = torch.Generator().manual_seed(0)
    weight = torch.randn(V, H, generator=g) * 0.02  # [V, H]
    samples, errors, nbytes = {}, {}, {}
    for n in rows_list:
        x = torch.randn(n, H, generator=g)  # [n, H]
        exact = (x.double() @ weight.double().T)  # [n, V]
        for name, (call, size) in products(weight, x).items():
            if name.startswith("read") and n != rows_list[0]:
                continue  # one bandwidth row is enough
            samples[name, n] = timed(call, reps)
            nbytes[name, n] = size
            if not name.startswith("read"):
                got = call().double()  # [n, V], or [V, n] for W @ xᵀ
                got = got.T if name == "W @ x^T" else got
                errors[name, n] = float((got - exact).norm() / exact.norm())
    facts = run_facts(f"python bench/bench_skinny_gemm.py --rows {','.join(map(str, rows_list))} --reps {reps}")
    machine = load_note()
    rows = []
    for (name, n), times in samples.items():
        q = quantiles(times)
        config = {"V": V, "H": H, "reps": reps, "threads": torch.get_num_threads(),
                  "machine": machine, "weight_bytes": nbytes[name, n], "rel_error": errors.get((name, n))}
        base = dict(operation="head_product", provider=name, mode="forward", x_name="rows", x_value=n,
                    config=config, run=facts)
        rows.append(row(metric="time", unit="ms", values=[t * 1e3 for t in q], **base))
        rows.append(row(metric="GBps", unit="GB/s", values=[nbytes[name, n] / t / 1e9 for t in reversed(q)], **base))
        err = errors.get((name, n))
        print(f"{name}, {n} rows: {q[1] * 1e3:.0f} ms, {nbytes[name, n] / q[1] / 1e9:.1f} GB/s"
              + ("" if err is None else f", relative error {err:.1e}"))
    write_csv(rows, out)
    print(f"wrote {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", default="1,8,32,64", help="comma-separated rows multiplied at once")
    parser.add_argument("--reps", type=int, default=7, help="timed calls of each product")
    parser.add_argument("--out", default=os.path.join("bench", "results", "skinny_gemm.csv"))
    args = parser.parse_args()
    rows = [int(r) for r in args.rows.split(",")]
    if min(rows) < 1 or args.reps < 1:
        parser.error(f"--rows and --reps: expected values >= 1, got {args.rows} and {args.reps}")
    run(rows, args.reps, args.out)


if __name__ == "__main__":
    main()
