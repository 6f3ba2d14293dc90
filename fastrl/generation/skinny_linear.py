"""Linear layers on a few rows on a CPU, as W @ xᵀ: the sampling loop's matrix products.

A decode step multiplies B rows (B = the completions sampled together, 8-64) by every weight of the model. With
torch 2.13's CPU BLAS on this AVX2 machine, F.linear's x @ Wᵀ on 8 rows of Qwen2.5-0.5B's head (896 -> 151936)
took 464-486 ms of CPU per call, where the same product ordered as W @ xᵀ (the tall weight times a thin matrix)
took 177-246 ms (/tmp microbenchmarks at commit 899ac1d, 8 and 16 rows, a loaded machine); at one row and from
~1024 rows on the plain order is as fast or faster. The whole sampling loop is measured side by side in
bench/bench_decode.py. Same products, summed in another order: the sampled logprobs agree to fp32 rounding.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

MIN_ROWS, MAX_ROWS = 2, 256


class SkinnyLinear(TorchFunctionMode):
    """Within `with SkinnyLinear():`, F.linear on fp32 CPU inputs of MIN_ROWS..MAX_ROWS rows computes (W @ xᵀ)ᵀ
    (bias added by the same addmm); everything else runs as it is."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            out = _skinny_linear(*args, **kwargs)
            if out is not None:
                return out
        return func(*args, **kwargs)


def _skinny_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor | None:
    """x [..., I], weight [O, I], bias [O] -> [..., O] as (W @ xᵀ)ᵀ, or None where the plain order is used."""
    rows = x.numel() // max(x.shape[-1], 1)
    if not (x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32 and weight.dim() == 2
            and MIN_ROWS <= rows <= MAX_ROWS and not torch.is_grad_enabled()):
        return None
    flat = x.reshape(rows, x.shape[-1])  # [n, I]
    out = torch.mm(weight, flat.T) if bias is None else torch.addmm(bias[:, None], weight, flat.T)  # [O, n]
    return out.T.contiguous().view(*x.shape[:-1], weight.shape[0])
