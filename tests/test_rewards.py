"""Rewards against hand-written cases, and against TRL's own reward functions where the rules are the same.

Sandboxed code execution has its own file (test_sandbox.py); here code_reward appears only inside routing.
"""
import math

import pytest
import torch

from fastrl.rewards import (REGISTRY, accuracy_reward, code_reward, get_soft_overlong_punishment, r1_zero_prompt,
                            route_rewards, think_format_reward)
from fastrl.rewards.format import has_think_format


def chat(text):
    return [{"role": "assistant", "content": text}]


# ------------------------------------------------------------------------------------------------- accuracy

EQUIVALENT = [  # (gold, completion): the same value written differently
    (r"\frac{1}{2}", r"The answer is \boxed{0.5}"),
    ("0.5", r"So we get \boxed{\frac{1}{2}}."),
    (r"\frac{1}{2}", r"\boxed{\dfrac{1}{2}}"),
    (r"\frac{1}{2}", r"\boxed{1/2}"),
    ("0.5", r"\boxed{0.50}"),
    ("3", r"\boxed{3.0}"),
    ("3", "The final answer is $3$."),
    ("$(x+1)^2$", r"\boxed{x^2+2x+1}"),
    (r"$\sqrt{2}$", r"\boxed{\frac{2}{\sqrt{2}}}"),
    ("10%", r"\boxed{10\%}"),
    ("42", r"<think>maybe \boxed{41}? no.</think> The answer is \boxed{42}"),
]

NEAR_MISSES = [  # (gold, completion): close, but wrong or not an answer
    ("0.5", r"\boxed{0.51}"),
    ("0.5", r"\boxed{5}"),
    ("3", r"\boxed{-3}"),
    ("$(x+1)^2$", r"\boxed{x^2+2x+2}"),
    (r"$\sqrt{2}$", r"\boxed{1.414}"),
    ("42", r"first \boxed{41} then \boxed{42}"),  # two answers are not one
    ("42", r"<think>it is \boxed{42}</think> The answer is \boxed{41}"),  # the final answer counts
    ("42", "no answer here"),
    ("3", "I think 3"),  # a bare number without an anchor or box is not an answer
]


@pytest.mark.parametrize("gold,completion", EQUIVALENT)
def test_accuracy_accepts_equivalent_forms(gold, completion):
    assert accuracy_reward([completion, chat(completion)], [gold, gold]) == [1.0, 1.0]


@pytest.mark.parametrize("gold,completion", NEAR_MISSES)
def test_accuracy_rejects_near_misses(gold, completion):
    assert accuracy_reward([completion, chat(completion)], [gold, gold]) == [0.0, 0.0]


@pytest.mark.parametrize("gold", ["hello world", "", r"\sqrt{2}", "unknown"])
def test_accuracy_unparseable_gold_is_none(gold):
    # r"\sqrt{2}" without $ delimiters is not read by math-verify: the row is skipped, not scored 0
    assert accuracy_reward([r"\boxed{1}"], [gold]) == [None]


def test_accuracy_matches_trl_where_the_rules_agree():
    trl_rewards = pytest.importorskip("trl.rewards")
    cases = [c for c in EQUIVALENT + NEAR_MISSES if "</think>" not in c[1]]
    cases += [("hello world", r"\boxed{1}")]
    completions = [chat(c) for _, c in cases]
    solutions = [g for g, _ in cases]
    assert accuracy_reward(completions, solutions) == trl_rewards.accuracy_reward(completions, solutions)


def test_accuracy_bad_input():
    with pytest.raises(ValueError, match="solution"):
        accuracy_reward([r"\boxed{1}"], None)
    with pytest.raises(ValueError, match="solution"):
        accuracy_reward([r"\boxed{1}", "x"], ["1"])
    with pytest.raises(ValueError, match="completions"):
        accuracy_reward([42], ["1"])


# --------------------------------------------------------------------------------------------- think format

