"""Domain routing: a dataset column says which reward functions apply to each row.

    reward_funcs = route_rewards({"math": [accuracy_reward, think_format_reward],
                                  "code": [code_reward, think_format_reward]}, column="domain")
    # -> [accuracy_reward, think_format_reward, code_reward], each answering only for its own domains

The result is a list with one routed function per distinct reward function, in order of first appearance, so
each keeps its own logged metric and its own entry in `reward_weights` (same order). A routed function calls the
underlying one only on the rows of its domains (code is not run for math rows) and returns None for the other
rows; the trainer, like TRL's, leaves None out of the weighted sum, so a math row's reward is its math rewards
only. A row whose domain is not in `routes` is a ValueError, not a silent zero.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

# TRL's log_extra adds per-row columns to the completions table: a call on a subset of rows cannot use it.
# (trainer_state and log_metric are not per-row and pass through; per-row lists are cut to the rows.)
_WHOLE_BATCH_KWARGS = ("log_extra",)


def route_rewards(routes: dict[str, Sequence[Callable]], column: str = "domain") -> list["RoutedReward"]:
    """One routed reward function per distinct function in `routes` (domain -> reward functions)."""
    if not isinstance(routes, dict) or not routes:
        raise ValueError(f"routes must be a non-empty dict of domain -> list of reward functions, got {routes!r:.80}")
    if not isinstance(column, str) or not column:
        raise ValueError(f"column must be the name of a dataset column, got {column!r}")
    domains_of: dict[Callable, list[str]] = {}
    for domain, funcs in routes.items():
        if callable(funcs) or not all(callable(f) for f in funcs):
            raise ValueError(f"routes[{domain!r}] must be a list of reward functions, got {funcs!r:.80}")
        for func in funcs:
            domains_of.setdefault(func, []).append(domain)
    known = frozenset(routes)
    return [RoutedReward(func, domains, column, known) for func, domains in domains_of.items()]


class RoutedReward:
    """`func` applied to the rows whose `column` value is in `domains`; None for every other row."""

    def __init__(self, func: Callable, domains: Sequence[str], column: str, known_domains: frozenset = frozenset()):
        self.func, self.domains, self.column = func, frozenset(domains), column
        self.known_domains = known_domains | self.domains
        self.__name__ = getattr(func, "__name__", type(func).__name__)

    def __repr__(self) -> str:
        return f"RoutedReward({self.__name__}, domains={sorted(self.domains)}, column={self.column!r})"

    def _rows(self, labels, batch_size: int) -> list[int]:
        if labels is None or len(labels) != batch_size:
            raise ValueError(f"routing needs the dataset column {self.column!r} with one value per completion")
        unknown = sorted({str(x) for x in labels if x not in self.known_domains})
        if unknown:
            raise ValueError(f"column {self.column!r} has domains no reward is routed for: {unknown}; "
                             f"routed: {sorted(self.known_domains)}")
        return [i for i, label in enumerate(labels) if label in self.domains]

    def __call__(self, completions, **kwargs) -> list[float | None]:
        batch_size = len(completions)
        rows = self._rows(kwargs.get(self.column), batch_size)
        rewards: list[float | None] = [None] * batch_size
        if not rows:
            return rewards
        subset = {name: _take(value, rows, batch_size) for name, value in kwargs.items()
                  if name not in _WHOLE_BATCH_KWARGS}
        subset_rewards = self.func(completions=_take(completions, rows, batch_size), **subset)
        if len(subset_rewards) != len(rows):
            raise ValueError(f"reward function {self.__name__} returned {len(subset_rewards)} rewards "
                             f"for {len(rows)} completions")
        for row, reward in zip(rows, subset_rewards):
            rewards[row] = reward
        return rewards


def _take(value, rows: list[int], batch_size: int):
    """The chosen rows of a per-row list; anything that is not a per-row list passes through unchanged."""
    if isinstance(value, (list, tuple)) and len(value) == batch_size:
        return [value[i] for i in rows]
    return value
