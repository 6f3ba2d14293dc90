"""Every tensor argument of every kernel entry point, passed as a non-contiguous view (every other element of a
wider buffer, or a transposed layout), gives what the same values give contiguous, on both backends.

A kernel that reads a strided tensor as if it were contiguous reads the wrong elements: no error, a wrong
loss (the Triton sweeps once did this with a strided `bias`: loss 7-12% off, gradients up to 39%). The values are
identical in both calls, so the results must agree to float32 rounding (the torch path may pick another GEMM
kernel for another layout: 1e-5 relative). The contiguous results themselves are tested against the float64
reference in test_logprobs.py / test_grpo_loss.py; here the same call is also checked against it, loosely.
Triton runs under TRITON_INTERPRET=1 (tests/conftest.py) at small sizes.
"""
from __future__ import annotations

import pytest
import torch

from fastrl.kernels import fused_linear_grpo_loss, fused_linear_logprobs, group_advantages
from fastrl.kernels.reference import reference_grpo_loss, reference_logprobs

pytestmark = pytest.mark.usefixtures("poison_empty")

B, T, H, V, G = 4, 5, 32, 70, 2  # V not a block multiple; 20 rows
BACKENDS = ["torch", "triton"]


def every_other(t: torch.Tensor) -> torch.Tensor:
    """The same values in every other element of a buffer twice as wide in the last dim (stride 2)."""
    wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
    out = wide[..., ::2].detach()  # detach keeps the strides and makes a leaf
    out.copy_(t.detach())
    return out


def transposed(t: torch.Tensor) -> torch.Tensor:
    """The same values stored column-major (the last two dims swapped in memory)."""
    return t.detach().transpose(-1, -2).contiguous().transpose(-1, -2).detach()


LAYOUTS = {"every_other": every_other, "transposed": transposed}


def inputs(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    mask = (torch.rand(B, T, generator=g) > 0.3).float()
    mask[:, 0] = 1.0
    return {"hidden": torch.randn(B, T, H, generator=g), "weight": torch.randn(V, H, generator=g) / H ** 0.5,
            "targets": torch.randint(0, V, (B, T), generator=g), "bias": torch.randn(V, generator=g),
            "mask": mask, "advantages": torch.randn(B, generator=g),
            "rewards": torch.rand(B, generator=g), "old_logprobs": -torch.rand(B, T, generator=g) * 4 - 2,
            "ref_logprobs": -torch.rand(B, T, generator=g) * 4 - 2,
            "is_ratio": torch.rand(B, T, generator=g) + 0.5}


DIFFERENTIABLE = ("hidden", "weight", "bias")


def with_layout(x: dict, name: str | None, layout: str | None) -> dict:
    """x with x[name] in the given layout (name None: all contiguous); differentiable inputs are fresh leaves."""
    out = {}
    for k, t in x.items():
        t = LAYOUTS[layout](t) if k == name else t.detach().clone()
        out[k] = t.requires_grad_(True) if k in DIFFERENTIABLE else t
    return out


def strided_cases(names):
    """(argument, layout) pairs: every argument every_other, every ≥2-D argument transposed too."""
    two_d = {"hidden", "weight", "targets", "mask", "old_logprobs", "ref_logprobs", "is_ratio"}
    return [(n, lay) for n in names for lay in LAYOUTS if lay == "every_other" or n in two_d]


def assert_close(a, b, what):
    assert a.shape == b.shape, what
    assert torch.allclose(a.double(), b.double(), rtol=1e-5, atol=1e-6), \
        f"{what}: max abs diff {float((a.double() - b.double()).abs().max()):.3g}"


def logprobs_call(x, backend):
    logp, ent = fused_linear_logprobs(x["hidden"], x["weight"], x["targets"], bias=x["bias"], with_entropy=True,
                                      backend=backend)
    grads = torch.autograd.grad((logp * x["mask"]).sum() + 0.1 * ent.sum(), [x[k] for k in DIFFERENTIABLE])
    return [logp, ent, *grads]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,layout", strided_cases(["hidden", "weight", "targets", "bias"]))
def test_fused_linear_logprobs_strided(name, layout, backend):
    x = inputs(seed=torch.seed() % 2**31)
    want = logprobs_call(with_layout(x, None, None), backend)
    got = logprobs_call(with_layout(x, name, layout), backend)
    assert not with_layout(x, name, layout)[name].is_contiguous()
    for what, a, b in zip(("logp", "entropy", "grad hidden", "grad weight", "grad bias"), got, want):
        assert_close(a, b, f"{what} with {name} {layout} ({backend})")
    truth = reference_logprobs(x["hidden"], x["weight"], x["targets"], x["bias"])
    assert float((got[0].double() - truth).abs().max()) < 1e-4


def loss_call(x, backend, source):
    kw = dict(old_logprobs=x["old_logprobs"], ref_logprobs=x["ref_logprobs"], bias=x["bias"], beta=0.04,
              is_ratio=x["is_ratio"], loss_type="grpo", backend=backend)
    if source == "rewards":
        kw.update(rewards=x["rewards"], num_generations=G)
    else:
        kw["advantages"] = x["advantages"]
    fn = reference_grpo_loss if backend == "reference" else fused_linear_grpo_loss
    if backend == "reference":
        kw.pop("backend")
    loss, metrics = fn(x["hidden"], x["weight"], x["targets"], x["mask"], **kw)
    return [loss, *torch.autograd.grad(loss, [x[k] for k in DIFFERENTIABLE])], metrics


LOSS_ARGS = ["hidden", "weight", "targets", "mask", "advantages", "rewards", "old_logprobs", "ref_logprobs", "bias",
             "is_ratio"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,layout", strided_cases(LOSS_ARGS))
def test_fused_linear_grpo_loss_strided(name, layout, backend):
    x = inputs(seed=torch.seed() % 2**31)
    source = "rewards" if name == "rewards" else "advantages"
    (want, want_m), (got, got_m) = (loss_call(with_layout(x, None, None), backend, source),
                                   loss_call(with_layout(x, name, layout), backend, source))
    assert not with_layout(x, name, layout)[name].is_contiguous()
    for what, a, b in zip(("loss", "grad hidden", "grad weight", "grad bias"), got, want):
        assert_close(a, b, f"{what} with {name} {layout} ({backend})")
    for k in want_m:
        assert_close(got_m[k].reshape(1), want_m[k].reshape(1), f"metric {k} with {name} {layout} ({backend})")
    (truth, *_), _ = loss_call(with_layout(x, None, None), "reference", source)
    assert abs(float(got[0]) - float(truth)) < 1e-4 * max(1.0, abs(float(truth)))


def test_group_advantages_strided():
    rewards = torch.rand(8, generator=torch.Generator().manual_seed(torch.seed() % 2**31))
    for scale in ("group", "batch", "none"):
        want = group_advantages(rewards, 4, scale_rewards=scale)
        got = group_advantages(every_other(rewards), 4, scale_rewards=scale)
        assert_close(got, want, f"group_advantages scale_rewards={scale}")
