"""fused_linear_grpo_loss on packed rows (hidden [N, H] + cu_seqlens) against the same loss on the padded batch
[B, T, H] and against the float64 reference: every loss type × token/sequence importance sampling × beta, on
both backends (Triton in the interpreter), with ragged lengths including an empty completion.

Tolerance: float32 inputs. Packed and padded rows go through the same per-row arithmetic, but the torch path's
row tiles (and so the summation order of dW) differ with the row count: rtol 1e-5 / atol 1e-6 on the loss and
the gradients, 1e-5 on metrics. Against float64: the padded test suite's rule (test_grpo_loss.py)."""
import itertools

import pytest
import torch

from fastrl.kernels import fused_linear_grpo_loss
from fastrl.kernels.loss_spec import LOSS_TYPES
from fastrl.kernels.reference import reference_grpo_loss
from kernel_cases import make_linear_inputs

pytestmark = pytest.mark.usefixtures("poison_empty")


def ragged_batch(seed, lengths, H=24, V=70):
    """Padded inputs [B, T] plus the packed view of their valid rows; sequence 2's completion is empty."""
    B, T = len(lengths), max(lengths)
    h, w, y, _ = make_linear_inputs(0, H, V, torch.float32, seed, lead=(B, T))
    g = torch.Generator().manual_seed(seed + 1)
    valid = torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]  # [B, T]
    mask = (valid & (torch.rand(B, T, generator=g) > 0.15)).float()  # some valid rows are masked out of the loss
    with torch.no_grad():
        logp = torch.log_softmax(h.detach() @ w.detach().T, -1).gather(-1, y[..., None])[..., 0]
    old = logp + 0.3 * torch.randn(B, T, generator=g)
    ref = logp + 0.4 * torch.randn(B, T, generator=g)
    isr = torch.rand(B, T, generator=g) + 0.5
    cu = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32)
    return dict(h=h, w=w, y=y, mask=mask, valid=valid, old=old, ref=ref, isr=isr, cu=cu,
                adv=torch.randn(B, generator=g), sampling=old + 0.2 * torch.randn(B, T, generator=g))


def losses(batch, loss_type, level, beta, is_ratio, backend, sampling=False, **options):
    """(padded, packed) results: (loss, metrics, dh [B, T, H], dW)."""
    v = batch["valid"]
    kw = dict(loss_type=loss_type, importance_sampling_level=level, beta=beta, max_completion_length=9,
              backend=backend, **options)
    padded_kw = dict(old_logprobs=batch["old"], ref_logprobs=batch["ref"] if beta else None)
    packed_kw = dict(old_logprobs=batch["old"][v], ref_logprobs=batch["ref"][v] if beta else None,
                     cu_seqlens=batch["cu"])
    if sampling:
        padded_kw["sampling_logprobs"], packed_kw["sampling_logprobs"] = batch["sampling"], batch["sampling"][v]
    if is_ratio == "token":
        padded_kw["is_ratio"], packed_kw["is_ratio"] = batch["isr"], batch["isr"][v]
    elif is_ratio == "sequence":
        padded_kw["is_ratio"] = packed_kw["is_ratio"] = batch["isr"][:, :1]
    out = []
    for hidden, y, mask, extra in ((batch["h"], batch["y"], batch["mask"], padded_kw),
                                   (batch["h"][v], batch["y"][v], batch["mask"][v], packed_kw)):
        loss, metrics = fused_linear_grpo_loss(hidden, batch["w"], y, mask, batch["adv"], **kw, **extra)
        dh, dw = torch.autograd.grad(loss, (batch["h"], batch["w"]))
        out.append((loss, metrics, dh, dw))
    return out


CASES = [(t, level, beta) for t in LOSS_TYPES for level in ("token", "sequence") for beta in (0.0, 0.05)]


