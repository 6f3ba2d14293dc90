"""Issue 6's memory benchmark under pytest-benchmark: two GRPO steps of fastrl's and TRL's GRPOTrainer on the
Llama L2-H256-V32768 model, 16 completions of 256 tokens, beta 0.04, each run in a fresh process
(fastrl.bench.memory). Opt-in: runs only when FASTRL_BENCH is set (quick: full fine-tuning; full: + LoRA); the
benchmarked time is the whole fresh-process run, the peak memory above the built trainer goes to extra_info.
The CSV, the PNG and the longest-completion search under a memory limit come from `python -m fastrl.bench.memory`.
"""
import os

import pytest

from _bench_env import quick
from fastrl.bench.memory import MODEL, RUN, TRAINERS, model_dir, run_child

if not os.environ.get("FASTRL_BENCH"):
    pytest.skip("the memory benchmark is opt-in: set FASTRL_BENCH=quick or full (each run ~1 min)",
                allow_module_level=True)

MODES = ("full",) if quick() else ("full", "lora")
PAIRS = [(m, t) for m in MODES for t in TRAINERS]


@pytest.mark.parametrize("mode,trainer", PAIRS, ids=[f"{m}-{t}" for m, t in PAIRS])
def test_peak_memory(benchmark, mode, trainer):
    pytest.importorskip(trainer)
    job = {"trainer": trainer, "mode": mode, "length": RUN["max_completion_length"], "model_dir": model_dir()}
    out = {}
    benchmark.pedantic(lambda: out.update(run_child(job)), rounds=1, iterations=1)
    benchmark.extra_info.update({**MODEL, **RUN, "mode": mode, **out})
