"""examples/math_reasoning.yaml and its data: the shipped problems are what the script writes, every answer is
right (re-derived here from the question's text), the example's rewards pay a right answer and not a wrong one,
and the config filters and trains end to end on CPU with the tiny model (fast settings as overrides)."""
import importlib.util
import json
import os
import re
from fractions import Fraction

import pytest

from fastrl import cli
from fastrl.rewards import accuracy_reward, think_format_reward
from fastrl.tasks.tiny_model import CHARACTERS

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "examples", "math_reasoning.yaml")
DATA = os.path.join(ROOT, "examples", "data", "math_word_problems.jsonl")
FAST = ["--max_steps", "2", "--max_completion_length", "8", "--bf16", "false", "--per_device_train_batch_size", "8",
        "--num_generations", "4", "--gradient_accumulation_steps", "1", "--dynamic_sampling_max_attempts", "2",
        "--gradient_checkpointing", "false", "--save_strategy", "no", "--disable_tqdm", "true",
        "--mask_truncated_completions", "false"]  # 8 tokens cut every tiny-model answer: all would be masked


@pytest.fixture(scope="module")
def maker():
    spec = importlib.util.spec_from_file_location("make_math_problems",
                                                  os.path.join(ROOT, "examples", "make_math_problems.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def rows():
    return [json.loads(line) for line in open(DATA)]


def test_shipped_file_is_what_the_script_writes(maker):
    with open(DATA) as f:
        assert f.read() == maker.to_jsonl(maker.make_problems(400, seed=0))


# ---------------------------------------------------------------- answers, re-derived from the text
def _ints(pattern: str, question: str) -> list[int]:
    match = re.search(pattern, question)
    assert match, (pattern, question)
    return [int(g) for g in match.groups()]


def solve(kind: str, q: str) -> Fraction:
    """The answer worked out from the question's words (independently of the generator's arithmetic)."""
    if kind == "speed":
        kmh, hours = re.search(r"goes (\d+) km per hour for ([\d.]+) hours", q).groups()
        return int(kmh) * Fraction(hours)
    rules = {
        "add_more": (r"has (\d+) \w+ and gets (\d+) more", lambda a, b: Fraction(a + b)),
        "give_away": (r"had (\d+) \w+ and gave away (\d+)", lambda a, b: Fraction(a - b)),
        "boxes": (r"holds (\d+) \w+\. How many \w+ are in (\d+) boxes", lambda a, n: Fraction(a * n)),
        "share": (r"^(\d+) \w+ are shared equally by (\d+) kids", lambda total, kids: Fraction(total, kids)),
        "shopping": (r"buys (\d+) books at \$(\d+) each and a bag for \$(\d+)", lambda n, p, bag: Fraction(n * p + bag)),
        "change": (r"pays \$(\d+) for (\d+) toys at \$(\d+) each", lambda paid, n, p: Fraction(paid - n * p)),
        "fraction_of": (r"holds (\d+) liters and is (\d+)/(\d+) full", lambda w, n, d: Fraction(w * n, d)),
        "fractions_together": (r"ate 1/(\d+) of a pie and \w+ ate 1/(\d+)", lambda a, b: Fraction(1, a) + Fraction(1, b)),
        "discount": (r"costs \$(\d+)\. It is (\d+)% off", lambda p, pct: Fraction(p * (100 - pct), 100)),
        "ages": (r"is (\d+) times as old as \w+, who is (\d+)\..* in (\d+) years",
                 lambda t, young, years: Fraction(t * young + years + young + years)),
        "think_of_number": (r"multiply it by (\d+) and add (\d+)\. I get (\d+)", lambda t, plus, got: Fraction(got - plus, t)),
    }
    pattern, rule = rules[kind]
    return rule(*_ints(pattern, q))


def read_solution(text: str) -> Fraction:
    frac = re.fullmatch(r"\\frac\{(\d+)\}\{(\d+)\}", text)
    return Fraction(int(frac.group(1)), int(frac.group(2))) if frac else Fraction(int(text))


def test_every_answer_is_right(rows):
    assert len(rows) == 400 and len({r["question"] for r in rows}) == 400
    for r in rows:
        answer = solve(r["kind"], r["question"])
        assert read_solution(r["solution"]) == answer, r
        assert answer >= 0
        if r["kind"] not in ("fractions_together",):
            assert answer.denominator == 1, r  # whole items, whole prices, exact shares
    assert {r["difficulty"] for r in rows} == {1, 2, 3, 4}


def test_prompts_use_the_template_and_fit_the_tiny_model(rows):
    for r in rows:
        assert r["prompt"].endswith("Assistant: <think>") and f"User: {r['question']}\n" in r["prompt"]
        assert len(r["prompt"]) <= 480  # one token per character: room for completions in 512 positions
        assert set(r["prompt"]) <= set(CHARACTERS)  # no character the tiny tokenizer lacks


def test_example_rewards_pay_right_answers_only(rows, maker):
    sample = rows[::10]
    prompts = [r["prompt"] for r in sample]
    solutions = [r["solution"] for r in sample]
    right = [f"I add it up. </think> The answer is \\boxed{{{s}}}." for s in solutions]
    wrong = [f"I add it up. </think> The answer is \\boxed{{{maker.latex(read_solution(s) + 1)}}}."
             for s in solutions]
    assert accuracy_reward(right, solution=solutions) == [1.0] * len(sample)
    assert accuracy_reward(wrong, solution=solutions) == [0.0] * len(sample)
    assert think_format_reward(right, prompts=prompts) == [1.0] * len(sample)
    assert think_format_reward([s for s in solutions], prompts=prompts) == [0.0] * len(sample)


# ---------------------------------------------------------------- the config, end to end on CPU
def test_filter_step_runs_on_the_example(tmp_path, capsys):
    subset = tmp_path / "subset.jsonl"
    subset.write_text("".join(open(DATA).readlines()[:4]))
    out = tmp_path / "filtered.jsonl"
    assert cli.main(["filter", CONFIG, "--k", "2", "--out", str(out), "--dataset", str(subset),
                     "--output_dir", str(tmp_path / "run"), *FAST]) == 0
    said = capsys.readouterr().out
    counts = [int(x) for x in re.search(r"(\d+) of 4 rows kept.*never solved (\d+), always solved (\d+), "
                                        r"unscorable (\d+), outside the bounds otherwise (\d+)", said).groups()]
    assert counts[0] + sum(counts[1:]) == 4
    assert len(out.read_text().splitlines()) == counts[0]


def test_example_trains_two_steps_on_cpu(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # the config names its data file relative to the repository root
    out = tmp_path / "run"
    assert cli.main(["train", CONFIG, "--output_dir", str(out), *FAST]) == 0
    metrics = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [m["step"] for m in metrics] == [1, 2]
    for m in metrics:
        assert 1 <= m["dynamic_sampling/attempts"] <= 2
        assert "rewards/accuracy_reward/mean" in m and "rewards/think_format_reward/mean" in m
        assert m["loss"] is not None
    assert os.path.exists(out / "model.safetensors")
