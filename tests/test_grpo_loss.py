"""fused_linear_grpo_loss against the float64 materializing reference: every loss type and option, loss,
gradients of hidden/weight/bias and metrics, on fresh random inputs with ragged shapes and several dtypes."""

import pytest
import torch

from fastrl.kernels import fused_linear_grpo_loss
from fastrl.kernels.reference import reference_grpo_loss
from kernel_cases import assert_no_worse_than, make_linear_inputs, ratios_off_clip_edges

pytestmark = pytest.mark.usefixtures("poison_empty")

LOSS_TYPES = ["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def make_batch(B, T, H, V, dtype, seed, *, bias=False, fully_masked_row=True):
    h, w, y, b = make_linear_inputs(0, H, V, dtype, seed, bias=bias, lead=(B, T))
    g = torch.Generator().manual_seed(seed + 1)
    mask = (torch.rand(B, T, generator=g) > 0.25).float()
    mask[:, 0] = 1.0
    if fully_masked_row:
        mask[-1] = 0.0  # a completion with no tokens must contribute nothing and produce no NaN
    with torch.no_grad():
        from fastrl.kernels.reference import reference_logprobs
        logp = reference_logprobs(h, w, y, b).float()
    old = logp + 0.35 * torch.randn(B, T, generator=g)  # ratios spread across both clip edges
    ref = logp + 0.5 * torch.randn(B, T, generator=g)
    return dict(h=h, w=w, y=y, b=b, mask=mask, old=old, ref=ref,
                adv=torch.randn(B, generator=g), rewards=torch.rand(B, generator=g).round())


def keep_ratios_off_clip_edges(batch, level, margin, epsilon=0.2, epsilon_high=0.2):
    """batch["old"] moved by kernel_cases.ratios_off_clip_edges (why: see there), against the exact logprobs."""
    with torch.no_grad():
        from fastrl.kernels.reference import reference_logprobs
        logp = reference_logprobs(batch["h"], batch["w"], batch["y"], batch["b"]).float()  # [B, T]
    batch["old"] = ratios_off_clip_edges(logp, batch["old"], batch["mask"], level, margin, epsilon, epsilon_high)


def run_both(batch, dtype, backend="torch", **kw):
    """(ours, float64 truth, PyTorch-at-dtype) each as (loss, metrics, grads)."""
    params = [t for t in (batch["h"], batch["w"], batch["b"]) if t is not None]
    args = (batch["h"], batch["w"], batch["y"], batch["mask"])
    out = []
    for fn, extra in ((fused_linear_grpo_loss, {"backend": backend}), (reference_grpo_loss, {}),
                      (reference_grpo_loss, {"dtype": dtype})):
        loss, metrics = fn(*args, bias=batch["b"], **kw, **extra)
        out.append((loss, metrics, torch.autograd.grad(loss, params)))
    return out


def pytorch_loss_envelope(batch, dtype, p_loss, t_loss, orders: int = 3, **kw) -> torch.Tensor:
    """PyTorch-at-dtype's worst loss error over its own run and `orders` vocabulary permutations of the same input.

    The loss is one number, so one sample of PyTorch's rounding error is luck: on an ill-conditioned loss (VESPO's
    -φ·A·log p, where φ sums T log ratios) it ranged 6.4e-6 to 1.3e-5 over eight orders of one fp32 input. Permuting
    the vocabulary changes only the summation order, so each permuted run is an equally valid dtype answer."""
    worst = (p_loss.detach().double() - t_loss.detach().double()).abs()
    y, V = batch["y"], batch["w"].shape[0]
    for k in range(orders):
        perm = torch.randperm(V, generator=torch.Generator().manual_seed(k))
        y_perm = torch.where(y >= 0, torch.argsort(perm)[y.clamp(min=0)], y)
        bias = None if batch["b"] is None else batch["b"][perm]
        loss, _ = reference_grpo_loss(batch["h"], batch["w"][perm], y_perm, batch["mask"], bias=bias, dtype=dtype, **kw)
        worst = torch.maximum(worst, (loss.detach().double() - t_loss.detach().double()).abs())
    return t_loss.detach().double() + worst


def check_against_reference(batch, dtype, what, backend="torch", **kw):
    (loss, metrics, grads), (t_loss, t_metrics, t_grads), (p_loss, _, p_grads) = run_both(batch, dtype, backend, **kw)
    assert torch.isfinite(loss), what
    envelope = pytorch_loss_envelope(batch, dtype, p_loss, t_loss, **kw)
    assert_no_worse_than(loss.reshape(1), envelope.reshape(1), t_loss.reshape(1), dtype, f"loss {what}")
    for name, a, p, t in zip(("hidden", "weight", "bias"), grads, p_grads, t_grads):
        assert a.dtype == dtype and torch.isfinite(a).all(), f"grad {name} {what}"
        assert_no_worse_than(a, p, t, dtype, f"grad {name} {what}")
    assert set(metrics) == set(t_metrics), what
    for k in t_metrics:  # metrics are means of indicators or O(1) values: compare loosely at low precision
        tol = 1e-4 if dtype == torch.float32 else 0.05
        assert abs(float(metrics[k]) - float(t_metrics[k])) <= tol * max(1.0, abs(float(t_metrics[k]))), (k, what)


OPTION_SETS = {
    "plain": {},
    "beta": {"beta": 0.04},
    "beta-biascorr": {"beta": 0.1, "use_bias_correction_kl": True},
    "asym-eps-delta": {"epsilon": 0.1, "epsilon_high": 0.28, "delta": 1.5},
    "temperature": {"temperature": 0.7},
    "is_ratio-token": {"is_ratio": "token"},
    "is_ratio-seq": {"is_ratio": "seq"},
    "num_items": {"num_items_in_batch": 123},
    "entropy-quantile": {"top_entropy_quantile": 0.4},
    "on-policy": {"old": None},
    "entropy-bonus": {"entropy_coef": 0.05},
    "entropy-bonus-quantile": {"entropy_coef": 0.3, "top_entropy_quantile": 0.4, "beta": 0.04},
    "off-policy-mask": {"off_policy_mask_threshold": 0.0},
    "off-policy-mask-sampling": {"off_policy_mask_threshold": 0.05, "sampling_logprobs": "given"},
    "vespo-shape": {"vespo_k_pos": 1.5, "vespo_lambda_pos": 0.5, "vespo_k_neg": 4.0, "vespo_lambda_neg": 6.0},
}


def _kwargs(batch, loss_type, level, options, B, T):
    kw = dict(loss_type=loss_type, importance_sampling_level=level, max_completion_length=T + 3,
              old_logprobs=batch["old"], advantages=batch["adv"])
    opts = dict(options)
    if opts.pop("old", "keep") is None:
        kw["old_logprobs"] = None
    if "beta" in opts:
        kw["ref_logprobs"] = batch["ref"]
    isr = opts.pop("is_ratio", None)
    g = torch.Generator().manual_seed(7)
    if isr:
        kw["is_ratio"] = torch.rand(B, T if isr == "token" else 1, generator=g) + 0.5
    if opts.pop("sampling_logprobs", None):  # vLLM's: near the old ones, one token unscored (NaN, counts as 0)
        kw["sampling_logprobs"] = batch["old"] + 0.2 * torch.randn(B, T, generator=g)
        kw["sampling_logprobs"][0, 2] = float("nan")
    kw.update(opts)
    return kw


@pytest.mark.parametrize("options", OPTION_SETS.values(), ids=OPTION_SETS.keys())
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_fp32_every_loss_type_and_option(loss_type, level, options):
    B, T, H, V = 6, 13, 40, 523
    seed = torch.seed() % 2**31
    batch = make_batch(B, T, H, V, torch.float32, seed, bias=True)
    kw = _kwargs(batch, loss_type, level, options, B, T)
    if loss_type == "vespo" and options.get("is_ratio") == "seq":  # TRL's VESPO takes per-token ratios only
        with pytest.raises(ValueError, match="is_ratio: expected per-token ratios"):
            fused_linear_grpo_loss(batch["h"], batch["w"], batch["y"], batch["mask"], backend="torch", **kw)
        return
    check_against_reference(batch, torch.float32, f"{loss_type}/{level}/{options} seed={seed}", **kw)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("loss_type,level,extra", [
    ("dapo", "token", {}), ("grpo", "sequence", {}), ("cispo", "token", {}), ("vespo", "token", {}),
    ("bnpo", "token", {"entropy_coef": 0.1, "off_policy_mask_threshold": 0.0})],
    ids=["dapo", "grpo-seq", "cispo", "vespo", "bnpo-bonus-mask"])
def test_low_precision(loss_type, level, extra, dtype):
    B, T, H, V = 8, 24, 64, 3001
    seed = torch.seed() % 2**31
    batch = make_batch(B, T, H, V, dtype, seed)
    keep_ratios_off_clip_edges(batch, level, margin=0.05)
    kw = _kwargs(batch, loss_type, level, {"beta": 0.04, **extra}, B, T)
    check_against_reference(batch, dtype, f"{loss_type}/{level} seed={seed}", **kw)


CHUNK_CASES = [pytest.param(t, level, OPTION_SETS[o], id=f"{t}-{level}-{o}") for t in LOSS_TYPES
               for level in ("token", "sequence") for o in ("beta", "entropy-quantile", "entropy-bonus", "is_ratio-seq")
               if not (t == "vespo" and o == "is_ratio-seq")]  # refused by name (test_fp32_every_loss_type_and_option)


@pytest.mark.parametrize("loss_type,level,options", CHUNK_CASES)
def test_vocabulary_chunks_every_loss_type(loss_type, level, options, vocabulary_chunks):
    """The three phases on row blocks × vocabulary chunks (taken at V 151936 instead of the single pass)."""
    B, T, H, V = 6, 13, 40, 523  # 78 rows: blocks of 32 rows × chunks of 256, 256 and 11 columns
    seed = torch.seed() % 2**31
    batch = make_batch(B, T, H, V, torch.float32, seed, bias=True)
    kw = _kwargs(batch, loss_type, level, options, B, T)
    check_against_reference(batch, torch.float32, f"chunks {loss_type}/{level}/{options} seed={seed}", **kw)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_vocabulary_chunks_low_precision(dtype, vocabulary_chunks):
    B, T, H, V = 8, 24, 64, 3001
    seed = torch.seed() % 2**31
    batch = make_batch(B, T, H, V, dtype, seed)
    keep_ratios_off_clip_edges(batch, "token", margin=0.05)
    kw = _kwargs(batch, "dapo", "token", {"beta": 0.04, "entropy_coef": 0.1}, B, T)
    check_against_reference(batch, dtype, f"chunks dapo seed={seed}", **kw)


def test_real_size_spans_many_tiles():
    B, T, H, V = 4, 96, 128, 32768  # 384 rows × 32768: six row tiles, V far from any block multiple is below
    seed = torch.seed() % 2**31
    batch = make_batch(B, T, H, V + 5, torch.float32, seed, bias=True)
    kw = _kwargs(batch, "dapo", "token", {"beta": 0.04}, B, T)
    check_against_reference(batch, torch.float32, f"real size seed={seed}", **kw)


def test_rewards_path_equals_advantages_path():
    B, T, H, V = 8, 5, 16, 97
    batch = make_batch(B, T, H, V, torch.float32, 3, fully_masked_row=False)
    from fastrl.kernels import group_advantages
    args = (batch["h"], batch["w"], batch["y"], batch["mask"])
    a, _ = fused_linear_grpo_loss(*args, rewards=batch["rewards"], num_generations=4, backend="torch")
    b, _ = fused_linear_grpo_loss(*args, group_advantages(batch["rewards"], 4), backend="torch")
    c, _ = reference_grpo_loss(*args, rewards=batch["rewards"], num_generations=4)
    assert float(a) == float(b) and abs(float(a) - float(c)) < 1e-6


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_frozen_head_does_no_weight_work(level, monkeypatch):
    """With weight.requires_grad False (LoRA, frozen head) no dW buffer is ever allocated."""
    B, T, H, V = 3, 7, 16, 211
    batch = make_batch(B, T, H, V, torch.float32, 5)
    batch["w"].requires_grad_(False)
    from fastrl.kernels import grad_sweep
    seen = []
    real = grad_sweep.allocate_grads
    monkeypatch.setattr(grad_sweep, "allocate_grads", lambda *a, **kw: seen.append(a[2:]) or real(*a, **kw))
    import fastrl.kernels.grpo_single_pass as sp
    monkeypatch.setattr(sp, "allocate_grads", lambda *a, **kw: seen.append(a[2:]) or real(*a, **kw))
    loss, _ = fused_linear_grpo_loss(batch["h"], batch["w"], batch["y"], batch["mask"], batch["adv"],
                                     importance_sampling_level=level, backend="torch")
    (gh,) = torch.autograd.grad(loss, (batch["h"],))
    assert seen and all(flags == (True, False, False) for flags in seen)
    ref, _ = reference_grpo_loss(batch["h"], batch["w"], batch["y"], batch["mask"], batch["adv"],
                                 importance_sampling_level=level)
    (gr,) = torch.autograd.grad(ref, (batch["h"],))
    assert float((gh - gr).abs().max()) < 1e-5


def test_backward_scales_by_incoming_gradient():
    batch = make_batch(3, 6, 16, 101, torch.float32, 11)
    args = (batch["h"], batch["w"], batch["y"], batch["mask"], batch["adv"])
    loss, _ = fused_linear_grpo_loss(*args, backend="torch")
    (g1,) = torch.autograd.grad(loss, (batch["h"],))
    loss, _ = fused_linear_grpo_loss(*args, backend="torch")
    (g3,) = torch.autograd.grad(-3.0 * loss, (batch["h"],))
    assert torch.allclose(g3, -3.0 * g1, rtol=1e-6, atol=1e-9)


def test_backward_scales_and_repeats():
    """backward scales the gradients stored in forward in place; a retained graph differentiated again with
    another factor still gives factor × the gradient."""
    B, T, H, V = 4, 6, 16, 101
    batch = make_batch(B, T, H, V, torch.float32, 11)
    args = (batch["h"], batch["w"], batch["y"], batch["mask"], batch["adv"])
    ref, _ = reference_grpo_loss(*args, old_logprobs=batch["old"])
    want = torch.autograd.grad(ref, (batch["h"], batch["w"]))
    loss, _ = fused_linear_grpo_loss(*args, old_logprobs=batch["old"], backend="torch")
    for factor in (1.0, 3.0, -0.5, 1.0):
        got = torch.autograd.grad(loss * factor, (batch["h"], batch["w"]), retain_graph=True)
        for a, t in zip(got, want):
            assert float((a.double() - factor * t).abs().max()) < 1e-5 * max(1.0, abs(factor)), factor


def test_entropy_metric_is_never_negative_on_peaked_rows():
    """The torch single pass forms entropy as lse − Σ p·z, which cancels on a peaked row: a lone masked peaked
    token once logged a negative entropy (−1.5e-5). Entropy is ≥ 0 by definition; here it must stay so, and
    match the float64 reference within fp32 rounding."""
    for seed in range(40):
        g = torch.Generator().manual_seed(seed)
        h = torch.randn(2, 3, 32, generator=g) * 30  # logits |z| ~ 100: every row nearly one-hot
        w = torch.randn(300, 32, generator=g) / 32 ** 0.5
        y = torch.randint(0, 300, (2, 3), generator=g)
        mask = torch.zeros(2, 3)
        mask[0, 0] = 1.0
        adv = torch.randn(2, generator=g)
        _, metrics = fused_linear_grpo_loss(h, w, y, mask, adv, backend="torch")
        _, truth = reference_grpo_loss(h, w, y, mask, adv)
        assert float(metrics["entropy"]) >= 0.0, seed
        assert abs(float(metrics["entropy"]) - float(truth["entropy"])) < 1e-4, seed
