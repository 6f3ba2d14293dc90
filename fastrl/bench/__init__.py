"""Benchmarks of fastrl against its peers: the kernel suite and the end-to-end (trainer) suite.

    fastrl bench [--suite kernels|e2e|all] [--quick] [--out bench/results]    (fastrl.bench.cli.main)
    python -m fastrl.bench.table bench/results/kernels.csv                   (README table from a CSV)
    pytest bench/ --benchmark-only                                          (the same kernel cases)

Modules: `cases` (what is measured: shapes, sweeps, inputs), `providers` (who is measured: fastrl and its peers,
each a function of the same inputs), `measure` (time quantiles, peak memory, the GEMM floor), `worker` (one fresh
process per measurement) and `jobs` (starting it, reading its result), `kernels` and `e2e` (the suites),
`results` (the long-format CSV), `plots`, `table`.
"""
