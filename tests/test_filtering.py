"""`fastrl filter`: pass rates on a task whose rates are known exactly, thresholds, resume after a crash.

The reward (helpers_rowrate.row_rate_reward) pays 1.0 to the first `solved` completions of each row's group of k,
whatever the completions say, so with k = 4 a row's pass rate is exactly solved / 4. Completions are still
sampled from a real tiny Llama by the trainer's own generator.
"""
import json
import math
import os

import pytest
import yaml

import helpers_tiny as tiny
from fastrl.filtering import filter_main, pass_rate

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
K = 4
# row id -> solved completions out of K; -1 = the reward returns None (unscorable)
SOLVED = [0, 1, 2, 3, 4, 0, 2, 4, -1, 1, 3, 2]
KEPT = [i for i, s in enumerate(SOLVED) if 0 < s < K]  # expected survivors of the default bounds


@pytest.fixture
def setup(tmp_path, monkeypatch):
    """A tiny model, a 12-row prompt file with known pass rates, a config; a log of every row scored."""
    monkeypatch.syspath_prepend(TESTS_DIR)
    log = tmp_path / "scored.log"
    monkeypatch.setenv("FASTRL_TEST_SCORE_LOG", str(log))
    monkeypatch.delenv("FASTRL_TEST_CRASH_AT_ID", raising=False)
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i}+{i}=", "id": i, "solved": s}) + "\n"
                            for i, s in enumerate(SOLVED)))
    config = {"model": tiny.save_tiny(str(tmp_path / "model")), "dataset": str(data),
              "rewards": ["helpers_rowrate:row_rate_reward"], "output_dir": str(tmp_path / "out"),
              "per_device_train_batch_size": 8, "num_generations": 4, "max_completion_length": 3, "bf16": False,
              "disable_tqdm": True}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return tmp_path, str(path), log


def scored_ids(log) -> list[int]:
    return [int(x) for x in log.read_text().split()] if log.exists() else []


def read_jsonl(path) -> list[dict]:
    return [json.loads(x) for x in open(path)]


def test_pass_rate_counts_only_scorable_completions():
    assert pass_rate([1.0, 0.0, math.nan, 1.0], solved_at=1.0) == pytest.approx(2 / 3)
    assert pass_rate([0.7, 0.2], solved_at=0.5) == 0.5
    assert pass_rate([math.nan, None], solved_at=1.0) is None


def test_known_pass_rates_drop_never_and_always_solved(setup, capsys):
    tmp_path, config, log = setup
    out = tmp_path / "filtered.jsonl"
    assert filter_main([config, "--k", str(K), "--batch-size", "3", "--out", str(out)]) == 0
    rows = read_jsonl(out)
    assert [r["id"] for r in rows] == KEPT  # order kept, rates 0 and 1 and the unscorable row gone
    assert [r["pass_rate"] for r in rows] == [SOLVED[i] / K for i in KEPT]
    assert all(set(r) == {"prompt", "id", "solved", "pass_rate"} for r in rows)
    assert sorted(scored_ids(log)) == list(range(len(SOLVED)))  # every row scored once
    said = capsys.readouterr().out
    assert "7 of 12 rows kept" in said and "never solved 2" in said and "always solved 2" in said
    assert "unscorable 1" in said

    # other bounds: only the scores are re-read, nothing is sampled or scored again
    assert filter_main([config, "--k", str(K), "--batch-size", "3", "--out", str(out),
                        "--min-pass", "0.25", "--max-pass", "0.75"]) == 0
    assert [r["id"] for r in read_jsonl(out)] == [i for i, s in enumerate(SOLVED) if s == 2]
    assert sorted(scored_ids(log)) == list(range(len(SOLVED)))


def test_default_output_path_sits_next_to_the_dataset(setup):
    tmp_path, config, _ = setup
    assert filter_main([config, "--k", str(K), "--max_completion_length", "2"]) == 0
    assert [r["id"] for r in read_jsonl(tmp_path / "prompts.filtered.jsonl")] == KEPT


