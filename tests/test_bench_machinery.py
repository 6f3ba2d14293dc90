"""The benchmark machinery (fastrl.bench): CSV schema, floor arithmetic, memory of a known allocation, README
table and plots, and that every provider computes the same loss on the same inputs. Seconds, not a benchmark."""
import json
import os
import subprocess
import sys

import pytest
import torch

from fastrl.bench import measure
from fastrl.bench.cases import KernelCase, make_inputs, suite_cases, tiny_cases
from fastrl.bench.providers import PROVIDERS, providers_for
from fastrl.bench.results import COLUMNS, read_csv, row, write_csv
from fastrl.bench.table import render_table

RUN = {"device": "cpu: test", "versions": "{}", "timestamp": "2026-01-01T00:00:00+00:00", "command": "pytest", "commit": "abc123"}


def _rows(case: KernelCase):
    base = dict(operation=case.operation, mode=case.mode, x_name=case.x_name, x_value=case.x_value, run=RUN)
    cfg = case.config()
    return [
        row(provider="floor", metric="time", unit="ms", values=[0.9, 1.0, 1.1], config=cfg, **base),
        row(provider="fastrl-torch", metric="time", unit="ms", values=[1.9, 2.0, 2.2], config=cfg, **base),
        row(provider="fastrl-torch", metric="floor_ratio", unit="x", values=[1.9, 2.0, 2.2], config=cfg, **base),
        row(provider="fastrl-torch", metric="memory", unit="MiB", values=[10.0, 10.0, 10.0], config=cfg, **base),
        row(provider="torch-materialize", metric="time", unit="ms", values=[3.0, 4.0, 5.0], config=cfg, **base),
        row(provider="torch-materialize", metric="memory", unit="MiB", values=[200.0] * 3, config=cfg, **base),
        row(provider="fastrl-triton", metric="skipped", unit="", config={**cfg, "reason": "needs CUDA"}, **base),
    ]


def test_csv_has_the_long_format_columns_and_round_trips(tmp_path):
    case = KernelCase("grpo_loss", "full", B=2, T=8, H=16, V=64)
    path = write_csv(_rows(case), str(tmp_path / "k.csv"))
    with open(path) as f:
        assert f.readline().strip().split(",") == COLUMNS
    rows = read_csv(path)
    assert len(rows) == 7
    t = [r for r in rows if r["provider"] == "fastrl-torch" and r["metric"] == "time"][0]
    assert (t["p20"], t["p50"], t["p80"]) == (1.9, 2.0, 2.2)
    assert t["x_name"] == "V" and t["x_value"] == 64 and t["config"]["N"] == 16 and t["command"] == "pytest"
    skipped = [r for r in rows if r["metric"] == "skipped"][0]
    assert skipped["p50"] is None and skipped["config"]["reason"] == "needs CUDA"


def test_read_csv_refuses_a_foreign_csv(tmp_path):
    p = tmp_path / "x.csv"
    p.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="missing columns"):
        read_csv(str(p))


def test_floor_is_8NHV_at_the_measured_gemm_rate():
    case = KernelCase("grpo_loss", "full", B=2, T=8, H=16, V=64)
    N, H, V = case.N, case.H, case.V
    assert case.flops() == 8 * N * H * V
    assert case.flops("forward") == 2 * N * H * V and case.flops("backward") == 6 * N * H * V
    # the GEMM call does 6·N·H·V flops in 3 ms: full (8·N·H·V) takes 4 ms at that rate, forward 1 ms
    assert measure.floor_ms([3.0], case.flops(), N, H, V) == [pytest.approx(4.0)]
    assert measure.floor_ms([3.0], case.flops("forward"), N, H, V) == [pytest.approx(1.0)]
    assert measure.gemm_rate_gflops(1.0, N, H, V) == pytest.approx(6 * N * H * V / 1e-3 / 1e9)


def test_quantiles_match_numpy_linear_interpolation():
    np = pytest.importorskip("numpy")
    xs = [5.0, 1.0, 4.0, 2.0, 3.0, 10.0]
    assert measure.quantiles(xs) == pytest.approx(list(np.quantile(xs, [0.2, 0.5, 0.8])))


def test_interleaved_timing_gives_every_function_the_same_rounds():
    calls = []
    samples = measure.time_interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
                                       warmup=1, min_reps=4, max_reps=4, budget_s=0.0)
    assert len(samples["a"]) == len(samples["b"]) == 4
    assert calls[:2] == ["a", "b"] and calls[2:4] == ["a", "b"] and calls[4:6] == ["b", "a"]  # order rotates


