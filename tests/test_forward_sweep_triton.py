"""The Triton forward sweep (interpreted on CPU, real GPU tile sizes) against the float64 reference.

Tolerance (kernel_cases.assert_no_worse_than): error ≤ 1.25 × the error of PyTorch's own materializing path at
the input dtype + a relative slack per dtype. The kernel's only rounding beyond fp32 accumulation is in its inputs,
so it is usually far below the bound; bf16 gets no special treatment."""
import pytest
import torch

from fastrl.kernels.forward_sweep_triton import FORWARD_CONFIG, FORWARD_CONFIG_FP32_IEEE, forward_sweep
from fastrl.kernels.params import LogitTransform
from fastrl.kernels.reference import reference_logprobs
from kernel_cases import assert_no_worse_than, make_linear_inputs

pytestmark = pytest.mark.usefixtures("poison_empty")

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Ragged: H and V not multiples of the blocks (64 / 128), N not a multiple of BLOCK_N (64); 130 rows = 3 row blocks.
SHAPES = [(37, 48, 300), (64, 64, 257), (130, 80, 520)]


def _lse(h, w, b, tau, dtype):
    z = h.detach().to(dtype) @ w.detach().to(dtype).T
    if b is not None:
        z = z + b.detach().to(dtype)
    return (z / tau).float().logsumexp(-1) if dtype != torch.float64 else (z / tau).logsumexp(-1)


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"N{n}-H{h}-V{v}" for n, h, v in SHAPES])
def test_forward_sweep_matches_reference(shape, with_bias, dtype):
    n, hs, v = shape
    seed = torch.seed() % 2**31
    h, w, y, b = make_linear_inputs(n, hs, v, dtype, seed, bias=with_bias, peaked=True)
    y[0], y[-1] = 0, v - 1  # first and last vocabulary column (the last sits in a ragged tile)
    tau = 0.7
    lse, logp, entropy = forward_sweep(h.detach(), w.detach(), y, None if b is None else b.detach(),
                                       LogitTransform(temperature=tau), True)
    assert lse.dtype == logp.dtype == entropy.dtype == torch.float32
    assert lse.shape == (2, n) and logp.shape == entropy.shape == (n,)  # lse split: row max m, log Σ exp(z − m)
    truth = reference_logprobs(h, w, y, b, tau, with_entropy=True)
    plain = reference_logprobs(h, w, y, b, tau, with_entropy=True, dtype=dtype)
    assert_no_worse_than(logp, plain[0], truth[0], dtype, f"logp seed={seed}")
    assert_no_worse_than(entropy, plain[1], truth[1], dtype, f"entropy seed={seed}")
    assert_no_worse_than(lse.double().sum(0), _lse(h, w, b, tau, dtype), _lse(h, w, b, tau, torch.float64), dtype,
                         f"lse seed={seed}")


def test_without_entropy_returns_none_and_same_logp():
    h, w, y, _ = make_linear_inputs(37, 48, 300, torch.float32, 3)
    h, w = h.detach(), w.detach()
    lse, logp, entropy = forward_sweep(h, w, y, None, LogitTransform(), False)
    assert entropy is None
    lse2, logp2, _ = forward_sweep(h, w, y, None, LogitTransform(), True)
    assert torch.equal(lse, lse2) and torch.equal(logp, logp2)


def test_sharply_peaked_rows_stay_finite():
    """Logits of magnitude ~1e3 with one dominant column: the online max must keep exp() in range."""
    h, w, y, _ = make_linear_inputs(40, 64, 300, torch.float32, 5)
    h, w = h.detach() * 60.0, w.detach()
    lse, logp, entropy = forward_sweep(h, w, y, None, LogitTransform(), True)
    truth_logp, truth_ent = reference_logprobs(h, w, y, with_entropy=True)
    assert torch.isfinite(lse).all() and torch.isfinite(entropy).all()
    scale = float(_lse(h, w, None, 1.0, torch.float64).abs().max())
    # fp32 logits of size `scale` carry an absolute rounding of ~scale·2^-24 per term, summed over H = 64 terms
    assert float((logp.double() - truth_logp).abs().max()) < 64 * scale * 2**-24
    assert float((entropy.double() - truth_ent).abs().max()) < 64 * scale * 2**-24


def test_block_sizes_are_tensor_core_shapes():
    """The fp32 tests above run FORWARD_CONFIG_FP32_IEEE (torch's default precision), bf16/fp16 FORWARD_CONFIG."""
    for c in (FORWARD_CONFIG, FORWARD_CONFIG_FP32_IEEE):
        for size in (c.block_n, c.block_v, c.block_h):
            assert size >= 16 and size & (size - 1) == 0, size


def test_empty_input():
    h, w, y, _ = make_linear_inputs(0, 48, 300, torch.float32, 1)
    lse, logp, entropy = forward_sweep(h.detach(), w.detach(), y, None, LogitTransform(), True)
    assert lse.shape == (2, 0) and logp.shape == entropy.shape == (0,)
