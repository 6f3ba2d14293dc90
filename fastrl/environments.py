"""TRL 1.16's `environment_factory` (trl/trainer/grpo_trainer.py): one environment instance per rollout.

A factory (or a {name: factory} dict, routed by each row's `environment` column) builds instances; each must have a
`reset(**row)` (its string return is appended to the last user message), its other public methods are the tools
of its rollout, and a `get_reward()` makes it a reward source (one reward column per environment class, weight 1,
None for rollouts of other classes). Instances are pooled: built once, reset for every rollout, and a pool grows
only when a batch needs more concurrent instances than it holds.
"""
from __future__ import annotations

import inspect
from typing import Callable

EMPTY_PROMPT = [{"role": "user", "content": ""}]  # TRL's placeholder prompt when the environment owns the data


class Environments:
    def __init__(self, environment_factory, standalone_tools: list[Callable]):
        self.multi = isinstance(environment_factory, dict)
        self.factories = environment_factory if self.multi else {None: environment_factory}
        self.tools_of: dict = {}  # environment name -> tools shown in its prompts (standalone + its methods)
        self.pool: dict = {}  # environment name -> instances
        self.reward_funcs, self.reward_names = [], []
        for name, factory in self.factories.items():
            if not callable(factory):
                raise ValueError(f"environment_factory: expected a callable (or a dict of callables), got "
                                 f"{factory!r}")
            instance = factory()
            members = dict(inspect.getmembers(type(instance), predicate=inspect.isfunction))  # class: no properties
            if "reset" not in members:
                raise ValueError("Each environment instance returned by `environment_factory` must define a callable "
                                 "`reset`.")
            self.tools_of[name] = list(standalone_tools) + methods(instance)
            self.pool[name] = [instance]
            if "get_reward" in members and type(instance).__name__ not in self.reward_names:
                self.reward_funcs.append(_reward_of(type(instance)))
                self.reward_names.append(type(instance).__name__)

    def all_tools(self) -> list[Callable]:
        """Every tool some environment exposes (what TRL's `self.tools` holds)."""
        out: list = []
        for tools in self.tools_of.values():
            out += [t for t in tools if getattr(t, "__func__", t) not in [getattr(o, "__func__", o) for o in out]]
        return out

    def draw(self, rows: list[dict]) -> tuple[list, list]:
        """One instance per row (from the pools, growing them when needed) -> (instances, environment names)."""
        names = [row.get("environment") if self.multi else None for row in rows]
        unknown = sorted({str(n) for n in names if n not in self.factories})
        if unknown:
            raise ValueError(f"Example has `environment={unknown[0]!r}`, which is not among the environments passed "
                             f"to `environment_factory`. Expected one of: {list(self.factories)}.")
        taken: dict = {}
        instances = []
        for name in names:
            index = taken.get(name, 0)
            if index == len(self.pool[name]):
                self.pool[name].append(self.factories[name]())
            taken[name] = index + 1
            instances.append(self.pool[name][index])
        return instances, names

    def reset(self, instances: list, rows: list[dict], prompts: list) -> list:
        """reset(**row) every instance -> the prompts with each observation appended to the last message."""
        out = []
        for instance, row, prompt in zip(instances, rows, prompts):
            kwargs = {k: v for k, v in row.items() if k != "environment"} if self.multi else row
            observation = instance.reset(**kwargs)
            if observation is None:
                out.append(prompt)
                continue
            if not isinstance(observation, str):
                raise ValueError(f"environment reset() returned {type(observation).__name__}; expected a string or "
                                 "None (multimodal observations are not supported)")
            if not isinstance(prompt, list) or not prompt:
                raise ValueError("train_dataset: an environment's observation is appended to the last chat message; "
                                 f"the prompt must be a list of messages, got {prompt!r:.100}")
            out.append(prompt[:-1] + [{**prompt[-1], "content": prompt[-1]["content"] + observation}])
        return out


def methods(instance) -> list[Callable]:
    """The instance's public methods other than reset and get_reward: its tools."""
    return [getattr(instance, n) for n, _ in inspect.getmembers(type(instance), predicate=inspect.isfunction)
            if n not in ("reset", "get_reward") and not n.startswith("_")]


def _reward_of(env_type: type) -> Callable:
    """A reward function scoring the rollouts of env_type by their instance's get_reward() (None for others)."""
    if inspect.iscoroutinefunction(env_type.get_reward):
        async def get_reward(environments, **kwargs):
            return [await e.get_reward() if type(e) is env_type else None for e in environments]
    else:
        def get_reward(environments, **kwargs):
            return [e.get_reward() if type(e) is env_type else None for e in environments]
    get_reward.__name__ = env_type.__name__
    return get_reward


def placeholder_dataset(args, environment_factory):
    """TRL's rule for train_dataset=None: allowed when a single environment owns the data (its reset() gives the
    prompt) and max_steps is set; the rows are empty user prompts, one generation batch's worth."""
    from datasets import Dataset

    if environment_factory is None:
        raise ValueError("`train_dataset` is required unless an `environment_factory` is provided.")
    if isinstance(environment_factory, dict):
        raise ValueError("A `dict` `environment_factory` (multiple environments) requires a `train_dataset` with an "
                         "`environment` column to route each example to its environment. Provide a dataset, or pass "
                         "a single environment factory.")
    if args.max_steps <= 0:
        raise ValueError("When training without a `train_dataset` (the environment owns the data and returns the "
                         "prompt from `reset()`), `max_steps` must be set to a positive value to define the training "
                         "length. Set it via `GRPOConfig(max_steps=...)`.")
    return Dataset.from_dict({"prompt": [EMPTY_PROMPT] * args.prompts_per_generation})
