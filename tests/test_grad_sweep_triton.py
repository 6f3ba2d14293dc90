"""The Triton gradient sweep (interpreted on CPU, real GPU tile sizes) against float64 autograd.

The sweep gets g_logp and g_entropy (random) and must return dh, dW, db of Σ g_logp·logp + Σ g_entropy·entropy.
Tolerance: as for the forward sweep (kernel_cases.assert_no_worse_than), against PyTorch's materializing path at
the input dtype. In bf16/fp16 the kernel rounds dz to the input dtype before the two products (like the plain
path, whose logits gradient is in that dtype); the interpreter rounds bf16 toward zero where a GPU rounds to
nearest, a worse case than the GPU's that the slack still has to cover.

The lse reaches the sweep as two fp32 numbers per row (m, s: kernels/README.md), so no slack is granted for a
rounded one-number lse (a regression to that contract fails here on peaked fp32 rows). In fp32 the only extra
term is the logits' own roundoff, which PyTorch's error may happen to cancel: kernel_cases.logit_rounding_bound,
as in test_logprobs.py."""
import pytest
import torch

from fastrl.kernels.forward_sweep_triton import forward_sweep
from fastrl.kernels.grad_sweep_triton import GRAD_CONFIG, GRAD_CONFIG_FP32_IEEE, grad_sweep
from fastrl.kernels.params import LogitTransform
from fastrl.kernels.reference import reference_logprobs
from kernel_cases import assert_no_worse_than, logit_rounding_bound, make_linear_inputs

pytestmark = pytest.mark.usefixtures("poison_empty")

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SHAPES = [(37, 48, 300), (64, 64, 257), (130, 80, 520)]


def _objective_grads(h, w, b, y, tau, g_logp, g_ent, dtype):
    """d/d(h, W, b) of Σ g_logp·logp + Σ g_ent·entropy, PyTorch materializing in `dtype`."""
    params = [t for t in (h, w, b) if t is not None]
    logp, ent = reference_logprobs(h, w, y, b, tau, with_entropy=True, dtype=dtype)
    total = (logp.double() * g_logp).sum()
    if g_ent is not None:
        total = total + (ent.double() * g_ent).sum()
    return torch.autograd.grad(total, params)


def _run(h, w, b, y, tau, g_logp, g_ent, need=(True, True, True), deterministic=False):
    hd, wd, bd = h.detach(), w.detach(), None if b is None else b.detach()
    lse, logp, ent = forward_sweep(hd, wd, y, bd, LogitTransform(temperature=tau), g_ent is not None)
    g_ent32 = None if g_ent is None else g_ent.float()
    return grad_sweep(hd, wd, y, bd, LogitTransform(temperature=tau), lse, g_logp.float(), g_ent32, logp, ent, need[0], need[1],
                      need[2] and b is not None, deterministic=deterministic)


ORDERED_CASES = [pytest.param((130, 80, 520), True, torch.float32, id="N130-H80-V520-logp+entropy-fp32"),
                 pytest.param((64, 64, 257), False, torch.bfloat16, id="N64-H64-V257-logp-bf16")]


@pytest.mark.parametrize("shape,entropy_term,dtype", ORDERED_CASES)
def test_deterministic_sweeps_match_reference(shape, entropy_term, dtype):
    test_grad_sweep_matches_reference(shape, entropy_term, dtype, deterministic=True)


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("entropy_term", [False, True], ids=["logp", "logp+entropy"])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"N{n}-H{h}-V{v}" for n, h, v in SHAPES])
def test_grad_sweep_matches_reference(shape, entropy_term, dtype, deterministic=False):
    n, hs, v = shape
    seed = torch.seed() % 2**31
    h, w, y, b = make_linear_inputs(n, hs, v, dtype, seed, bias=entropy_term, peaked=True)
    y[0], y[-1] = 0, v - 1
    tau = 0.7
    g = torch.Generator().manual_seed(seed)
    g_logp = torch.randn(n, dtype=torch.float64, generator=g)
    g_ent = torch.randn(n, dtype=torch.float64, generator=g) if entropy_term else None
    got = [t for t in _run(h, w, b, y, tau, g_logp, g_ent, deterministic=deterministic) if t is not None]
    truth = _objective_grads(h, w, b, y, tau, g_logp, g_ent, torch.float64)
    plain = _objective_grads(h, w, b, y, tau, g_logp, g_ent, dtype)
    no_ent = torch.zeros_like(g_logp)
    bounds = logit_rounding_bound(h, w, b, tau, g_logp, no_ent if g_ent is None else g_ent) \
        if dtype == torch.float32 else (0.0, 0.0, 0.0)
    assert len(got) == len(truth)
    for name, ours, base, exact, extra in zip(("hidden", "weight", "bias"), got, plain, truth, bounds):
        assert ours.dtype == torch.float32 and ours.shape == exact.shape
        assert_no_worse_than(ours, base, exact, dtype, f"grad {name} seed={seed}", extra)