def test_resume_after_crash_gives_the_same_output_and_scores_no_row_twice(setup, monkeypatch, capsys):
    tmp_path, config, log = setup
    straight, resumed = tmp_path / "straight.jsonl", tmp_path / "resumed.jsonl"
    args = [config, "--k", str(K), "--batch-size", "3"]
    assert filter_main([*args, "--out", str(straight)]) == 0
    log.unlink()

    monkeypatch.setenv("FASTRL_TEST_CRASH_AT_ID", "7")  # the third batch (rows 6-8) crashes
    assert filter_main([*args, "--out", str(resumed)]) == 1  # the CLI names the reward function that raised
    assert "reward function 'row_rate_reward' raised RuntimeError: simulated crash" in capsys.readouterr().err
    assert not resumed.exists()
    assert scored_ids(log) == [0, 1, 2, 3, 4, 5]
    partial = read_jsonl(str(resumed) + ".partial")
    assert [r["row"] for r in partial[1:]] == [0, 1, 2, 3, 4, 5]

    monkeypatch.delenv("FASTRL_TEST_CRASH_AT_ID")
    assert filter_main([*args, "--out", str(resumed)]) == 0
    assert sorted(scored_ids(log)) == list(range(len(SOLVED)))  # rows 0-5 were not scored again
    assert resumed.read_text() == straight.read_text()
    assert read_jsonl(str(resumed) + ".partial") == read_jsonl(str(straight) + ".partial")


def test_torn_last_line_is_dropped_and_that_row_rescored(setup):
    tmp_path, config, log = setup
    out = tmp_path / "filtered.jsonl"
    args = [config, "--k", str(K), "--batch-size", "4", "--out", str(out)]
    assert filter_main(args) == 0
    partial = str(out) + ".partial"
    lines = open(partial).read().split("\n")[:-1]
    # as if the crash hit while the last batch (rows 8-11) was written: row 10 half-written, row 11 missing
    with open(partial, "w") as f:
        f.write("\n".join(lines[:-2]) + "\n" + lines[-2][:10])
    log.unlink()
    assert filter_main(args) == 0
    assert scored_ids(log) == [10, 11]
    assert [r["id"] for r in read_jsonl(out)] == KEPT


def test_other_settings_do_not_reuse_partial_scores(setup, capsys):
    tmp_path, config, _ = setup
    out = tmp_path / "filtered.jsonl"
    assert filter_main([config, "--k", str(K), "--out", str(out)]) == 0
    assert filter_main([config, "--k", "2", "--out", str(out)]) == 2
    assert "k: 4 then, 2 now" in capsys.readouterr().err


@pytest.mark.parametrize("options, message", [
    (["--k", "0"], "--k: expected an integer >= 1"),
    (["--min-pass", "0.8", "--max-pass", "0.5"], "--min-pass/--max-pass"),
    (["--batch-size", "0"], "--batch-size"),
    (["--reward", "nope"], "--reward: 'nope' is not one of the configured reward functions"),
    (["--max_stepz", "3"], "unknown key(s) 'max_stepz'"),
], ids=["k", "bounds", "batch-size", "reward-name", "unknown-override"])
def test_bad_options_name_the_option(setup, capsys, options, message):
    tmp_path, config, _ = setup
    assert filter_main([config, "--out", str(tmp_path / "f.jsonl"), *options]) == 2
    assert message in capsys.readouterr().err


def test_output_must_not_overwrite_the_input(setup, capsys):
    tmp_path, config, _ = setup
    before = (tmp_path / "prompts.jsonl").read_text()
    assert filter_main([config, "--out", str(tmp_path / "prompts.jsonl")]) == 2
    assert "is the input dataset itself" in capsys.readouterr().err
    assert (tmp_path / "prompts.jsonl").read_text() == before


def test_a_partial_line_without_rewards_is_named(setup, capsys):
    tmp_path, config, _ = setup
    out = tmp_path / "filtered.jsonl"
    partial = str(out) + ".partial"
    args = [config, "--k", str(K), "--batch-size", "4", "--out", str(out)]
    assert filter_main(args) == 0
    lines = open(partial).read().split("\n")[:-1]
    lines[2] = json.dumps({"row": 1})  # a complete JSON line that is not a record
    open(partial, "w").write("\n".join(lines) + "\n")
    assert filter_main(args) == 2
    assert "holds an unreadable line '{\"row\": 1}'" in capsys.readouterr().err
