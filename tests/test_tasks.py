"""The built-in tasks: reward functions on hand-worked cases, dataset columns and answers checked against an
independent computation, determinism by seed, and errors that name the bad argument."""
import pytest

from fastrl.tasks import TASKS, Task, get_task
from fastrl.tasks.answer_rewards import completion_text, digit_accuracy, digits_only, exact_match

# ---------------------------------------------------------------- reward functions, worked by hand

ANSWER = ["1284"]


@pytest.mark.parametrize("completion, exact, accuracy, fmt", [
    ("1284", 1.0, 1.0, 1.0),  # right
    (" 1284\n", 1.0, 1.0, 1.0),  # surrounding whitespace ignored
    ("1294", 0.0, 3 / 4, 1.0),  # one digit wrong
    ("4821", 0.0, 0 / 4, 1.0),  # right digits, wrong places
    ("128", 0.0, 3 / 4, 3 / 4),  # one short: 3 of 4 positions right, 3 digits over answer length 4
    ("128456", 0.0, 4 / 6, 4 / 6),  # too long: 4 right, 4 digits in place, over length 6
    ("12a4", 0.0, 3 / 4, 3 / 4),  # malformed character
    ("", 0.0, 0.0, 0.0),  # empty
    ("abcdefgh", 0.0, 0.0, 0.0),  # no digits at all
])
def test_rewards_on_hand_worked_cases(completion, exact, accuracy, fmt):
    assert exact_match(completions=[completion], answer=ANSWER) == [exact]
    assert digit_accuracy(completions=[completion], answer=ANSWER) == [pytest.approx(accuracy)]
    assert digits_only(completions=[completion], answer=ANSWER) == [pytest.approx(fmt)]


def test_format_reward_penalizes_extra_characters():
    # "1284xx": 4 digits among 6 characters
    assert digits_only(completions=["1284xx"], answer=ANSWER) == [pytest.approx(4 / 6)]


def test_rewards_take_chat_completions_and_extra_columns():
    completions = [[{"role": "assistant", "content": "1284"}], [{"role": "assistant", "content": "0000"}]]
    kwargs = dict(prompts=["p", "q"], completion_ids=[[1], [2]], answer=["1284", "1284"], trainer_state=None)
    assert exact_match(completions=completions, **kwargs) == [1.0, 0.0]
    assert digit_accuracy(completions=completions, **kwargs) == [1.0, 0.0]
    assert digits_only(completions=completions, **kwargs) == [1.0, 1.0]


def test_rewards_reject_mismatched_lengths_and_bad_completions():
    with pytest.raises(ValueError, match="answer"):
        exact_match(completions=["1", "2"], answer=["1"])
    with pytest.raises(ValueError, match="completions"):
        completion_text(42)


# ---------------------------------------------------------------- datasets


def _solve(name: str, prompt: str) -> str:
    """An independent solver that parses the prompt text back."""
    body = prompt.rstrip("=")
    if name == "add":
        a, b = body.split("+")
        return str(int(a) + int(b))
    if name == "copy":
        return body
    operation, digits = body.split(" ")
    assert operation == name
    if name == "count":
        raise AssertionError("count answers are checked in test_count_answers")
    return {"reverse": "".join(reversed(digits)), "sort": "".join(sorted(digits))}[name]


@pytest.mark.parametrize("name", sorted(set(TASKS) - {"count"}))
def test_dataset_columns_and_answers(name):
    task = get_task(name, num_examples=200, min_digits=2, max_digits=5, seed=7)
    assert isinstance(task, Task)
    dataset = task.train_dataset
    assert dataset.column_names == ["prompt", "answer"] and len(dataset) == 200
    for row in dataset:
        assert row["answer"] == _solve(name, row["prompt"])
        assert row["answer"].isdigit()
    operands = [p.rstrip("=").split(" ")[-1].split("+")[0] for p in dataset["prompt"]]
    if name != "add":  # add drops leading zeros, so its operand lengths are not exact
        assert {len(o) for o in operands} == {2, 3, 4, 5}


def test_count_answers():
    dataset = get_task("count", num_examples=100, min_digits=1, max_digits=4, seed=3).train_dataset
    assert get_task("count", num_examples=1).train_dataset[0]["prompt"].startswith("count ")
    for row in dataset:
        start = int(row["prompt"].removeprefix("count "))
        digits = [int(ch) for ch in row["answer"]]
        assert digits[0] == (start + 1) % 10
        assert all(b == (a + 1) % 10 for a, b in zip(digits, digits[1:]))  # e.g. 8 -> "901"
    assert {len(a) for a in dataset["answer"]} == {1, 2, 3, 4}


@pytest.mark.parametrize("name", sorted(TASKS))
def test_reward_functions_and_weights(name):
    task = get_task(name, num_examples=10)
    assert [f.__name__ for f in task.reward_funcs] == ["digit_accuracy", "exact_match", "digits_only"]
    assert len(task.reward_weights) == len(task.reward_funcs)
    assert sum(task.reward_weights) == pytest.approx(1.0)
    answers = task.train_dataset["answer"]
    perfect = [sum(w * f(completions=answers, answer=answers)[i] for f, w in zip(task.reward_funcs,
                                                                              task.reward_weights))
               for i in range(len(answers))]
    assert perfect == [pytest.approx(1.0)] * len(answers)


def test_same_seed_same_data_other_seed_other_data():
    a = get_task("reverse", num_examples=50, seed=1).train_dataset
    b = get_task("reverse", num_examples=50, seed=1).train_dataset
    c = get_task("reverse", num_examples=50, seed=2).train_dataset
    assert a["prompt"] == b["prompt"] and a["answer"] == b["answer"]
    assert a["prompt"] != c["prompt"]


# ---------------------------------------------------------------- errors


def test_unknown_task_lists_the_known_ones():
    with pytest.raises(ValueError, match="task") as error:
        get_task("countdown9000")
    for name in TASKS:
        assert name in str(error.value)


@pytest.mark.parametrize("task_args, argument", [
    (dict(num_digits=3), "num_digits"),
    (dict(num_examples=0), "num_examples"),
    (dict(min_digits=0), "min_digits"),
    (dict(min_digits=4, max_digits=3), "max_digits"),
])
def test_bad_task_args_name_the_argument(task_args, argument):
    with pytest.raises(ValueError, match=argument):
        get_task("copy", **task_args)


# ---------------------------------------------------------------- the demo config


def test_demo_config_names_a_real_task_and_valid_fields():
    import inspect
    import os

    from fastrl.run_config import load_run_config, split_run_config
    from fastrl.tasks.tiny_model import build_tiny_model

    path = os.path.join(os.path.dirname(__file__), "..", "examples", "demo.yaml")
    run, config = split_run_config(load_run_config(path))
    assert run["model"] == "tiny"
    task = get_task(run["task"], **run["task_args"])
    assert config.per_device_train_batch_size % config.num_generations == 0
    longest = max(len(a) for a in task.train_dataset["answer"])
    assert config.max_completion_length >= longest  # room for the whole answer
    assert set(run["tiny_model"]) <= set(inspect.signature(build_tiny_model).parameters)
