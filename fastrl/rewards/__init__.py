"""Reward functions with TRL's names and signatures: `f(completions, **dataset_columns) -> list[float | None]`.

Completions may be plain strings or chat message lists; None means "does not apply to this row" and the trainer
leaves it out. REGISTRY maps the names a config file uses to the functions (the factories
`get_soft_overlong_punishment` and `route_rewards` are called in code, not named in configs).
"""
from .code import CodeReward, code_reward, extract_code
from .format import r1_zero_prompt, think_format_reward
from .math import accuracy_reward
from .overlong import get_soft_overlong_punishment
from .routing import route_rewards
from .sandbox import CaseResult, SandboxLimits, SandboxUnavailable, check_isolation, run_cases

REGISTRY = {
    "accuracy_reward": accuracy_reward,
    "think_format_reward": think_format_reward,
    "code_reward": code_reward,
}

__all__ = [
    "REGISTRY", "CaseResult", "CodeReward", "SandboxLimits", "SandboxUnavailable", "accuracy_reward",
    "check_isolation", "code_reward", "extract_code", "get_soft_overlong_punishment", "r1_zero_prompt",
    "route_rewards", "run_cases", "think_format_reward",
]
