"""Device->host reads in the kernels' hot path: one per entry-point call (all input value checks batched into a
single read), none in the loss itself, on both backends; inside `deferred_value_checks` one per block, which the
trainer makes one per optimizer step.

On a GPU every read of a tensor's value on the host (`.item()`, `.tolist()`, `float(t)`, `if t:`, a boolean-mask
index, which must learn its result size) waits for the stream. CPU tensors cannot show a stall, so the test counts
those reads made from fastrl.kernels' own source lines while the entry points run (Triton's interpreter and torch
internals are not counted). On CUDA the `cuda` test asks torch's own sync detector.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

import helpers_tiny as tiny
from fastrl.kernels import fused_linear_grpo_loss, fused_linear_logprobs
from fastrl.kernels.checks import ValueChecks, deferred_value_checks

KERNELS_DIR = os.path.dirname(os.path.abspath(sys.modules["fastrl.kernels"].__file__))
READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "nonzero", "masked_select")
B, T, H, V = 3, 6, 32, 70


def count_kernel_reads(monkeypatch) -> list[str]:
    """Wrap the Tensor methods that read values back; record the kernels' source lines that call them."""
    seen: list[str] = []

    def record(caller, what):
        if os.path.realpath(caller.f_code.co_filename).startswith(os.path.realpath(KERNELS_DIR)):
            seen.append(f"{os.path.basename(caller.f_code.co_filename)}:{caller.f_lineno} {what}")

    def wrap(name, real):
        def reader(self, *args, **kwargs):
            record(sys._getframe(1), name)
            return real(self, *args, **kwargs)
        return reader

    for name in READS:
        monkeypatch.setattr(torch.Tensor, name, wrap(name, getattr(torch.Tensor, name)))
    real_getitem = torch.Tensor.__getitem__

    def getitem(self, index):
        if isinstance(index, torch.Tensor) and index.dtype == torch.bool:  # result size depends on the values
            record(sys._getframe(1), "boolean index")
        return real_getitem(self, index)

    monkeypatch.setattr(torch.Tensor, "__getitem__", getitem)
    return seen


def inputs():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(B, T, H, generator=g, requires_grad=True)
    w = (torch.randn(V, H, generator=g) / H ** 0.5).requires_grad_(True)
    y = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T)
    old = -torch.rand(B, T, generator=g) * 3 - 1
    return h, w, y, mask, old


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_grpo_loss_reads_the_device_once(monkeypatch, backend):
    h, w, y, mask, old = inputs()
    seen = count_kernel_reads(monkeypatch)
    loss, _ = fused_linear_grpo_loss(h, w, y, mask, rewards=torch.rand(B), num_generations=3, old_logprobs=old,
                                     ref_logprobs=old + 0.1, beta=0.04, is_ratio=torch.rand(B, T) + 0.5,
                                     top_entropy_quantile=0.5, loss_type="grpo", backend=backend)
    reads_in_forward = list(seen)
    loss.backward(torch.tensor(2.0))
    assert len(reads_in_forward) == 1 and "tolist" in reads_in_forward[0], reads_in_forward
    backward = seen[len(reads_in_forward):]
    # backward reads the incoming factor only for CPU tensors (a factor of 1 skips the scaling pass there; on CUDA
    # the factor stays on the device: kernels/grpo_loss.py)
    assert len(backward) == 1 and backward[0].startswith("grpo_loss.py") and "__float__" in backward[0], backward


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_logprobs_read_the_device_once(monkeypatch, backend):
    h, w, y, _, _ = inputs()
    seen = count_kernel_reads(monkeypatch)
    logp = fused_linear_logprobs(h, w, y, backend=backend)
    logp.sum().backward()
    assert len(seen) == 1 and "tolist" in seen[0], seen


