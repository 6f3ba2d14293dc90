"""Small GRPO cases worked out by hand (ε = 0.2, one token, dapo normalizer 1), then the same facts through the
full fused function: which side of the clip each case is on, its loss, its gradient, its metrics."""
import math

import pytest
import torch

from fastrl.kernels import fused_linear_grpo_loss, group_advantages
from fastrl.kernels.grpo_epilogue import grpo_epilogue
from fastrl.kernels.params import GRPOLossParams

pytestmark = pytest.mark.usefixtures("poison_empty")


def one_token(log_ratio, adv, entropy=None, **params):
    logp = torch.tensor([-1.0])  # one completion of one token: cu_seqlens [0, 1]
    loss, g, g_entropy, metrics = grpo_epilogue(logp, torch.ones(1), torch.tensor([adv]), logp - log_ratio,
                                                params.pop("ref", None), None, entropy, torch.tensor([0, 1]),
                                                GRPOLossParams(**params))
    assert (g_entropy is None) == (params.get("entropy_coef") is None)
    out = {k: float(v) for k, v in metrics.items()}
    if g_entropy is not None:
        out["g_entropy"] = float(g_entropy)
    return float(loss), float(g), out


def test_vespo_gamma_weight():
    # w = e^0.5 (one token, no clamp), A = 1 ≥ 0: k = 2, λ = 3, φ = exp(3 + 2·0.5 − 3·e^0.5) ≈ 0.3883;
    # L = −φ·A·logp = 0.3883 (logp = −1) and dL/dlogp = −φ·A (φ held constant, as TRL's no_grad weight)
    loss, g, m = one_token(0.5, 1.0, loss_type="vespo")
    phi = math.exp(3 + 1.0 - 3 * math.exp(0.5))
    assert loss == pytest.approx(phi, rel=1e-6) and g == pytest.approx(-phi, rel=1e-6)
    assert m["vespo/phi_seq_mean"] == pytest.approx(phi, rel=1e-6)
    # A = −1 < 0: k = 3, λ = 2, φ = exp(2 + 3·0.5 − 2·e^0.5); L = −φ·(−1)·(−1) = −φ
    loss, g, _ = one_token(0.5, -1.0, loss_type="vespo")
    phi = math.exp(2 + 1.5 - 2 * math.exp(0.5))
    assert loss == pytest.approx(-phi, rel=1e-6) and g == pytest.approx(phi, rel=1e-6)


def test_off_policy_mask_drops_negative_advantage_far_sequences():
    # old − logp = 0.5 (log ratio −0.5, r = e^−0.5 ≈ 0.607, clipped at 0.8): with A = −1 the sequence is dropped
    # above threshold 0.4 (loss and gradient 0) and kept below 0.6 (L = −min(−0.607, −0.8) = 0.8, clipped)
    assert one_token(-0.5, -1.0, off_policy_mask_threshold=0.4)[:2] == (0.0, 0.0)
    assert one_token(-0.5, -1.0, off_policy_mask_threshold=0.6)[0] == pytest.approx(0.8, rel=1e-6)
    # A ≥ 0 is always kept: r = e^−0.5 inside no clip for A > 0, L = −r
    assert one_token(-0.5, 1.0, off_policy_mask_threshold=0.4)[0] == pytest.approx(-math.exp(-0.5), rel=1e-6)


def test_entropy_bonus():
    # r = 1, A = 1: policy L = −1; entropy 2 with coef 0.1: loss = −1 − 0.1·2, dL/dH = −0.1 (one token)
    loss, g, m = one_token(0.0, 1.0, entropy=torch.tensor([2.0]), entropy_coef=0.1)
    assert loss == pytest.approx(-1.2, rel=1e-6) and g == pytest.approx(-1.0, rel=1e-6)
    assert m["policy_loss"] == pytest.approx(-1.0) and m["g_entropy"] == pytest.approx(-0.1)
    assert (m["entropy_bonus/entropy"], m["entropy_bonus/tokens"]) == (2.0, 1.0)


def test_unclipped_ratio_1_1_advantage_2():
    # r = 1.1 inside [0.8, 1.2]: L = −r·A = −2.2 and dL/dlogp = −r·A = −2.2
    loss, g, m = one_token(math.log(1.1), 2.0)
    assert loss == pytest.approx(-2.2, rel=1e-6) and g == pytest.approx(-2.2, rel=1e-6)
    assert m["clip_ratio/region_mean"] == 0.0


def test_clipped_high():
    # r = e^0.5 ≈ 1.649 > 1.2 with A = 1: L = −1.2·1, constant in logp, so no gradient
    loss, g, m = one_token(0.5, 1.0)
    assert loss == pytest.approx(-1.2, rel=1e-6) and g == 0.0
    assert m["clip_ratio/high_mean"] == 1.0 and m["clip_ratio/low_mean"] == 0.0


