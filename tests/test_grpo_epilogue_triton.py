"""The Triton GRPO epilogue (interpreted on CPU) against the PyTorch epilogue and the float64 reference, on
packed rows (sequence b at cu_seqlens[b]:cu_seqlens[b+1]) with ragged random lengths.

Two checks on fresh random inputs (lengths drawn in [0, 60] with one empty completion, one completion fully
masked, one with zero advantage, ratios far enough from 1 that both clip sides trigger):
- against kernels/grpo_epilogue.py, which derives g = dL/dlogp by autograd where the kernel uses closed forms:
  same fp32 inputs, so loss, g and every metric agree to fp32 rounding of sums over ≤ N ≈ 300 tokens
  (atol 2e-6 on values of order 1, rtol 1e-5);
- end to end against kernels/reference.py (float64, materializing, autograd, reading the same packed rows):
  Triton forward sweep → epilogue → gradient sweep, fp32 inputs; loss and metrics to rtol 1e-5, gradients of
  hidden and weight to 1e-5 of their largest entry (fp32 logits, lse and dz; logits here are O(1), so fp32
  rounding is ~1e-7 relative per term).
"""
import itertools

import pytest
import torch

from fastrl.kernels.forward_sweep_triton import forward_sweep
from fastrl.kernels.grad_sweep_triton import grad_sweep
from fastrl.kernels.grpo_epilogue import grpo_epilogue as torch_epilogue
from fastrl.kernels.grpo_epilogue_triton import grpo_epilogue
from fastrl.kernels.params import GRPOLossParams, LogitTransform, VespoParams
from fastrl.kernels.reference import reference_grpo_loss, reference_logprobs

pytestmark = pytest.mark.usefixtures("poison_empty")

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo")


def ragged_lengths(batch, max_length, seed):
    """B completion lengths in [1, max_length] (sequence 3 empty) -> cu_seqlens [B + 1] int64."""
    lengths = torch.randint(1, max_length + 1, (batch,), generator=torch.Generator().manual_seed(seed))
    lengths[3] = 0
    return torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])


def _epilogue_inputs(cu_seqlens, seed):
    """Per-row [N] logp, mask, old, ref, entropy; advantages [B]; is_ratio per row ("bt") or per sequence ("b1")."""
    g = torch.Generator().manual_seed(seed)
    batch, n = cu_seqlens.numel() - 1, int(cu_seqlens[-1])
    logp = -torch.rand(n, generator=g) * 3  # [N]
    mask = (torch.rand(n, generator=g) > 0.25).float()
    mask[cu_seqlens[1]:cu_seqlens[2]] = 0.0  # a fully masked completion
    adv = torch.randn(batch, generator=g)
    adv[2] = 0.0  # a zero-variance group gives zero advantage
    old = logp + torch.randn(n, generator=g) * 0.3  # ratios e^±0.3: both clip sides
    ref = logp + torch.randn(n, generator=g) * 0.3
    entropy = torch.rand(n, generator=g) * 2
    is_ratio = {"bt": torch.rand(n, generator=g) + 0.5, "b1": torch.rand(batch, 1, generator=g) + 0.5}
    return logp, mask, adv, old, ref, entropy, is_ratio


def _sampling(old, seed):
    """vLLM-like sampling logprobs near the old ones, one unscored (NaN): the off-policy mask's other source."""
    samp = old + torch.randn(old.shape, generator=torch.Generator().manual_seed(seed + 3)) * 0.2
    samp[0] = float("nan")
    return samp


def _params(loss_type, level, length, **kw):
    eps_high = 3.0 if loss_type == "cispo" else 0.28  # cispo's ε_high is a cap on r (TRL's default 5.0)
    return GRPOLossParams(loss_type=loss_type, importance_sampling_level=level, epsilon_low=0.2,
                          epsilon_high=eps_high, max_completion_length=length + 3, **kw)


# Every loss type × IS level with the common options, then each remaining option on its own.
CASES = [dict(loss_type=lt, level=lvl, beta=0.04, is_ratio="bt") for lt, lvl in
         itertools.product(LOSS_TYPES, ("token", "sequence"))]
