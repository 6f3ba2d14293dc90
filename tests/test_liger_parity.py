"""The same inputs through Liger's LigerFusedLinearGRPOLoss (a peer, real package) give the same loss and
gradients: token-level sampling, each loss type both support, with a KL term."""
import pytest
import torch

from fastrl.kernels import fused_linear_grpo_loss

liger_grpo = pytest.importorskip("liger_kernel.chunked_loss.grpo_loss")

# Both compute in fp32 from fp32 inputs but sum in different orders (Liger: per chunk with autograd).
ATOL, RTOL = 2e-5, 1e-4


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo"])
def test_same_loss_and_gradients_as_liger(loss_type):
    B, T, H, V = 4, 9, 32, 301
    seed = torch.seed() % 2**31
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, T, H, generator=g, requires_grad=True)
    w = (torch.randn(V, H, generator=g) * 0.2).requires_grad_(True)
    b = (torch.randn(V, generator=g) * 0.1).requires_grad_(True)
    y = torch.randint(0, V, (B, T), generator=g)
    mask = (torch.rand(B, T, generator=g) > 0.2).long()
    adv = torch.randn(B, generator=g)
    with torch.no_grad():
        base = torch.log_softmax(h @ w.T + b, -1).gather(-1, y[..., None]).squeeze(-1)
    old = base + 0.3 * torch.randn(B, T, generator=g)
    ref = base + 0.3 * torch.randn(B, T, generator=g)
    kw = dict(beta=0.04, loss_type=loss_type, max_completion_length=T, epsilon=0.2, epsilon_high=0.28)

    ours, _ = fused_linear_grpo_loss(h, w, y, mask, adv, bias=b, old_logprobs=old, ref_logprobs=ref, backend="torch",
                                     **kw)
    ours_grads = torch.autograd.grad(ours, (h, w, b))
    liger = liger_grpo.LigerFusedLinearGRPOLoss(
        beta=0.04, compiled=False, use_ref_model=True, epsilon_low=0.2, epsilon_high=0.28, loss_type=loss_type,
        max_completion_length=T)
    out = liger(h, w, y, mask, adv, bias=b, ref_per_token_logps=ref, old_per_token_logps=old)
    theirs = out[0] if isinstance(out, tuple) else out
    theirs_grads = torch.autograd.grad(theirs, (h, w, b))
    assert float(ours) == pytest.approx(float(theirs), rel=RTOL, abs=ATOL), f"loss, seed={seed}"
    for name, a, e in zip(("hidden", "weight", "bias"), ours_grads, theirs_grads):
        assert torch.allclose(a, e, rtol=RTOL, atol=ATOL), f"grad {name}, seed={seed}: {float((a - e).abs().max())}"
