"""The test formats code_reward reads and the comparisons the trusted parent makes (no sandbox involved)."""
import json
import random

import pytest

from fastrl.rewards.code_cases import Cases, output_matches, parse_tests, value_matches


def test_stdin_formats_agree():
    listed = [{"input": "1 2\n", "output": "3\n"}, {"input": "4 5\n", "output": "9\n"}]
    apps = {"inputs": ["1 2\n", "4 5\n"], "outputs": ["3\n", "9\n"]}
    want = Cases("stdin", ["1 2\n", "4 5\n"], ["3\n", "9\n"])
    for tests in (listed, apps, json.dumps(listed), json.dumps(apps)):
        assert parse_tests(tests, 0) == want


def test_call_formats_agree():
    want = Cases("call", ["add(1, 2)", "add((1,), (2,))"], [3, [1, 2]])
    for tests in ([{"call": "add(1, 2)", "expected": 3}, {"call": "add((1,), (2,))", "expected": (1, 2)}],
                  [["add(1, 2)", 3], ("add((1,), (2,))", [1, 2])],
                  ["assert add(1, 2) == 3", "assert add((1,), (2,)) == (1, 2), 'tuples become lists'"],
                  "assert add(1, 2) == 3\nassert add((1,), (2,)) == (1, 2)"):
        assert parse_tests(tests, 0) == want
    apps = {"fn_name": "add", "inputs": [[1, 2], [[1], [2]]], "outputs": [3, [1, 2]]}
    assert parse_tests(apps, 0) == Cases("call", ["add(*[1, 2])", "add(*[[1], [2]])"], [3, [1, 2]])


def test_rows_without_tests_and_trusted_sources():
    for empty in (None, [], "", {}):
        assert parse_tests(empty, 0) is None
    assert parse_tests(["x = 1\nassert x"], 0, trusted=True) == Cases("trusted", ["x = 1\nassert x"], None)


@pytest.mark.parametrize("tests, message", [
    (3, "tests\\[4\\] must be"),
    (["import os\nassert add(1, 2) == 3"], "trust_tests_in_process"),
    (["assert add(1, 2) > 2"], "not 'assert CALL == VALUE'"),
    (["assert add(1, 2) == x"], "must be a literal"),
    (["assert add(1, 2 == 3"], "does not parse"),
    ([{"call": "add(1,", "expected": 3}], "not a Python expression"),
    ([{"call": "f()", "expected": float("nan")}], "plain JSON data"),
    ([{"call": "f()", "expected": object()}], "plain JSON data"),
    ([{"input": 3, "output": "3"}], "each input must be a string"),
    ([{"input": "1"}, {"call": "f()", "expected": 1}], "all of one kind"),
    ({"inputs": ["1"], "outputs": []}, "one length"),
    ({"fn_name": "a b", "inputs": [[1]], "outputs": [1]}, "fn_name"),
    ("[not json", "does not parse"),
])
def test_bad_tests_name_the_row_and_the_problem(tests, message):
    with pytest.raises(ValueError, match=message):
        parse_tests(tests, 4)


def test_output_match_rules():
    assert output_matches("3\n", "3") and output_matches(" 1  2\n3 ", "1 2 3")
    assert not output_matches("3 4", "3") and not output_matches("", "3")
    assert output_matches("a \nb\n\n", "a\nb", "lines") and not output_matches("a b\n", "a  b", "lines")
    assert not output_matches("a\n\nb", "a\nb", "lines")
    assert output_matches("x\n", "x\n", "exact") and not output_matches("x", "x\n", "exact")
    assert not output_matches("1.0", "1") and output_matches("1.0", "1", float_tolerance=0.0)
    assert output_matches("0.3333333", "0.333333333", float_tolerance=1e-6)
    assert not output_matches("0.3334", "0.3333", float_tolerance=1e-6)
    assert output_matches("1000000.5", "1000000.0", float_tolerance=1e-6)  # relative above 1
    assert output_matches("nan", "nan", float_tolerance=1e-6)  # the same text, though not a finite number
    assert not output_matches("inf", "1e308", float_tolerance=0.5)
    assert output_matches("1.5 x\n", "1.50000001 x", "lines", 1e-6)


def test_value_match_rules():
    assert value_matches("3", 3) and value_matches("3.0", 3) and value_matches('{"a": [1, null]}', {"a": [1, None]})
    assert not value_matches("true", 1) and not value_matches("1", True) and not value_matches("0", False)
    assert not value_matches('"3"', 3) and not value_matches("[3]", 3) and not value_matches('{"a": 1}', {"b": 1})
    assert not value_matches("NaN", float("nan")) and not value_matches("Infinity", 1e400)
    assert not value_matches("", 3) and not value_matches(None, None) and not value_matches("3 4", 3)
    assert value_matches("0.30000000000000004", 0.3, float_tolerance=1e-9) and not value_matches("0.30000000000000004", 0.3)


def test_value_match_agrees_with_python_equality_on_random_plain_data():
    """On random nested plain data (no bools beside numbers), matching the JSON text is Python's ==."""
    rng = random.Random()
    seed = rng.randrange(2**32)
    rng.seed(seed)

    def plain(depth=0):
        kind = rng.randrange(6 if depth < 3 else 4)
        return [lambda: rng.randint(-5, 5), lambda: rng.choice("abc"), lambda: None,
                lambda: rng.choice([0.5, 1.25, -2.0]),
                lambda: [plain(depth + 1) for _ in range(rng.randrange(3))],
                lambda: {rng.choice("xyz"): plain(depth + 1) for _ in range(rng.randrange(3))}][kind]()

    for _ in range(500):
        a, b = plain(), plain()
        assert value_matches(json.dumps(a), b) == (a == b), (seed, a, b)
        assert value_matches(json.dumps(a), a), seed
