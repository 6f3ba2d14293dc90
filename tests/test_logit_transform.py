"""Logit post-processing folded into the sweeps (LogitTransform: hidden scale, logit scale, tanh softcap, then 1/τ)
against the float64 reference that applies it the obvious way: logprobs, entropy, the GRPO loss and the gradients
of hidden, weight and bias, on the torch path and the Triton path (TRITON_INTERPRET=1, small sizes)."""
from dataclasses import replace

import pytest
import torch

from fastrl.kernels import LogitTransform, fused_linear_grpo_loss, fused_linear_logprobs
from fastrl.kernels.reference import reference_grpo_loss, reference_logprobs
from kernel_cases import assert_no_worse_than, logit_rounding_bound, make_linear_inputs, ratios_off_clip_edges

pytestmark = pytest.mark.usefixtures("poison_empty")

# One per family kind of kernels/README.md's table; caps small enough that tanh saturates on these logits (std ~2-4)
TRANSFORMS = {
    "granite": LogitTransform(logit_scale=1 / 3.5),
    "cohere": LogitTransform(logit_scale=2.5),
    "minicpm3": LogitTransform(hidden_scale=0.4),
    "gemma2": LogitTransform(softcap=3.0),
    "scale+cap": LogitTransform(hidden_scale=0.7, logit_scale=1.8, softcap=4.0),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
CASES = [pytest.param("torch", (70, 48, 1031), id="torch-N70-H48-V1031"),
         pytest.param("torch-chunks", (70, 48, 1031), id="torch-chunks-N70-H48-V1031"),
         pytest.param("triton", (37, 48, 300), id="triton-N37-H48-V300")]
TAU = 0.8


def _rounding_bound(h, w, b, t: LogitTransform, g_logp, g_ent):
    """kernel_cases.logit_rounding_bound with the transform's chain factor in place of 1/τ (a softcap's 1 − tanh²
    only shrinks it), for fp32."""
    return logit_rounding_bound(h, w, b, 1.0 / t.grad_scale, g_logp, g_ent)


def _chunks_if_asked(backend, request) -> str:
    """"torch-chunks": the torch path on row blocks × vocabulary chunks (conftest.vocabulary_chunks)."""
    if backend == "torch-chunks":
        request.getfixturevalue("vocabulary_chunks")
        return "torch"
    return backend


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("name", TRANSFORMS)
@pytest.mark.parametrize("backend,shape", CASES)
def test_logprobs_and_grads_match_reference(backend, shape, name, dtype, request):
    n, hs, v = shape
    backend = _chunks_if_asked(backend, request)
    seed = torch.seed() % 2**31
    h, w, y, b = make_linear_inputs(n, hs, v, dtype, seed, bias=True)
    t = TRANSFORMS[name]
    ours = fused_linear_logprobs(h, w, y, bias=b, temperature=TAU, with_entropy=True, logit_transform=t,
                                 backend=backend)
    truth = reference_logprobs(h, w, y, b, TAU, True, logit_transform=t)
    plain = reference_logprobs(h, w, y, b, TAU, True, dtype=dtype, logit_transform=t)
    for i, what in enumerate(("logp", "entropy")):
        assert_no_worse_than(ours[i], plain[i], truth[i], dtype, f"{what} {name} seed={seed}")
    g_logp, g_ent = torch.randn(n, dtype=torch.float64), torch.randn(n, dtype=torch.float64)
    grads = [torch.autograd.grad((out[0].double() * g_logp).sum() + (out[1].double() * g_ent).sum(), (h, w, b))
             for out in (ours, truth, plain)]
    bounds = (_rounding_bound(h, w, b, replace(t, temperature=TAU), g_logp, g_ent) if dtype == torch.float32
              else (0.0, 0.0, 0.0))
    for i, what in enumerate(("hidden", "weight", "bias")):
        assert grads[0][i].dtype == dtype
        assert_no_worse_than(grads[0][i], grads[2][i], grads[1][i], dtype, f"grad {what} {name} seed={seed}",
                             bounds[i])


def test_softcap_bounds_the_logits_and_matches_tanh():
    """Far beyond the cap every logit is ±c/τ: logp of a row whose raw logits are ±1000 is log softmax of ±c."""
    h = torch.tensor([[1000.0], [-1000.0]])
    w = torch.tensor([[1.0], [-1.0], [0.0]])
    y = torch.tensor([0, 0])
    logp = fused_linear_logprobs(h, w, y, logit_transform=LogitTransform(softcap=2.0), backend="torch")
    expected = torch.log_softmax(torch.tensor([[2.0, -2.0, 0.0], [-2.0, 2.0, 0.0]]), -1)[:, 0]
    torch.testing.assert_close(logp, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("level", ["token", "sequence"])  # torch: single pass / three phases
@pytest.mark.parametrize("name", TRANSFORMS)
@pytest.mark.parametrize("backend,dtype", [("torch", torch.float32), ("torch", torch.bfloat16),
                                           ("torch-chunks", torch.float32), ("torch-chunks", torch.bfloat16),
                                           ("triton", torch.float32)],
                         ids=["torch-fp32", "torch-bf16", "torch-chunks-fp32", "torch-chunks-bf16", "triton-fp32"])
def test_grpo_loss_and_grads_match_reference(backend, dtype, name, level, request):
    backend = _chunks_if_asked(backend, request)
    B, T, H, V = (4, 9, 32, 211) if backend == "triton" else (6, 13, 40, 523)
    seed = torch.seed() % 2**31
    t = TRANSFORMS[name]
    h, w, y, b = make_linear_inputs(0, H, V, dtype, seed, bias=True, lead=(B, T))
    g = torch.Generator().manual_seed(seed + 1)
    mask = (torch.rand(B, T, generator=g) > 0.25).float()
    with torch.no_grad():
        logp = reference_logprobs(h, w, y, b, TAU, logit_transform=t).float()
    old = logp + 0.3 * torch.randn(B, T, generator=g)
    if dtype != torch.float32:  # a 16-bit logp error must not flip a token's clip state (kernel_cases says why)
        old = ratios_off_clip_edges(logp, old, mask, level, margin=0.05)
    kw = dict(advantages=torch.randn(B, generator=g), old_logprobs=old,
              ref_logprobs=logp + 0.3 * torch.randn(B, T, generator=g), beta=0.04, temperature=TAU, bias=b,
              importance_sampling_level=level, logit_transform=t)
    runs = []
    for fn, extra in ((fused_linear_grpo_loss, {"backend": backend}), (reference_grpo_loss, {}),
                      (reference_grpo_loss, {"dtype": dtype})):
        loss, _ = fn(h, w, y, mask, **kw, **extra)
        runs.append((loss, torch.autograd.grad(loss, (h, w, b))))
    (loss, grads), (t_loss, t_grads), (p_loss, p_grads) = runs
    what = f"{name}/{level} seed={seed}"
    assert_no_worse_than(loss.reshape(1), p_loss.reshape(1), t_loss.reshape(1), dtype, f"loss {what}")
    for i, part in enumerate(("hidden", "weight", "bias")):
        assert torch.isfinite(grads[i]).all()
        assert_no_worse_than(grads[i], p_grads[i], t_grads[i], dtype, f"grad {part} {what}")


@pytest.mark.parametrize("bad,field", [(dict(logit_scale=0.0), "logit_transform.logit_scale"),
                                       (dict(hidden_scale=float("nan")), "logit_transform.hidden_scale"),
                                       (dict(softcap=-1.0), "logit_transform.softcap"),
                                       (dict(temperature=0.5), "logit_transform.temperature")])
def test_bad_transform_is_refused_by_name(bad, field):
    h, w, y, _ = make_linear_inputs(4, 8, 16, torch.float32, 0)
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        fused_linear_logprobs(h, w, y, logit_transform=LogitTransform(**bad))
