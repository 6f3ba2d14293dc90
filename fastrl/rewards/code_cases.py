"""The test formats code_reward reads, and the comparisons the trusted parent makes with what the sandbox returns.

A row's tests (the dataset column) take one of these forms:

- stdin/stdout cases (the APPS / CodeContests / LiveCodeBench form): a list of `{"input": str, "output": str}`,
  or APPS's `{"inputs": [...], "outputs": [...]}` (also as the JSON string APPS stores).
- function-call cases: a list of `{"call": "add(1, 2)", "expected": 3}` or of `[call, expected]` pairs; APPS's
  call-based `{"fn_name": "add", "inputs": [[1, 2]], "outputs": [3]}`; or `assert add(1, 2) == 3` lines (one
  string, or a list of them), parsed here into (call, expected) pairs. Expected values are plain JSON data.
- free-form Python test code: only with `trust_tests_in_process=True` (the verdict is then forgeable).

Any of the list or dict forms may come as a JSON string (as APPS stores it, and as a dataset column whose rows
differ in form must be stored).

The sandbox gets the inputs and calls only; expected outputs stay in the parent.
"""
from __future__ import annotations

import ast
import json
import math
from dataclasses import dataclass

OUTPUT_MATCHES = ("tokens", "lines", "exact")


@dataclass(frozen=True)
class Cases:
    """One row's cases: `inputs` go into the sandbox, `expected` stays here (None in trusted mode)."""

    mode: str  # "stdin", "call" or "trusted"
    inputs: list[str]  # stdin texts, call expressions, or test sources
    expected: list | None  # stdout texts, or plain JSON values


def parse_tests(tests, row: int, trusted: bool = False) -> Cases | None:
    """The row's cases, or None when the row has none (None or empty)."""
    if tests is None or (isinstance(tests, (list, tuple, dict, str)) and len(tests) == 0):
        return None
    if isinstance(tests, str) and tests.lstrip().startswith(("[", "{")):  # a JSON column, as APPS stores it
        tests = _json_column(tests, row)
    if isinstance(tests, dict):
        return _apps_cases(tests, row)
    items = [tests] if isinstance(tests, str) else tests
    if not isinstance(items, (list, tuple)):
        raise ValueError(f"tests[{row}] must be a list of cases, an APPS dict, or assert lines; "
                         f"got {type(tests).__name__}")
    if all(isinstance(item, str) for item in items):
        if trusted:
            return Cases("trusted", list(items), None)
        pairs = [pair for source in items for pair in _parse_asserts(source, row)]
    elif all(isinstance(item, dict) and {"input", "output"} <= item.keys() for item in items):
        return Cases("stdin", [_text(i["input"], row, "input") for i in items],
                     [_text(i["output"], row, "output") for i in items])
    elif all(isinstance(item, dict) and {"call", "expected"} <= item.keys() for item in items):
        pairs = [(item["call"], item["expected"]) for item in items]
    elif all(isinstance(item, (list, tuple)) and len(item) == 2 for item in items):
        pairs = [tuple(item) for item in items]
    else:
        raise ValueError(f"tests[{row}]: each case must be {{'input', 'output'}}, {{'call', 'expected'}}, a "
                         "[call, expected] pair or an 'assert CALL == VALUE' line, all of one kind")
    return Cases("call", [_call(call, row) for call, _ in pairs], [_plain(value, row) for _, value in pairs])


def _json_column(text: str, row: int):
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"tests[{row}] starts like JSON but does not parse: {exc}") from exc


def _apps_cases(tests: dict, row: int) -> Cases:
    inputs, outputs = tests.get("inputs"), tests.get("outputs")
    if not isinstance(inputs, list) or not isinstance(outputs, list) or len(inputs) != len(outputs):
        raise ValueError(f"tests[{row}]: an APPS dict needs 'inputs' and 'outputs' lists of one length")
    name = tests.get("fn_name")
    if name is None:
        return Cases("stdin", [_text(i, row, "input") for i in inputs], [_text(o, row, "output") for o in outputs])
    if not (isinstance(name, str) and name.isidentifier()):
        raise ValueError(f"tests[{row}]: fn_name must be a Python identifier, got {name!r}")
    calls = [f"{name}(*{json.dumps(args)})" if isinstance(args, list) else f"{name}({json.dumps(args)})"
             for args in inputs]
    return Cases("call", calls, [_plain(value, row) for value in outputs])