FORMAT_GOOD = [
    "<think>\nadd the two numbers\n</think>\nThe answer is 5.",
    "<think>short</think>5",
    "  <think> leading space is fine </think> 5",
]
FORMAT_BAD = [
    "<think>reasoning</think>",  # no answer
    "<think>   </think> 5",  # no reasoning
    "reasoning </think> 5",  # never opened (and the prompt did not open it)
    "<think>reasoning 5",  # never closed
    "<think>one</think><think>two</think> 5",  # two blocks
    "<think>a <think> b</think> 5",  # nested open
    "<think>a</think> 5 </think>",  # stray close in the answer
    "The answer is 5. <think>after</think>",  # text before the block
]


def test_think_format_positive_and_negative():
    completions = FORMAT_GOOD + FORMAT_BAD
    expected = [1.0] * len(FORMAT_GOOD) + [0.0] * len(FORMAT_BAD)
    assert think_format_reward(completions) == expected
    assert think_format_reward([chat(c) for c in completions]) == expected


def test_think_format_agrees_with_trl_except_where_documented():
    trl_rewards = pytest.importorskip("trl.rewards")
    trl_accepts = {"  <think> leading space is fine </think> 5", "<think>reasoning</think>", "<think>   </think> 5",
                   "<think>a</think> 5 </think>"}  # empty parts, a stray </think>, leading space: TRL's rule differs
    completions = [chat(c) for c in FORMAT_GOOD + FORMAT_BAD if c not in trl_accepts]
    assert len(completions) == len(FORMAT_GOOD + FORMAT_BAD) - len(trl_accepts)
    assert think_format_reward(completions) == trl_rewards.think_format_reward(completions)


def test_r1_zero_prompt_opens_thinking_and_the_reward_reads_it():
    prompt = r1_zero_prompt("What is 2 + 3?")
    assert prompt.endswith("Assistant: <think>") and "What is 2 + 3?" in prompt
    completions = ["add them: 2 + 3 = 5 </think> The answer is \\boxed{5}", "<think>again</think> 5", "5"]
    assert think_format_reward(completions, prompts=[prompt] * 3) == [1.0, 0.0, 0.0]
    chat_prompt = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "<think>"}]
    assert think_format_reward([chat("plan </think> 5")], prompts=[chat_prompt]) == [1.0]
    assert accuracy_reward(completions[:1], ["5"]) == [1.0]
    with pytest.raises(ValueError, match="question"):
        r1_zero_prompt("  ")


def test_has_think_format_multiline_answer():
    assert has_think_format("<think>a\nb</think>\nline 1\nline 2")


# ------------------------------------------------------------------------------------------------ overlong

@pytest.mark.parametrize("length,expected", [
    (0, 0.0), (80, 0.0),  # up to L_max - cache: no penalty
    (81, -1 / 20), (90, -0.5), (99, -19 / 20), (100, -1.0),  # the ramp, -1 exactly at L_max
    (101, -1.0), (500, -1.0),  # beyond L_max
])
def test_overlong_penalty_at_the_boundaries(length, expected):
    penalty = get_soft_overlong_punishment(max_completion_len=100, soft_punish_cache=20)
    assert penalty(completion_ids=[[7] * length]) == [expected]


def test_overlong_matches_trl_and_takes_tensors():
    trl_rewards = pytest.importorskip("trl.rewards")
    ids = [[1] * n for n in (0, 5, 6, 7, 9, 10, 11, 30)]
    ours = get_soft_overlong_punishment(10, 4)
    assert ours(completion_ids=ids) == trl_rewards.get_soft_overlong_punishment(10, 4)(ids)
    assert ours(completion_ids=[torch.ones(8, dtype=torch.long)]) == [-0.5]
    assert ours.__name__ == "soft_overlong_punishment_reward"


def test_overlong_zero_cache_is_a_hard_cliff():
    penalty = get_soft_overlong_punishment(10, 0)
    assert penalty(completion_ids=[[1] * 10, [1] * 11]) == [0.0, -1.0]


@pytest.mark.parametrize("args,name", [((0, 0), "max_completion_len"), ((10, 11), "soft_punish_cache"),
                                       ((10, -1), "soft_punish_cache"), ((10.0, 2), "max_completion_len")])
def test_overlong_bad_arguments(args, name):
    with pytest.raises(ValueError, match=name):
        get_soft_overlong_punishment(*args)


# ------------------------------------------------------------------------------------------------- routing

