"""rollout/logprob_abs_diff and TRL's vLLM importance-sampling ratio (fastrl.generation.is_correction).

References: cases worked by hand, and a per-element float64 loop written from TRL 1.16's formulas
(GRPOTrainer._generate_and_score_completions, `vllm_importance_sampling_*`). No vLLM needed.
"""
import math

import pytest
import torch

from fastrl.generation.is_correction import IS_MODES, importance_sampling_ratio, logprob_abs_diff
from fastrl.importance_sampling import sampling_ratio

SAMPLER = torch.tensor([[-1.0, -2.0, -3.0]])
TRAINER = torch.tensor([[-1.5, -1.0, -7.0]])
MASK = torch.tensor([[1, 1, 0]])  # the third token is padding: its (large) difference must not count


def test_logprob_abs_diff_by_hand():
    assert logprob_abs_diff(SAMPLER, TRAINER, MASK) == pytest.approx(0.75)  # mean(0.5, 1.0)
    with_nan = SAMPLER.clone()
    with_nan[0, 0] = math.nan  # unknown sampler logprob: left out, not counted as 0
    assert logprob_abs_diff(with_nan, TRAINER, MASK) == pytest.approx(1.0)
    assert logprob_abs_diff(SAMPLER, TRAINER, torch.zeros_like(MASK)) == 0.0


@pytest.mark.parametrize("mode, clip_min, clip_max, expected", [
    # token ratios exp(trainer - sampler): exp(-0.5) = 0.6065, exp(1) = 2.7183, padding 1
    ("token_truncate", None, 2.0, [[math.exp(-0.5), 2.0, 1.0]]),
    ("token_mask", None, 2.0, [[math.exp(-0.5), 0.0, 1.0]]),
    ("token_truncate", 0.7, 3.0, [[0.7, math.exp(1.0), 1.0]]),
    # sequence ratio exp(-0.5 + 1) = 1.6487
    ("sequence_truncate", None, 1.5, [[1.5]]),
    ("sequence_mask", None, 1.5, [[0.0]]),
    ("sequence_mask", None, 3.0, [[math.exp(0.5)]]),
])
def test_ratio_by_hand(mode, clip_min, clip_max, expected):
    got = importance_sampling_ratio(SAMPLER, TRAINER, MASK, mode, clip_min, clip_max)
    torch.testing.assert_close(got, torch.tensor(expected), rtol=1e-6, atol=1e-6)


def loop_reference(sampler, trainer, mask, mode, lo, hi):
    """TRL's formula one element at a time, float64."""
    B, T = len(sampler), len(sampler[0])
    diffs = [[0.0 if (not mask[b][t] or math.isnan(sampler[b][t])) else trainer[b][t] - sampler[b][t]
              for t in range(T)] for b in range(B)]
    ratios = [[math.exp(sum(d))] for d in diffs] if mode.startswith("sequence") else \
        [[math.exp(x) for x in d] for d in diffs]
    out = []
    for row in ratios:
        new = []
        for r in row:
            if mode.endswith("truncate"):
                r = max(r, lo) if lo is not None else r
                r = min(r, hi) if hi is not None else r
            elif (lo is not None and r < lo) or (hi is not None and r > hi):
                r = 0.0
            new.append(r)
        out.append(new)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("mode", IS_MODES)
@pytest.mark.parametrize("clip_min, clip_max", [(None, 3.0), (0.5, 2.0), (None, None)])
def test_ratio_matches_a_loop_reference(mode, clip_min, clip_max):
    g = torch.Generator().manual_seed(0)
    B, T = 5, 7
    trainer = -torch.rand(B, T, generator=g, dtype=torch.float64) * 4
    sampler = trainer + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.4
    sampler[1, 2] = math.nan
    mask = (torch.rand(B, T, generator=g) < 0.8).long()
    got = importance_sampling_ratio(sampler, trainer, mask, mode, clip_min, clip_max)
    assert got.shape == ((B, 1) if mode.startswith("sequence") else (B, T))
    ref = loop_reference(sampler.tolist(), trainer.tolist(), mask.tolist(), mode, clip_min, clip_max)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)