CASES += [
    dict(loss_type="dapo", level="token"),  # no KL, no IS, on-policy checked separately
    dict(loss_type="grpo", level="token", beta=0.04, use_bias_correction_kl=True),
    dict(loss_type="grpo", level="sequence", beta=0.04, use_bias_correction_kl=True, is_ratio="b1"),
    dict(loss_type="bnpo", level="token", delta=1.1),
    dict(loss_type="dapo", level="sequence", delta=1.1, num_items_in_batch=150.0),
    dict(loss_type="cispo", level="token", num_items_in_batch=90.0, is_ratio="b1"),
    dict(loss_type="grpo", level="token", top_entropy_quantile=0.6, beta=0.04),
    dict(loss_type="sapo", level="sequence", top_entropy_quantile=0.3),
    dict(loss_type="dapo", level="token", on_policy=True, beta=0.04),
    dict(loss_type="grpo", level="sequence", on_policy=True),
    dict(loss_type="vespo", level="token", vespo=VespoParams(1.5, 0.5, 4.0, 6.0)),
    dict(loss_type="vespo", level="sequence", on_policy=True, is_ratio="bt"),
    dict(loss_type="bnpo", level="token", off_policy_mask_threshold=0.0, beta=0.04),
    dict(loss_type="grpo", level="sequence", off_policy_mask_threshold=0.02, sampling=True),
    dict(loss_type="dapo", level="token", on_policy=True, off_policy_mask_threshold=-0.01),  # every A < 0 dropped
    dict(loss_type="grpo", level="sequence", entropy_coef=0.1, beta=0.04),
    dict(loss_type="dapo", level="token", entropy_coef=0.2, top_entropy_quantile=0.5),
    dict(loss_type="vespo", level="token", is_ratio="bt", off_policy_mask_threshold=0.05, sampling=True,
         entropy_coef=0.1),
]


def _case_id(c):
    return "-".join(f"{k}={v}" if not isinstance(v, bool) else k for k, v in c.items())


def _split_case(case, length):
    """-> (params, is_ratio kind, on_policy, with sampling logprobs)."""
    case = dict(case)
    loss_type, level = case.pop("loss_type"), case.pop("level")
    isr_kind, on_policy, sampling = case.pop("is_ratio", None), case.pop("on_policy", False), case.pop("sampling",
                                                                                                        False)
    return _params(loss_type, level, length, **case), isr_kind, on_policy, sampling


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_matches_torch_epilogue(case):
    seed = torch.seed() % 2**31
    cu = ragged_lengths(7, 60, seed)
    logp, mask, adv, old, ref, entropy, is_ratio = _epilogue_inputs(cu, seed)
    p, isr_kind, on_policy, sampling = _split_case(case, 60)
    args = (logp, mask, adv, None if on_policy else old, ref if p.beta else None,
            None if isr_kind is None else is_ratio[isr_kind], entropy, cu, p, _sampling(old, seed) if sampling else None)
    loss, g, g_entropy, metrics = grpo_epilogue(*args)
    want_loss, want_g, want_g_entropy, want_metrics = torch_epilogue(*args)
    assert loss.shape == () and loss.dtype == torch.float32 and g.shape == logp.shape
    tol = dict(rtol=1e-5, atol=2e-6)
    assert torch.allclose(loss, want_loss, **tol), f"seed={seed}: {float(loss)} vs {float(want_loss)}"
    assert torch.allclose(g, want_g, **tol), f"seed={seed}: max |Δg| {float((g - want_g).abs().max()):.3g}"
    assert (g_entropy is None) == (want_g_entropy is None) == (p.entropy_coef is None)
    if g_entropy is not None:
        assert torch.allclose(g_entropy, want_g_entropy, **tol), f"seed={seed}"
    assert torch.count_nonzero(g[cu[1]:cu[2]]) == 0  # the fully masked completion
    assert metrics.keys() == want_metrics.keys()
    for name, value in metrics.items():
        assert torch.allclose(value, want_metrics[name], **tol), f"{name} seed={seed}"


def test_clipping_actually_happens_in_these_inputs():
    """Guards the comparison above against inputs where every ratio sits inside the clip range."""
    cu = ragged_lengths(7, 60, 0)
    logp, mask, adv, old, ref, entropy, _ = _epilogue_inputs(cu, 0)
    _, _, _, metrics = grpo_epilogue(logp, mask, adv, old, None, None, entropy, cu, _params("dapo", "token", 60))
    assert float(metrics["clip_ratio/low_mean"]) > 0 and float(metrics["clip_ratio/high_mean"]) > 0
    # and the off-policy mask of the cases above drops some sequences but not all: the loss changes
    masked = _params("bnpo", "token", 60, off_policy_mask_threshold=0.0)
    kept, dropped = (float(grpo_epilogue(logp, mask, adv, old, None, None, entropy, cu, q)[0])
                     for q in (_params("bnpo", "token", 60), masked))
    assert abs(kept - dropped) > 1e-4 and dropped != 0.0


