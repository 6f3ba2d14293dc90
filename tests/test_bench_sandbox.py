"""The code-sandbox benchmark (python -m fastrl.bench.sandbox) runs, in its quick form, and writes rows that say
the trivial programs all scored 1.0 and this process kept its descriptors."""
from fastrl.bench.results import read_csv
from fastrl.bench.sandbox import main


def test_quick_sandbox_benchmark_writes_its_rows(tmp_path):
    out = tmp_path / "sandbox.csv"
    assert main(["--quick", "--out", str(out)]) == 0
    rows = read_csv(str(out))
    value = {(r["mode"], r["x_value"], r["metric"]): r["p50"] for r in rows}
    for workers in (1, 2, 4):
        assert value[("trivial", workers, "mean_reward")] == 1.0
        assert value[("trivial", workers, "completions_per_s")] > 0
    # 80% of a 0.25 s limit: on a loaded machine a case can run past it (the committed run lost 2 of 640)
    assert 0.5 <= value[("near-limit", 2, "mean_reward")] <= 1.0
    assert value[("near-limit", 2, "completions_per_s")] > 0
    assert value[("flat", 1, "fds_last")] == value[("flat", 1, "fds_first")]
    assert all(r["config"]["commit"] is not None and r["config"]["isolation"] == "bwrap" for r in rows)