def test_clipped_low():
    # r = 0.5 < 0.8 with A = −1: min(−0.5, −0.8) = −0.8, L = 0.8, clipped: no gradient
    loss, g, m = one_token(math.log(0.5), -1.0)
    assert loss == pytest.approx(0.8, rel=1e-6) and g == 0.0
    assert m["clip_ratio/low_mean"] == 1.0 and m["clip_ratio/region_mean"] == 1.0


def test_low_ratio_with_positive_advantage_is_not_clipped():
    # r = 0.5, A = 1: min(0.5, 0.8) = 0.5, L = −0.5, gradient −r·A = −0.5 (pessimistic bound keeps the slope)
    loss, g, m = one_token(math.log(0.5), 1.0)
    assert loss == pytest.approx(-0.5, rel=1e-6) and g == pytest.approx(-0.5, rel=1e-6)
    assert m["clip_ratio/region_mean"] == 0.0


def test_kl_only():
    # A = 0, β = 0.1, ref − logp = 0.5: k3 = e^0.5 − 0.5 − 1 = 0.148721, L = 0.0148721, dL/dlogp = β(1 − e^0.5)
    loss, g, m = one_token(0.0, 0.0, beta=0.1, ref=torch.tensor([-0.5]))
    assert loss == pytest.approx(0.1 * (math.exp(0.5) - 1.5), rel=1e-6)
    assert g == pytest.approx(0.1 * (1 - math.exp(0.5)), rel=1e-6)
    assert m["kl"] == pytest.approx(math.exp(0.5) - 1.5, rel=1e-6)


def test_delta_caps_the_unclipped_term():
    # r = 2 with A = −1 and delta = 1.5: min(−1.5, −1.2) = −1.5, L = 1.5 (capped at delta, so no gradient)
    loss, g, _ = one_token(math.log(2.0), -1.0, delta=1.5)
    assert loss == pytest.approx(1.5, rel=1e-6) and g == 0.0


def _tiny_batch(seed=0, B=4, T=5, H=8, V=11):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, T, H, generator=g, requires_grad=True)
    w = torch.randn(V, H, generator=g, requires_grad=True)
    return h, w, torch.randint(0, V, (B, T), generator=g)


def test_masked_rows_get_no_gradient_and_no_weight():
    h, w, y = _tiny_batch()
    mask = torch.ones(4, 5)
    mask[1] = 0.0
    mask[2, 3:] = 0.0
    loss, _ = fused_linear_grpo_loss(h, w, y, mask, torch.tensor([1.0, 5.0, -1.0, 0.5]), backend="torch")
    (gh,) = torch.autograd.grad(loss, (h,))
    assert torch.all(gh[1] == 0) and torch.all(gh[2, 3:] == 0) and gh[0].abs().sum() > 0
    # on-policy, r = 1: dapo loss = −Σ m·A / Σ m, so the masked row's large advantage does not enter
    assert float(loss) == pytest.approx(-(5 * 1.0 + 3 * -1.0 + 5 * 0.5) / 13, rel=1e-6)


def test_zero_variance_group_gives_zero_advantage_and_zero_gradient():
    rewards = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 0.0])
    adv = group_advantages(rewards, 4)
    assert torch.all(adv[:4] == 0)  # all-equal group: (r − mean) = 0, std = 0, 0 / (0 + eps) = 0
    # [1, 0, 1, 0]: mean 0.5, Bessel std = sqrt(4·0.25 / 3) = 0.57735, A = ±0.5 / (0.57735 + 1e-4)
    assert torch.allclose(adv[4:], torch.tensor([1.0, -1.0, 1.0, -1.0]) * 0.5 / (3 ** -0.5 + 1e-4), atol=1e-6)
    h, w, y = _tiny_batch(B=8)
    h_first = h[:4].detach().clone().requires_grad_(True)
    loss, _ = fused_linear_grpo_loss(h_first, w, y[:4], torch.ones(4, 5), rewards=rewards[:4], num_generations=4,
                                     backend="torch")
    (gh,) = torch.autograd.grad(loss, (h_first,))
    assert float(loss) == 0.0 and torch.all(gh == 0)


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_gradient_step_moves_logprob_with_the_advantage(sign):
    """A step against the gradient raises the sampled tokens' logprobs when A > 0 and lowers them when A < 0."""
    from fastrl.kernels import fused_linear_logprobs
    h, w, y = _tiny_batch(seed=3)
    adv = torch.full((4,), sign)
    loss, _ = fused_linear_grpo_loss(h, w, y, torch.ones(4, 5), adv, backend="torch")
    gh, gw = torch.autograd.grad(loss, (h, w))
    with torch.no_grad():
        before = fused_linear_logprobs(h, w, y, backend="torch").sum()
        after = fused_linear_logprobs(h - 0.05 * gh, w - 0.05 * gw, y, backend="torch").sum()
    assert (after - before) * sign > 0