E2E_CASES = [
    dict(loss_type="dapo", level="token", beta=0.04, is_ratio="bt"),
    dict(loss_type="grpo", level="sequence", beta=0.04, use_bias_correction_kl=True),
    dict(loss_type="cispo", level="token", is_ratio="b1"),
    dict(loss_type="sapo", level="token", top_entropy_quantile=0.5),
    dict(loss_type="dr_grpo", level="sequence", delta=1.1),
    dict(loss_type="bnpo", level="token", on_policy=True, beta=0.04),
    # VESPO's φ = exp(λ + k·log w − λ·w) turns an error δ of log w = Σ_t (logp − old) into a relative error
    # |k − λ·w|·δ: with fp32 logprobs (δ ≈ T·1e-7) a spread of old near 0.3·√T puts that above this test's 1e-5,
    # so here old is drawn at 0.05 (w near 1); VESPO with is_ratio is checked against the torch epilogue above
    dict(loss_type="vespo", level="token", beta=0.04, old_spread=0.05),
    dict(loss_type="grpo", level="sequence", entropy_coef=0.3, off_policy_mask_threshold=0.0, sampling=True),
    dict(loss_type="dapo", level="token", entropy_coef=0.3, top_entropy_quantile=0.5),
]


def _reference_kwargs(p: GRPOLossParams, old, ref, isr, bias, sampling=None):
    v = p.vespo
    return dict(old_logprobs=old, ref_logprobs=ref, is_ratio=isr, bias=bias, beta=p.beta, epsilon=p.epsilon_low,
                epsilon_high=p.epsilon_high, delta=p.delta, temperature=p.logits.temperature, loss_type=p.loss_type,
                importance_sampling_level=p.importance_sampling_level,
                use_bias_correction_kl=p.use_bias_correction_kl, max_completion_length=p.max_completion_length,
                num_items_in_batch=p.num_items_in_batch, top_entropy_quantile=p.top_entropy_quantile,
                sampling_logprobs=sampling, off_policy_mask_threshold=p.off_policy_mask_threshold,
                entropy_coef=p.entropy_coef, vespo_k_pos=v.k_pos, vespo_lambda_pos=v.lambda_pos,
                vespo_k_neg=v.k_neg, vespo_lambda_neg=v.lambda_neg)


@pytest.mark.parametrize("case", E2E_CASES, ids=[_case_id(c) for c in E2E_CASES])
def test_three_triton_phases_match_float64_reference(case):
    hs, vocab = 32, 200
    seed = torch.seed() % 2**31
    g = torch.Generator().manual_seed(seed)
    cu = ragged_lengths(5, 20, seed)
    batch, n = cu.numel() - 1, int(cu[-1])
    hidden = torch.randn(n, hs, generator=g, requires_grad=True)  # packed rows [N, H]
    weight = (torch.randn(vocab, hs, generator=g) / hs ** 0.5).requires_grad_(True)
    targets = torch.randint(0, vocab, (n,), generator=g)
    _, mask, adv, _, _, _, _ = _epilogue_inputs(cu, seed)
    with torch.no_grad():
        base = reference_logprobs(hidden, weight, targets).float()  # old/ref near the policy: ratios around 1
    case = dict(case)
    old = base + torch.randn(n, generator=g) * case.pop("old_spread", 0.3)
    ref = base + torch.randn(n, generator=g) * 0.3
    isr = {"bt": torch.rand(n, generator=g) + 0.5, "b1": torch.rand(batch, 1, generator=g) + 0.5}
    p, isr_kind, on_policy, sampling = _split_case(case, 20)
    p = GRPOLossParams(**{**p.__dict__, "logits": LogitTransform(temperature=0.8)})
    old, ref, isr = None if on_policy else old, ref if p.beta else None, None if isr_kind is None else isr[isr_kind]
    sampling = _sampling(old, seed) if sampling else None

    lse, logp, entropy = forward_sweep(hidden.detach(), weight.detach(), targets, None, p.logits, True)
    loss, g_logp, g_entropy, metrics = grpo_epilogue(logp, mask, adv, old, ref, isr, entropy, cu, p, sampling)
    dh, dw, _ = grad_sweep(hidden.detach(), weight.detach(), targets, None, p.logits, lse, g_logp, g_entropy, logp,
                           entropy, True, True, False)

    want_loss, want_metrics = reference_grpo_loss(hidden, weight, targets, mask, adv, cu_seqlens=cu,
                                                  **_reference_kwargs(p, old, ref, isr, None, sampling))
    want_dh, want_dw = torch.autograd.grad(want_loss, (hidden, weight))
    assert abs(float(loss) - float(want_loss)) <= 1e-5 * max(abs(float(want_loss)), 1e-3), f"seed={seed}"
    assert metrics.keys() == want_metrics.keys()
    for name, value in metrics.items():
        assert abs(float(value) - float(want_metrics[name])) <= 1e-5 * max(abs(float(want_metrics[name])), 0.1), \
            f"{name} seed={seed}"
    for name, ours, exact in (("hidden", dh, want_dh), ("weight", dw, want_dw)):
        err = float((ours.double() - exact).abs().max())
        assert err <= 1e-5 * float(exact.abs().max()), f"grad {name} seed={seed}: {err:.3g}"