def _parse_asserts(source: str, row: int) -> list[tuple[str, object]]:
    """`assert CALL == VALUE` statements -> (CALL's source, VALUE); anything else is refused."""
    try:
        statements = ast.parse(source).body
    except SyntaxError as exc:
        raise ValueError(f"tests[{row}] does not parse as Python: {exc}") from exc
    pairs = []
    for statement in statements:
        test = statement.test if isinstance(statement, ast.Assert) else None
        if not (isinstance(test, ast.Compare) and len(test.ops) == 1 and isinstance(test.ops[0], ast.Eq)):
            raise ValueError(f"tests[{row}]: {ast.unparse(statement)!r} is not 'assert CALL == VALUE'; give "
                             "(call, expected) pairs, or pass trust_tests_in_process=True for free-form tests "
                             "(their verdict is decided inside the sandbox and can be forged)")
        try:
            expected = ast.literal_eval(test.comparators[0])
        except ValueError as exc:
            raise ValueError(f"tests[{row}]: the expected value in {ast.unparse(statement)!r} must be a literal")\
                from exc
        pairs.append((ast.unparse(test.left), expected))
    return pairs


def _text(value, row: int, field: str) -> str:
    if isinstance(value, list):  # some datasets store lines
        value = "\n".join(map(str, value))
    if not isinstance(value, str):
        raise ValueError(f"tests[{row}]: each {field} must be a string, got {type(value).__name__}")
    return value


def _call(call, row: int) -> str:
    if not isinstance(call, str):
        raise ValueError(f"tests[{row}]: a call must be a string such as 'add(1, 2)', got {type(call).__name__}")
    try:
        ast.parse(call, mode="eval")
    except SyntaxError as exc:
        raise ValueError(f"tests[{row}]: the call {call!r} is not a Python expression") from exc
    return call


def _plain(value, row: int):
    """`value` as JSON will bring it back (tuples become lists); ValueError if it is not plain data."""
    try:
        return json.loads(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"tests[{row}]: expected values must be plain JSON data, got {value!r}") from exc


# ---------------------------------------------------------------------------------------------- comparisons

def output_matches(actual: str, expected: str, how: str = "tokens", float_tolerance: float | None = None) -> bool:
    """stdout against the expected output. "tokens": whitespace-separated tokens equal (the usual judge rule);
    "lines": lines equal after trailing spaces and trailing empty lines are dropped; "exact": byte for byte.
    With float_tolerance, tokens that both read as finite numbers may differ by tolerance x max(1, |expected|)
    (Codeforces-style absolute-or-relative error); in "lines", a line that differs is then read token by token."""
    if how == "exact":
        return actual == expected
    if how == "lines":
        got, want = (text.rstrip().split("\n") for text in (actual, expected))
        return len(got) == len(want) and all(
            g.rstrip() == w.rstrip() or (float_tolerance is not None and _tokens_match(g.split(), w.split(),
                                                                                       float_tolerance))
            for g, w in zip(got, want))
    return _tokens_match(actual.split(), expected.split(), float_tolerance)


def _tokens_match(got: list[str], want: list[str], tolerance: float | None) -> bool:
    return len(got) == len(want) and all(g == w or _close(g, w, tolerance) for g, w in zip(got, want))


def _close(got: str, want: str, tolerance: float | None) -> bool:
    if tolerance is None:
        return False
    try:
        a, b = float(got), float(want)
    except ValueError:
        return False
    return math.isfinite(a) and math.isfinite(b) and abs(a - b) <= tolerance * max(1.0, abs(b))


def value_matches(returned: str | None, expected, float_tolerance: float | None = None) -> bool:
    """The JSON text the sandbox returned against the expected value. Strict JSON only (no NaN or Infinity);
    bool is not a number; int and float compare by value (and within float_tolerance when given)."""
    if returned is None:
        return False
    try:
        value = json.loads(returned, parse_constant=_refuse_constant)
    except ValueError:
        return False
    return _same(value, expected, float_tolerance)


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not plain data")


def _same(a, b, tolerance: float | None) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b or (tolerance is not None and abs(a - b) <= tolerance * max(1.0, abs(b)))
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y, tolerance) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k], tolerance) for k in a)
    return type(a) is type(b) and a == b  # str, None
