"""examples/code_reward.yaml and its data: every shipped problem's tests are right (its reference solution scores
1.0 and a wrong program 0.0 through code_reward, as the trainer calls it), and the config trains end to end on
CPU with the tiny model, scoring every completion in the sandbox."""
import json
import os

import pytest

from fastrl import cli
from fastrl.rewards import code_reward

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "examples", "code_reward.yaml")
DATA = os.path.join(ROOT, "examples", "data", "code_problems.jsonl")


def fenced(code: str) -> str:
    return f"Here it is:\n```python\n{code}\n```"


def test_each_problem_pays_its_solution_and_not_a_wrong_program():
    rows = [json.loads(line) for line in open(DATA)]
    tests = [row["tests"] for row in rows]
    assert code_reward([fenced(row["solution"]) for row in rows], tests=tests) == [1.0] * len(rows)
    assert code_reward([fenced("print('wrong')\ndef add(a, b):\n    return None")] * len(rows), tests=tests) == \
        [0.0] * len(rows)
    kinds = {json.loads(t)[0].__class__.__name__ + ("-io" if "input" in t else "") for t in tests}
    assert kinds == {"dict-io", "dict", "str", "list"}  # stdin/stdout, call dicts, assert lines, pairs


def test_example_trains_on_cpu_with_the_sandbox(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # the config names its data file relative to the repository root
    calls = []
    import fastrl.rewards.code as code

    original = code.CodeReward.__call__

    def counted(self, completions, tests=None, **kwargs):
        calls.append(len(completions))
        return original(self, completions, tests=tests, **kwargs)

    monkeypatch.setattr(code.CodeReward, "__call__", counted)
    out = tmp_path / "run"
    assert cli.main(["train", CONFIG, "--output_dir", str(out), "--max_steps", "2", "--disable_tqdm", "true"]) == 0
    metrics = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [m["step"] for m in metrics] == [1, 2]
    assert all("rewards/code_reward/mean" in m and m["loss"] is not None for m in metrics)
    assert sum(calls) == 2 * 8  # every completion of both steps went through the sandboxed reward
