"""fused_linear_logprobs (forward sweep + gradient sweep) against the float64 reference.

Backends: the PyTorch path at real sizes, the Triton path under TRITON_INTERPRET=1 at small sizes."""
import pytest
import torch

from fastrl.kernels import fused_linear_logprobs
from fastrl.kernels.forward_sweep import ONE_BUFFER_TILE_ELEMENTS, chunk_shape, rows_per_tile, whole_rows_fit
from fastrl.kernels.reference import reference_logprobs
from kernel_cases import assert_no_worse_than, logit_rounding_bound, make_linear_inputs

pytestmark = pytest.mark.usefixtures("poison_empty")

# Ragged on purpose: V and H not multiples of any block, N not a multiple of the row tile.
TORCH_SHAPES = [(37, 48, 300), (130, 64, 2053), (257, 96, 40000)]  # the last spans several row tiles
TRITON_SHAPES = [(37, 48, 300)]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
CASES = [pytest.param("torch", s, id=f"torch-N{s[0]}-H{s[1]}-V{s[2]}") for s in TORCH_SHAPES] + \
        [pytest.param("torch-chunks", (130, 64, 2053), id="torch-chunks-N130-H64-V2053")] + \
        [pytest.param("triton", s, id=f"triton-N{s[0]}-H{s[1]}-V{s[2]}") for s in TRITON_SHAPES]


def _grads(logp, entropy, g_logp, g_ent, params):
    total = (logp.double() * g_logp).sum() + (entropy.double() * g_ent).sum()
    return torch.autograd.grad(total, params)


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("backend,shape", CASES)
def test_matches_reference(backend, shape, with_bias, dtype, request):
    n, hs, v = shape
    if backend == "torch-chunks":  # row blocks × vocabulary chunks, as at V 151936
        request.getfixturevalue("vocabulary_chunks")
        backend = "torch"
    seed = torch.seed() % 2**31
    # Sharply peaked rows stress the log-sum-exp; in fp16/bf16 their logits (~100) round in steps of 0.06-0.5,
    # which swamps every other error source in both paths, so they are an fp32 case.
    h, w, y, b = make_linear_inputs(n, hs, v, dtype, seed, bias=with_bias, peaked=dtype == torch.float32)
    params = [t for t in (h, w, b) if t is not None]
    tau = 0.7
    ours = fused_linear_logprobs(h, w, y, bias=b, temperature=tau, with_entropy=True, backend=backend)
    truth = reference_logprobs(h, w, y, b, tau, with_entropy=True)
    plain = reference_logprobs(h, w, y, b, tau, with_entropy=True, dtype=dtype)  # PyTorch at this dtype
    for i, what in enumerate(("logp", "entropy")):
        assert ours[i].dtype == torch.float32
        assert_no_worse_than(ours[i], plain[i], truth[i], dtype, f"{what} seed={seed}")
    g_logp, g_ent = torch.randn(n, dtype=torch.float64), torch.randn(n, dtype=torch.float64)
    got = _grads(*ours, g_logp, g_ent, params)
    expected = _grads(*truth, g_logp, g_ent, params)
    baseline = _grads(*plain, g_logp, g_ent, params)
    # fp32: the logits' own roundoff, which PyTorch's error may happen to cancel (kernel_cases.logit_rounding_bound);
    # in 16 bits PyTorch's error is dominated by the same roundoff, so the factor rule alone covers it
    bounds = logit_rounding_bound(h, w, b, tau, g_logp, g_ent) if dtype == torch.float32 else (0.0, 0.0, 0.0)
    for name, a, p, t, extra in zip(("hidden", "weight", "bias"), got, baseline, expected, bounds):
        assert a.dtype == dtype, f"grad {name} must come back in the input dtype"
        assert_no_worse_than(a, p, t, dtype, f"grad {name} seed={seed}", extra)


def test_batched_shape_and_frozen_weight():
    h, w, y, _ = make_linear_inputs(0, 32, 100, torch.float32, 1, lead=(3, 5))
    w.requires_grad_(False)
    logp = fused_linear_logprobs(h, w, y, backend="torch")
    assert logp.shape == (3, 5) and logp.dtype == torch.float32
    (gh,) = torch.autograd.grad(logp.sum(), (h,))
    (gr,) = torch.autograd.grad(reference_logprobs(h, w, y).sum(), (h,))
    assert float((gh - gr).abs().max()) < 1e-5


def test_row_tile_does_not_grow_with_n():
    assert rows_per_tile(10**6, 32768) == rows_per_tile(4096, 32768) == 64  # 64 × 32768 = 2^21 logits
    assert rows_per_tile(10**6, 151936) == 16  # the floor: 16 rows
    assert rows_per_tile(5, 32768) == 5


def test_tiles_are_tall_at_a_large_vocabulary():
    """Whole-vocabulary rows while 256 of them fit, else ≤ 1024-row blocks × vocabulary chunks of the same budget."""
    assert whole_rows_fit(4096, 32768, ONE_BUFFER_TILE_ELEMENTS)  # 256 rows × 32768
    assert whole_rows_fit(40, 151936, ONE_BUFFER_TILE_ELEMENTS)  # every row in one tile
    assert not whole_rows_fit(100, 151936, ONE_BUFFER_TILE_ELEMENTS)  # 48-row tiles at Qwen2.5's head
    assert chunk_shape(4096, 151936) == (1024, 2048) and chunk_shape(300, 151936) == (300, 6912)
    assert chunk_shape(10, 1000) == (10, 1000)


def test_unused_entropy_costs_no_entropy_gradient_work(monkeypatch):
    """with_entropy=True but only logp differentiated: the gradient sweep gets g_entropy=None (no entropy term),
    and the gradients equal those of with_entropy=False."""
    from fastrl.kernels import grad_sweep as gs
    seen = []
    real = gs.grad_sweep
    monkeypatch.setattr(gs, "grad_sweep", lambda *a: seen.append(a[7]) or real(*a))
    h, w, y, _ = make_linear_inputs(50, 32, 700, torch.float32, 3)
    logp, _entropy = fused_linear_logprobs(h, w, y, with_entropy=True, backend="torch")
    got = torch.autograd.grad(logp.sum(), (h, w))
    want = torch.autograd.grad(fused_linear_logprobs(h, w, y, backend="torch").sum(), (h, w))
    assert seen == [None, None]
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    _logp, entropy = fused_linear_logprobs(h, w, y, with_entropy=True, backend="torch")
    got = torch.autograd.grad(entropy.sum(), (h, w))  # the entropy alone: dL/dlogp is zero
    want = torch.autograd.grad(reference_logprobs(h, w, y, with_entropy=True)[1].sum(), (h, w))
    assert seen[-1] is not None
    for a, b in zip(got, want):
        assert float((a.double() - b).abs().max()) < 1e-4
