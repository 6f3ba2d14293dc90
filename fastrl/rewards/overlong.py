"""DAPO's soft overlong punishment (Yu et al. 2025, arXiv:2503.14476, Eq. 13), TRL's name and signature.

With L the completion length in tokens, L_max the maximum and C the cache (the width of the penalty ramp):

    0                        for L <= L_max - C
    (L_max - C - L) / C      for L_max - C < L <= L_max   (a straight line from 0 down to -1)
    -1                       for L > L_max

It is a reward added to the others, so it only ever lowers a completion's reward. Truncated completions can
instead be dropped from the loss with the config's `mask_truncated_completions`.
"""
from __future__ import annotations


def get_soft_overlong_punishment(max_completion_len: int, soft_punish_cache: int) -> "SoftOverlongPunishment":
    """A reward function `f(completion_ids, **kwargs) -> list[float]` applying DAPO's length penalty."""
    return SoftOverlongPunishment(max_completion_len, soft_punish_cache)


class SoftOverlongPunishment:
    """A class rather than a closure so the reward function pickles (it may be sent to another process)."""

    __name__ = "soft_overlong_punishment_reward"  # TRL's name, so logged metric keys match

    def __init__(self, max_completion_len: int, soft_punish_cache: int):
        if not isinstance(max_completion_len, int) or max_completion_len <= 0:
            raise ValueError(f"max_completion_len must be a positive int, got {max_completion_len!r}")
        if not isinstance(soft_punish_cache, int) or not 0 <= soft_punish_cache <= max_completion_len:
            raise ValueError(
                f"soft_punish_cache must be an int in [0, max_completion_len={max_completion_len}], "
                f"got {soft_punish_cache!r}"
            )
        self.max_completion_len = max_completion_len
        self.soft_punish_cache = soft_punish_cache

    def penalty(self, length: int) -> float:
        start = self.max_completion_len - self.soft_punish_cache
        if length <= start:
            return 0.0
        if length <= self.max_completion_len:  # only reachable when the cache is > 0
            return (start - length) / self.soft_punish_cache
        return -1.0

    def __call__(self, completion_ids=None, **kwargs) -> list[float]:
        if completion_ids is None:
            raise ValueError("completion_ids is required: the penalty counts completion tokens")
        return [self.penalty(len(ids)) for ids in completion_ids]