@pytest.mark.parametrize("loss_type, level, beta", CASES)
def test_packed_equals_padded_torch(loss_type, level, beta):
    seed = 100 + CASES.index((loss_type, level, beta))
    batch = ragged_batch(seed, [7, 3, 0, 11, 5, 1])
    is_ratio = ("token", "sequence", None)[seed % 3]
    if loss_type == "vespo" and is_ratio == "sequence":  # VESPO takes per-token ratios only (TRL)
        is_ratio = "token"
    (a_loss, a_m, a_dh, a_dw), (b_loss, b_m, b_dh, b_dw) = losses(batch, loss_type, level, beta, is_ratio, "torch")
    torch.testing.assert_close(b_loss, a_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(b_dh, a_dh, rtol=1e-5, atol=1e-6)  # padding rows: no gradient in either
    torch.testing.assert_close(b_dw, a_dw, rtol=1e-5, atol=1e-6)
    assert set(a_m) == set(b_m)
    for k in a_m:
        torch.testing.assert_close(b_m[k], a_m[k], rtol=1e-5, atol=1e-6, msg=k)
    truth, _ = reference_grpo_loss(batch["h"], batch["w"], batch["y"], batch["mask"], batch["adv"],
                                   old_logprobs=batch["old"], ref_logprobs=batch["ref"] if beta else None,
                                   loss_type=loss_type, importance_sampling_level=level, beta=beta,
                                   max_completion_length=9,
                                   is_ratio={"token": batch["isr"], "sequence": batch["isr"][:, :1]}.get(is_ratio))
    torch.testing.assert_close(b_loss.double(), truth, rtol=1e-5, atol=1e-6)
    assert a_dh.abs().sum() > 0 and a_dh[~batch["valid"]].abs().max() == 0


@pytest.mark.parametrize("loss_type, level", [("grpo", "sequence"), ("dapo", "token"), ("sapo", "token"),
                                              ("cispo", "sequence")])
def test_packed_equals_padded_triton(loss_type, level):
    pytest.importorskip("triton")
    batch = ragged_batch(7 + LOSS_TYPES.index(loss_type), [9, 2, 0, 16, 5])
    (a_loss, _, a_dh, a_dw), (b_loss, _, b_dh, b_dw) = losses(batch, loss_type, level, 0.05, "token", "triton")
    torch.testing.assert_close(b_loss, a_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(b_dh, a_dh, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(b_dw, a_dw, rtol=1e-5, atol=1e-6)


OPTION_CASES = {  # TRL's loss-side options, whose per-sequence and batch sums must see only each sequence's rows
    "vespo-is": ("vespo", "token", {}),
    "bonus-quantile": ("grpo", "sequence", dict(entropy_coef=0.1, top_entropy_quantile=0.5)),
    "mask-sampling": ("dapo", "token", dict(off_policy_mask_threshold=0.0, sampling=True)),
}


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("case", OPTION_CASES)
def test_packed_equals_padded_with_loss_options(case, backend):
    if backend == "triton":
        pytest.importorskip("triton")
    loss_type, level, options = OPTION_CASES[case]
    batch = ragged_batch(40 + list(OPTION_CASES).index(case), [9, 2, 0, 16, 5, 7])
    (a_loss, a_m, a_dh, a_dw), (b_loss, b_m, b_dh, b_dw) = losses(batch, loss_type, level, 0.05, "token", backend,
                                                                  **options)
    torch.testing.assert_close(b_loss, a_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(b_dh, a_dh, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(b_dw, a_dw, rtol=1e-5, atol=1e-6)
    for k in a_m:
        torch.testing.assert_close(b_m[k], a_m[k], rtol=1e-5, atol=1e-6, msg=k)


def test_bad_cu_seqlens_are_named():
    batch = ragged_batch(3, [4, 2])
    v = batch["valid"]
    args = (batch["h"][v], batch["w"], batch["y"][v], batch["mask"][v])
    for bad in (torch.tensor([0, 4]), torch.tensor([0, 7, 6]), torch.tensor([1, 4, 6]), torch.tensor([0.0, 4, 6])):
        with pytest.raises(ValueError, match="cu_seqlens"):  # advantages [B] as long as bad's B: only it is wrong
            fused_linear_grpo_loss(*args, batch["adv"][: bad.numel() - 1], cu_seqlens=bad)
    with pytest.raises(ValueError, match="hidden"):
        fused_linear_grpo_loss(batch["h"], batch["w"], batch["y"], batch["mask"], batch["adv"],
                               cu_seqlens=batch["cu"])
    with pytest.raises(ValueError, match="old_logprobs"):
        fused_linear_grpo_loss(*args, cu_seqlens=batch["cu"], old_logprobs=batch["old"])


def test_reference_reads_packed_rows_like_padded():
    batch = ragged_batch(11, [5, 0, 8, 2])
    v = batch["valid"]
    kw = dict(loss_type="grpo", importance_sampling_level="sequence", beta=0.05)
    padded, _ = reference_grpo_loss(batch["h"], batch["w"], batch["y"], batch["mask"], batch["adv"],
                                    old_logprobs=batch["old"], ref_logprobs=batch["ref"], is_ratio=batch["isr"], **kw)
    packed, _ = reference_grpo_loss(batch["h"][v], batch["w"], batch["y"][v], batch["mask"][v], batch["adv"],
                                    old_logprobs=batch["old"][v], ref_logprobs=batch["ref"][v],
                                    is_ratio=batch["isr"][v], cu_seqlens=batch["cu"], **kw)
    torch.testing.assert_close(packed, padded, rtol=1e-12, atol=0)