@pytest.mark.parametrize("epilogue", [grpo_epilogue, torch_epilogue], ids=["triton", "torch"])
def test_missing_inputs_are_named(epilogue):
    """Both backends refuse alike: the KL needs ref_logp, the top-entropy mask needs the entropies (the torch
    epilogue used to skip the mask silently and train on every token)."""
    cu = ragged_lengths(4, 8, 0)
    logp, mask, adv, old, ref, entropy, _ = _epilogue_inputs(cu, 0)
    with pytest.raises(ValueError, match="ref_logp"):
        epilogue(logp, mask, adv, old, None, None, entropy, cu, _params("dapo", "token", 8, beta=0.1))
    with pytest.raises(ValueError, match="entropy"):
        epilogue(logp, mask, adv, old, None, None, None, cu, _params("dapo", "token", 8, top_entropy_quantile=0.5))
    with pytest.raises(ValueError, match="entropy.*entropy_coef"):
        epilogue(logp, mask, adv, old, None, None, None, cu, _params("dapo", "token", 8, entropy_coef=0.1))


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_entropy_quantile_through_the_public_function(backend):
    """fused_linear_grpo_loss computes the entropies itself when top_entropy_quantile < 1 (both backends), so the
    mask is applied: the loss matches the reference and differs from the unmasked loss."""
    from fastrl.kernels import fused_linear_grpo_loss
    B, T, H, V = 3, 8, 16, 67
    g = torch.Generator().manual_seed(5)
    h = torch.randn(B, T, H, generator=g)
    w = torch.randn(V, H, generator=g) / 4
    y = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T)
    adv, old = torch.randn(B, generator=g), reference_logprobs(h, w, y).float() + 0.1
    kw = dict(old_logprobs=old, top_entropy_quantile=0.5)
    loss, _ = fused_linear_grpo_loss(h, w, y, mask, adv, backend=backend, **kw)
    want, _ = reference_grpo_loss(h, w, y, mask, adv, **kw)
    unmasked, _ = reference_grpo_loss(h, w, y, mask, adv, old_logprobs=old)
    assert abs(float(loss) - float(want)) < 1e-5 and abs(float(want) - float(unmasked)) > 1e-3


def test_long_completions_loop_over_blocks():
    """Completions longer than BLOCK_T (set by the mean length: two of 1500 rows beside short and empty ones, mean
    501, BLOCK_T 512) take several passes per program; the result must not depend on the block split."""
    cu = torch.tensor([0, 1500, 1503, 1503, 1503, 3003, 3010])
    logp, mask, adv, old, ref, entropy, _ = _epilogue_inputs(cu, 7)
    for level in ("token", "sequence"):
        p = _params("grpo", level, 1500, beta=0.04)
        loss, g, _, _ = grpo_epilogue(logp, mask, adv, old, ref, None, entropy, cu, p)
        want_loss, want_g, _, _ = torch_epilogue(logp, mask, adv, old, ref, None, entropy, cu, p)
        assert torch.allclose(loss, want_loss, rtol=1e-5, atol=1e-7)
        assert torch.allclose(g, want_g, rtol=1e-5, atol=1e-8)