def test_batched_checks_still_name_each_argument():
    h, w, y, mask, old = inputs()
    bad_old = old.clone()
    bad_old[1, 2] = float("nan")
    with pytest.raises(ValueError, match=r"old_logprobs: expected finite values \(no NaN or inf\), got 1 non-finite"):
        fused_linear_grpo_loss(h, w, y, mask, torch.randn(B), old_logprobs=bad_old, backend="torch")
    bad_y = y.clone()
    bad_y[0, 0] = V
    with pytest.raises(ValueError, match=r"targets: expected ids in \[0, V\) = \[0, 70\), got min \d+, max 70"):
        fused_linear_logprobs(h, w, bad_y, backend="torch")


def test_deferred_checks_read_once_and_still_name_each_argument(monkeypatch):
    h, w, y, mask, old = inputs()
    seen = count_kernel_reads(monkeypatch)
    with deferred_value_checks():
        for _ in range(3):
            fused_linear_logprobs(h, w, y, backend="torch")
        assert seen == []
    assert len(seen) == 1 and "tolist" in seen[0], seen
    bad_old = old.clone()
    bad_old[0, 1] = float("inf")
    with pytest.raises(ValueError, match=r"old_logprobs: expected finite values \(no NaN or inf\), got 1 non-finite"):
        with deferred_value_checks():
            loss, _ = fused_linear_grpo_loss(h, w, y, mask, torch.randn(B), old_logprobs=bad_old, backend="torch")
            loss.backward()
    bad_y = y.clone()
    bad_y[1, 0] = V + 3
    # the torch path's own index error comes first; the block re-raises it as the check's ValueError
    with pytest.raises(ValueError, match=r"targets: expected ids in \[0, V\) = \[0, 70\), got min \d+, max 73") as err:
        with deferred_value_checks():
            fused_linear_logprobs(h, w, bad_y, backend="torch")
    assert isinstance(err.value.__cause__, (IndexError, RuntimeError)), err.value.__cause__


def test_a_training_step_reads_the_kernels_checks_once(monkeypatch, model_dir, tmp_path):
    """Two optimizer steps of two micro-batches each (packed rows), beta > 0 (reference logprobs): many kernel calls
    per step, one read of their checks per step. Two reads that only the torch backend makes on CPU tensors, where
    no device is waited for, are left out: backward's incoming factor (kernels/grpo_loss.py) and the single pass's
    flag for rows whose target probability underflows (kernels/grpo_single_pass.py, one per row tile)."""
    from datasets import Dataset

    from fastrl import GRPOConfig, GRPOTrainer

    args = GRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, gradient_accumulation_steps=2,
                      num_generations=4, max_completion_length=4, max_steps=2, beta=0.04, bf16=False,
                      save_strategy="no", report_to="none", disable_tqdm=True)
    trainer = GRPOTrainer(model_dir, tiny.short_reward, args, train_dataset=Dataset.from_list(tiny.addition_rows(16)))
    calls = []
    real_run = ValueChecks.run
    monkeypatch.setattr(ValueChecks, "run", lambda self: calls.append(1) or real_run(self))
    seen = count_kernel_reads(monkeypatch)
    trainer.train()
    cpu_only = ("grpo_loss.py:", "__float__"), ("grpo_single_pass.py:", "__bool__")
    check_reads = [r for r in seen if not any(r.startswith(f) and r.endswith(m) for f, m in cpu_only)]
    assert len(calls) >= 2 * 3  # per step: two losses and at least one reference logprob call
    assert len(check_reads) == 2 and all("checks.py" in r and "tolist" in r for r in check_reads), seen


@pytest.mark.cuda
def test_no_unexpected_sync_on_cuda():
    """torch's sync debug mode raises on any synchronizing call; the one batched check read is allowed."""
    h, w, y, mask, old = (t.cuda() for t in inputs())
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with pytest.warns(UserWarning) as record:
            loss, _ = fused_linear_grpo_loss(h, w, y, mask, torch.randn(B, device="cuda"), old_logprobs=old,
                                             top_entropy_quantile=0.5)
            loss.backward()
        assert len([r for r in record if "synchroniz" in str(r.message)]) == 1
    finally:
        torch.cuda.set_sync_debug_mode(0)
