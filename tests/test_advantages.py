"""group_advantages against the float64 reference (TRL's definition), NaN rewards excluded and zeroed."""
import pytest
import torch

from fastrl.kernels import group_advantages
from fastrl.kernels.reference import reference_group_advantages


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("groups,G", [(3, 2), (5, 8), (1, 16)])
def test_matches_reference(groups, G, scale):
    seed = torch.seed() % 2**31
    g = torch.Generator().manual_seed(seed)
    rewards = torch.randn(groups * G, generator=g) * 3
    rewards[rewards.abs() < 0.3] = float("nan")  # unscorable completions
    ours = group_advantages(rewards, G, scale_rewards=scale)
    ref = reference_group_advantages(rewards, G, scale)
    assert torch.isfinite(ours).all()
    assert torch.allclose(ours.double(), ref, atol=1e-5, rtol=1e-5), f"seed={seed}"
    assert torch.all(ours[torch.isnan(rewards)] == 0)