MEMORY_SNIPPET = """
import json, torch
from fastrl.bench.measure import peak_rss_above
def alloc():
    t = torch.ones(64 * 2**20 // 4)  # 64 MiB, every page written
    return float(t[0])
peak_rss_above(alloc)  # warm-up
print(json.dumps([peak_rss_above(alloc) for _ in range(3)]))
"""


def test_peak_memory_of_a_known_allocation_in_a_fresh_process():
    if not measure.can_reset_peak_rss():
        pytest.skip("/proc/self/clear_refs is not writable here")
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    out = subprocess.run([sys.executable, "-c", MEMORY_SNIPPET], capture_output=True, text=True, env=env,
                         timeout=300, check=True)
    peaks = json.loads(out.stdout.strip().splitlines()[-1])
    for mib in peaks:  # 64 MiB of tensor, plus a little for the allocator and the interpreter
        assert 62.0 <= mib <= 72.0, peaks


def test_readme_table_from_the_csv(tmp_path):
    case = KernelCase("grpo_loss", "full", B=2, T=8, H=16, V=64)
    path = write_csv(_rows(case), str(tmp_path / "k.csv"))
    md = render_table(path)
    assert "| provider | time (ms) | time × fastrl-torch | floor_ratio (x) | memory (MiB) |" in md
    line = [ln for ln in md.splitlines() if ln.startswith("| torch-materialize")][0]
    assert "4 [3–5]" in line and "2.00" in line and "20.00" in line  # time and memory ratios to fastrl
    assert "- fastrl-triton: skipped, needs CUDA" in md
    assert "`pytest`" in md  # the command that made the numbers
    assert render_table(path, operation="logprobs").strip() == ""


def test_plots_are_written_next_to_the_csv(tmp_path):
    from fastrl.bench.plots import write_plots

    rows = []
    for v in (64, 128):
        rows += _rows(KernelCase("grpo_loss", "full", B=2, T=8, H=16, V=v))
    path = write_csv(rows, str(tmp_path / "k.csv"))
    pngs = write_plots(path, str(tmp_path), "kernels")
    assert [os.path.basename(p) for p in pngs] == ["kernels_grpo_loss_full_float32_vocab.png"]
    with open(pngs[0], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_suites_hold_the_headline_case_and_the_three_vocabularies():
    for quick in (True, False):
        cases = suite_cases(quick)
        assert cases[0] == KernelCase("grpo_loss", "full", B=8, T=256, H=256, V=32768, sweep="headline")
    assert {c.V for c in suite_cases(False) if c.sweep == "vocab"} == {32768, 65536, 151936}
    # --quick keeps the two ends of the vocabulary sweep (a plot and the memory-flat-in-V check need two) and logprobs
    quick = suite_cases(True)
    assert {c.V for c in quick if c.sweep == "vocab" and c.operation == "grpo_loss"} == {32768, 151936}
    assert {c.operation for c in quick} == {"grpo_loss", "logprobs"}
    full = suite_cases(False)
    assert {c.dtype for c in full} == {"float32", "bfloat16"} and {c.mode for c in full} == {
        "forward", "backward", "full"}


@pytest.mark.parametrize("operation", ["logprobs", "grpo_loss"])
def test_every_provider_that_runs_here_computes_the_same_value(operation):
    """Same inputs, same answer: otherwise the timings would compare different work."""
    case = KernelCase(operation, "full", B=2, T=8, H=32, V=300)
    values = {}
    for p in providers_for(operation):
        if p.unavailable(case, "cpu") or p.name == "liger-compiled":  # compiled: same math, minutes to compile
            continue
        x = make_inputs(case)
        loss = p.build(case)(x)
        grads = torch.autograd.grad(loss, [x["hidden"], x["weight"]])
        values[p.name] = (float(loss), grads)
    assert {"fastrl-torch", "torch-materialize", "trl-chunked"} <= set(values)
    ref_loss, ref_grads = values["fastrl-torch"]
    for name, (loss, grads) in values.items():
        assert loss == pytest.approx(ref_loss, rel=1e-4, abs=1e-5), name
        for g, r in zip(grads, ref_grads):
            torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5, msg=name)


def test_providers_that_cannot_run_here_say_why():
    case = KernelCase("logprobs", "full", B=2, T=8, H=32, V=300)
    if not torch.cuda.is_available():
        assert "CUDA" in PROVIDERS["fastrl-triton"].unavailable(case, "cpu")
        assert PROVIDERS["cce"].unavailable(case, "cpu")
    assert not PROVIDERS["liger"].applies("logprobs")