def recording(log):
    """A real reward function (completion length) that records the rows it was called on."""
    def length_reward(completions, **kwargs):
        log.append(list(completions))
        return [float(len(c)) for c in completions]
    return length_reward


def test_routing_applies_each_function_only_to_its_domains():
    math_log, both_log = [], []
    math_only, both = recording(math_log), recording(both_log)
    funcs = route_rewards({"math": [math_only, both], "code": [both]}, column="domain")
    assert [f.__name__ for f in funcs] == ["length_reward", "length_reward"] and len(funcs) == 2
    completions, domain = ["a", "bb", "ccc"], ["math", "code", "math"]
    assert funcs[0](completions=completions, domain=domain) == [1.0, None, 3.0]
    assert math_log == [["a", "ccc"]]  # never called on the code row
    assert funcs[1](completions=completions, domain=domain) == [1.0, 2.0, 3.0]


def test_routing_passes_trainer_kwargs_like_trl():
    seen = {}

    def spy_reward(completions, trainer_state=None, log_metric=None, environments=None, **kwargs):
        seen.update(trainer_state=trainer_state, log_metric=log_metric, environments=environments,
                     has_log_extra="log_extra" in kwargs)
        return [1.0] * len(completions)

    (routed,) = route_rewards({"code": [spy_reward], "math": []})  # math rows: no reward here
    state, logger = object(), print
    out = routed(completions=["a", "b", "c"], domain=["math", "code", "code"], trainer_state=state,
                 log_metric=logger, log_extra=logger, environments=["e0", "e1", "e2"])
    assert out == [None, 1.0, 1.0]
    assert seen == {"trainer_state": state, "log_metric": logger, "environments": ["e1", "e2"],
                    "has_log_extra": False}


def test_text_of_content_parts():
    parts = [{"role": "assistant", "content": [{"type": "text", "text": "The answer is "},
                                               {"type": "text", "text": "\\boxed{7}"}]}]
    assert accuracy_reward([parts], ["7"]) == [1.0]


def test_routing_with_real_rewards_and_weights_like_trl():
    """Math rows get accuracy, code rows get code, both get format; weights combine as TRL does (nansum)."""
    funcs = route_rewards({"math": [accuracy_reward, think_format_reward],
                           "code": [code_reward, think_format_reward]}, column="domain")
    assert [f.__name__ for f in funcs] == ["accuracy_reward", "think_format_reward", "code_reward"]
    completions = [
        chat("<think>1+1</think> The answer is \\boxed{2}"),
        chat("<think>easy</think>\n```python\ndef add(a, b):\n    return a + b\n```"),
        chat("The answer is \\boxed{3}"),
    ]
    columns = {"domain": ["math", "code", "math"], "solution": ["2", None, "2"],
               "tests": [None, ["assert add(1, 2) == 3", "assert add(2, 2) == 5"], None],
               "prompts": ["p1", "p2", "p3"], "completion_ids": [[1], [2], [3]]}
    per_func = [f(completions=completions, **columns) for f in funcs]
    assert per_func == [[1.0, None, 0.0], [1.0, 1.0, 0.0], [None, 0.5, None]]
    table = torch.tensor([[math.nan if v is None else v for v in col] for col in per_func]).T  # [B, F]
    weights = torch.tensor([1.0, 0.25, 2.0])
    combined = (table * weights).nansum(dim=1)  # TRL's combination of reward functions
    assert combined.tolist() == [1.25, 1.25, 0.0]


def test_routing_bad_input():
    with pytest.raises(ValueError, match="routes"):
        route_rewards({})
    with pytest.raises(ValueError, match="routes"):
        route_rewards({"math": accuracy_reward})
    with pytest.raises(ValueError, match="column"):
        route_rewards({"math": [accuracy_reward]}, column="")
    (routed,) = route_rewards({"math": [think_format_reward]})
    with pytest.raises(ValueError, match="'domain'"):
        routed(completions=["x"])
    with pytest.raises(ValueError, match="physics"):
        routed(completions=["x"], domain=["physics"])


def test_registry_names_the_functions():
    assert REGISTRY == {"accuracy_reward": accuracy_reward, "think_format_reward": think_format_reward,
                        "code_reward": code_reward}