def test_bad_input():
    with pytest.raises(ValueError, match="mode .* must be one of"):
        importance_sampling_ratio(SAMPLER, TRAINER, MASK, "token")
    with pytest.raises(ValueError, match=r"clip_min \(3.0\) must be less than clip_max \(2.0\)"):
        importance_sampling_ratio(SAMPLER, TRAINER, MASK, "token_mask", 3.0, 2.0)
    with pytest.raises(ValueError, match=r"must all be \[B, T\]"):
        logprob_abs_diff(SAMPLER, TRAINER[:, :2], MASK)
    nan_trainer = TRAINER.clone()
    nan_trainer[0, 1] = math.nan
    with pytest.raises(ValueError, match="trainer_logprobs holds NaN"):
        logprob_abs_diff(SAMPLER, nan_trainer, MASK)


# -- the trainer's function itself (fastrl.importance_sampling.sampling_ratio) --------------------------------------

def trl_ratio(old, sampler, mask, mode, clip_min, clip_max):
    """TRL 1.16's code (GRPOTrainer._generate_and_score_completions), copied as is."""
    per_token_logps_diff = torch.nan_to_num((old - sampler) * mask, nan=0.0)
    if mode in ["sequence_mask", "sequence_truncate"]:
        per_token_logps_diff = per_token_logps_diff.sum(dim=-1, keepdim=True)
    ratio = torch.exp(per_token_logps_diff)
    if mode in ["sequence_truncate", "token_truncate"]:
        return torch.clamp(ratio, min=clip_min, max=clip_max)
    min_val = clip_min if clip_min is not None else -math.inf
    max_val = clip_max if clip_max is not None else math.inf
    return ratio.masked_fill((ratio < min_val) | (ratio > max_val), value=0.0)


@pytest.mark.parametrize("mode", IS_MODES)
@pytest.mark.parametrize("clip_min, clip_max", [(None, 3.0), (0.5, 2.0), (0.9, None)])
def test_sampling_ratio_is_trls(mode, clip_min, clip_max):
    g = torch.Generator().manual_seed(1)
    old = -torch.rand(4, 6, generator=g, dtype=torch.float64) * 3
    sampler = old + torch.randn(4, 6, generator=g, dtype=torch.float64) * 0.5
    sampler[0, 1] = math.nan
    mask = (torch.rand(4, 6, generator=g) < 0.7).double()
    got = sampling_ratio(old, sampler, mask, mode, clip_min, clip_max)
    torch.testing.assert_close(got, trl_ratio(old, sampler, mask, mode, clip_min, clip_max), rtol=0, atol=0)


@pytest.mark.parametrize("mode", IS_MODES)
def test_sampling_ratio_without_bounds_is_the_plain_ratio(mode):
    # TRL's torch.clamp(min=None, max=None) raises; here no bound means nothing is clamped or masked
    old, sampler, mask = TRAINER.double(), SAMPLER.double(), MASK.double()
    got = sampling_ratio(old, sampler, mask, mode, None, None)
    diff = torch.tensor([[-0.5, 1.0, 0.0]], dtype=torch.float64)
    expected = diff.sum(-1, keepdim=True).exp() if mode.startswith("sequence") else diff.exp()
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("mode", ["token", "sequence", "mask", "token_clip", ""])
def test_sampling_ratio_unknown_mode_is_refused(mode):
    # it used to fall through to the *_mask branch
    with pytest.raises(ValueError, match="vllm_importance_sampling_mode must be one of token_truncate, token_mask, "
                                         "sequence_truncate, sequence_mask"):
        sampling_ratio(TRAINER, SAMPLER, MASK, mode, None, 3.0)