def test_a_tiny_suite_end_to_end_through_worker_processes(tmp_path):
    """Time + memory workers for one tiny case and two providers; the rows the CSV gets."""
    from fastrl.bench.kernels import Settings, run_kernel_suite

    settings = Settings.for_quick_run()
    settings.providers = ["fastrl-torch", "torch-materialize", "fastrl-triton"]
    case = tiny_cases()[-1]
    rows = run_kernel_suite(RUN, settings=settings, cases=[case], progress=False)
    got = {(r["provider"], r["metric"]) for r in rows}
    for p in ("fastrl-torch", "torch-materialize"):
        assert {(p, "time"), (p, "floor_ratio"), (p, "memory")} <= got
    assert ("floor", "time") in got and ("torch.mm", "gemm_rate") in got
    if not torch.cuda.is_available():
        assert ("fastrl-triton", "skipped") in got
    path = write_csv(rows, str(tmp_path / "kernels.csv"))
    assert "fastrl-torch" in render_table(path)


def test_goal_lines_state_the_ratio_and_the_miss():
    from fastrl.bench.cases import HEADLINE
    from fastrl.bench.goals import goal_lines

    base = dict(operation="grpo_loss", mode="full", x_name="V", x_value=32768, run=RUN, config=HEADLINE.config())
    rows = [row(provider="fastrl-torch", metric="time", unit="ms", values=[1.0, 1.0, 1.0], **base),
            row(provider="fastrl-torch", metric="floor_ratio", unit="x", values=[1.5, 1.5, 1.5], **base),
            row(provider="fastrl-torch", metric="memory", unit="MiB", values=[40.0] * 3, **base),
            row(provider="liger", metric="time", unit="ms", values=[2.0, 2.0, 2.0], **base),
            row(provider="torch-materialize", metric="time", unit="ms", values=[1.6, 1.6, 1.6], **base),
            row(provider="torch-materialize", metric="memory", unit="MiB", values=[800.0] * 3, **base)]
    for r in rows:
        r["config"] = json.loads(r["config"])
    text = "\n".join(goal_lines(rows))
    assert "fastest peer (torch-materialize, 1.6 ms): 0.62× (goal ≤ 1.00, aim 0.90): met" in text
    assert "GEMM floor: 1.50× (goal ≤ 1.30): missed by 1.15×" in text
    assert "= 5.0% (goal ≤ 10%): met" in text


def test_cli_writes_csv_plots_and_tables_with_the_command(monkeypatch, tmp_path, capsys):
    from fastrl.bench import cli, kernels

    def fake_suite(run, *, settings, quick, cases, progress):
        assert quick and cases is None and settings.quick and settings.providers == ["fastrl-torch"]
        rows = []
        for v in (64, 128):
            rows += _rows(KernelCase("grpo_loss", "full", B=2, T=8, H=16, V=v))
        return [{**r, "command": run["command"]} for r in rows]

    monkeypatch.setattr(kernels, "run_kernel_suite", fake_suite)
    argv = ["--suite", "kernels", "--quick", "--providers", "fastrl-torch", "--out", str(tmp_path), "--no-progress"]
    assert cli.main(argv) == 0
    rows = read_csv(str(tmp_path / "kernels-quick.csv"))
    assert rows[0]["command"] == "fastrl bench " + " ".join(argv)
    assert (tmp_path / "kernels-quick_grpo_loss_full_float32_vocab.png").exists()
    assert "| fastrl-torch |" in capsys.readouterr().out


def test_memory_beyond_grads_subtracts_dh_and_dw_in_the_input_dtype():
    c = KernelCase("grpo_loss", "full", B=2, T=8, H=16, V=64)
    assert c.grad_mib() == pytest.approx((16 * 16 + 64 * 16) * 4 / 2**20)
    assert KernelCase("grpo_loss", "forward", B=2, T=8, H=16, V=64).grad_mib() == 0.0
    assert KernelCase("grpo_loss", "full", B=2, T=8, H=16, V=64, dtype="bfloat16").grad_mib() == c.grad_mib() / 2


def test_git_commit_is_the_checkout_head():
    from fastrl.bench.results import git_commit

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    head = subprocess.run(["git", "-C", root, "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True)
    if head.returncode:
        assert git_commit() == "unknown"
    else:
        assert git_commit().split("-")[0] == head.stdout.strip()


def test_every_result_row_names_the_commit_it_measured():
    """bench/results/*.csv: a `commit` column, filled on every row (rows from before commits were recorded say
    so and name the commit that last wrote the file)."""
    import csv
    import glob

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    paths = glob.glob(os.path.join(root, "bench", "results", "*.csv"))
    assert paths
    for path in paths:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(line for line in f if not line.startswith("#")))
        assert rows and all(r.get("commit") for r in rows), os.path.basename(path)