@pytest.mark.parametrize("need", [(True, False, False), (False, True, False), (False, False, True)],
                         ids=["hidden-only", "weight-only", "bias-only"])
def test_flags_skip_work_and_keep_the_rest_exact(need):
    """A frozen head (no dW) or a frozen body (no dh) gets None there and the same numbers elsewhere."""
    h, w, y, b = make_linear_inputs(64, 64, 257, torch.float32, 11, bias=True)
    g_logp = torch.randn(64, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    full = _run(h, w, b, y, 1.0, g_logp, None)
    part = _run(h, w, b, y, 1.0, g_logp, None, need)
    for wanted, a, ref in zip(need, part, full):
        if wanted:
            assert torch.allclose(a, ref, rtol=1e-6, atol=1e-7)
        else:
            assert a is None


@pytest.mark.parametrize("need", [(True, False, False), (False, True, False), (False, False, True)],
                         ids=["hidden-only", "weight-only", "bias-only"])
def test_deterministic_flags_match_atomic_sweep(need):
    h, w, y, b = make_linear_inputs(64, 64, 257, torch.float32, 12, bias=True)
    g_logp = torch.randn(64, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    atomic = _run(h, w, b, y, 1.0, g_logp, None)
    ordered = _run(h, w, b, y, 1.0, g_logp, None, need, deterministic=True)
    for wanted, a, ref in zip(need, ordered, atomic):
        assert (a is None) != wanted
        if wanted:
            assert torch.allclose(a, ref, rtol=1e-6, atol=1e-7)


@pytest.mark.cuda
def test_deterministic_sweep_is_bitwise_reproducible_on_gpu():
    """Only meaningful on a GPU (the interpreter runs atomics in program order): two runs, identical bits."""
    h, w, y, b = (None if t is None else t.cuda() for t in make_linear_inputs(512, 256, 4099, torch.bfloat16, 5,
                                                                             bias=True))
    g_logp = torch.randn(512, dtype=torch.float64, device="cuda")
    first = _run(h, w, b, y, 1.0, g_logp, None, deterministic=True)
    second = _run(h, w, b, y, 1.0, g_logp, None, deterministic=True)
    assert all(torch.equal(a, c) for a, c in zip(first, second))


def test_masked_rows_give_zero_hidden_grad():
    """Rows with g_logp = 0 (masked completion tokens) get exactly zero dh and add nothing to dW."""
    h, w, y, _ = make_linear_inputs(50, 48, 300, torch.float32, 4)
    g_logp = torch.randn(50, dtype=torch.float64)
    g_logp[10:30] = 0.0
    dh, dw, _ = _run(h, w, None, y, 1.0, g_logp, None)
    assert torch.count_nonzero(dh[10:30]) == 0
    keep = torch.cat([torch.arange(10), torch.arange(30, 50)])
    _, dw_kept, _ = _run(h[keep].detach(), w, None, y[keep], 1.0, g_logp[keep], None)
    assert torch.allclose(dw, dw_kept, rtol=1e-5, atol=1e-6)


def test_entropy_grad_needs_entropy():
    h, w, y, _ = make_linear_inputs(16, 32, 64, torch.float32, 1)
    z = torch.zeros(16)
    with pytest.raises(ValueError, match="entropy"):
        grad_sweep(h.detach(), w.detach(), y, None, LogitTransform(), z, z, z, z, None, True, True, False)


def test_block_sizes_are_tensor_core_shapes():
    """The fp32 tests above run GRAD_CONFIG_FP32_IEEE (torch's default precision), bf16/fp16 GRAD_CONFIG."""
    for c in (GRAD_CONFIG, GRAD_CONFIG_FP32_IEEE):
        for size in (c.block_n, c.block_v, c.block_h):
            assert size >= 16 and size & (size - 1) == 0, size
