"""Run by tests/test_distributed.py under torchrun (2 CPU ranks, gloo): replicas' bucketed gradient average.

    python -m torch.distributed.run --nproc_per_node 2 tests/dist_buckets_worker.py SEED

Ragged parameters in fp32 and bf16 get random gradients, each rank its own (rank 0 leaves one without a gradient,
which counts as zero, as DDP counts it). fastrl.distributed.average_gradients averages them in buckets of 4 KiB
(several parameters a bucket, one parameter larger than a bucket alone) and in one bucket as large as all of them.
Checked on every rank against the mean computed here in float64 from both ranks' gradients (each rank draws the
other's from its seed): equal to the bit once cast to the parameter's dtype, which is exact for 2 ranks (the
fp32 sum of two fp32 or bf16 values is rounded once, the halving is exact); and both bucket sizes give the same
bits. Exit code 0 when every check holds.
"""
import os
import sys

import torch
import torch.distributed as dist

torch.set_num_threads(1)

from fastrl.distributed import average_gradients, gradient_buckets  # noqa: E402

SHAPES = [((7, 13), torch.float32), ((129,), torch.bfloat16), ((3, 5, 11), torch.float32), ((1500,), torch.float32),
          ((31, 17), torch.bfloat16), ((5,), torch.float32)]  # [1500] fp32 is 6000 B: over a 4 KiB bucket
NO_GRADIENT_ON_RANK_0 = 2
BUCKET = 4096


def gradients(seed: int, rank: int) -> list[torch.Tensor | None]:
    g = torch.Generator().manual_seed(seed * 10 + rank)
    grads = [torch.randn(shape, generator=g).to(dtype) for shape, dtype in SHAPES]
    if rank == 0:
        grads[NO_GRADIENT_ON_RANK_0] = None
    return grads


def averaged(seed: int, rank: int, bucket_size: int) -> list[torch.Tensor]:
    params = [torch.nn.Parameter(torch.zeros(shape, dtype=dtype)) for shape, dtype in SHAPES]
    for p, grad in zip(params, gradients(seed, rank)):
        p.grad = grad
    average_gradients(torch.nn.Linear(1, 1), params, bucket_size)
    return [p.grad for p in params]


def main(seed: int) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    sizes = [[p.numel() for p in b] for b in gradient_buckets([torch.zeros(s) for s, _ in SHAPES], BUCKET)]
    assert len(sizes) >= 3 and [1500] in sizes, sizes
    small, whole = averaged(seed, rank, BUCKET), averaged(seed, rank, 1 << 30)
    per_rank = [gradients(seed, r) for r in range(2)]
    for i, (shape, dtype) in enumerate(SHAPES):
        both = [torch.zeros(shape, dtype=torch.float64) if g[i] is None else g[i].double() for g in per_rank]
        truth = ((both[0] + both[1]) / 2).to(dtype)
        assert small[i].dtype == dtype and torch.equal(small[i], truth), (seed, i, (small[i] - truth).abs().max())
        assert torch.equal(whole[i], small[i]), (seed, i)
    print(f"rank {rank}: gradient buckets ok", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]))
