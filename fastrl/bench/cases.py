"""What the kernel suite measures: one `KernelCase` per (operation, mode, shape, dtype), grouped in sweeps.

A case is plain data (it crosses into worker processes as JSON). Its inputs are built from a seed, so every
provider, in every process, sees the same tensors.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import torch

OPERATIONS = ("logprobs", "grpo_loss")
MODES = ("forward", "backward", "full")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
VOCABS = (32768, 65536, 151936)  # a 32k vocabulary (Llama 2, Mistral), 64k, Qwen2/2.5's 151936
QUICK_VOCABS = (VOCABS[0], VOCABS[-1])  # --quick: the two ends of the sweep, enough to see memory stay flat in V


@dataclass(frozen=True)
class KernelCase:
    operation: str  # "logprobs" (token logprobs + entropy) | "grpo_loss"
    mode: str  # "forward" | "backward" | "full" (forward + backward)
    B: int  # completions
    T: int  # completion positions; N = B·T rows
    H: int  # hidden size
    V: int  # vocabulary size
    dtype: str = "float32"
    sweep: str = "vocab"  # which sweep the case belongs to: its x axis is x_name
    x_name: str = "V"
    # GRPO loss settings (issue 2's headline: beta 0.04, dapo; DAPO's clip-higher epsilon_high)
    beta: float = 0.04
    loss_type: str = "dapo"
    epsilon: float = 0.2
    epsilon_high: float = 0.28
    temperature: float = 1.0
    seed: int = 0

    @property
    def N(self) -> int:
        return self.B * self.T

    @property
    def x_value(self) -> int:
        return {"V": self.V, "N": self.N, "H": self.H, "B": self.B, "T": self.T}[self.x_name]

    @property
    def case_id(self) -> str:
        dt = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}[self.dtype]
        return f"{self.operation}-{self.mode}-{dt}-B{self.B}-T{self.T}-H{self.H}-V{self.V}"

    def flops(self, mode: str | None = None) -> float:
        """Matmul flops of the fused algorithm: 2·N·H·V for the forward sweep, 6·N·H·V for the gradient sweep
        (recompute the logits tile, then dh and dW), 8·N·H·V for forward + backward (DESIGN.md)."""
        unit = 2.0 * self.N * self.H * self.V
        return {"forward": 1, "backward": 3, "full": 4}[mode or self.mode] * unit

    def grad_mib(self) -> float:
        """Size of what backward/full return, the gradients of hidden [N, H] and weight [V, H] in the input dtype:
        the same for every provider, and growing with V (dW)."""
        if self.mode == "forward":
            return 0.0
        return (self.N + self.V) * self.H * DTYPES[self.dtype].itemsize / 2**20

    def config(self) -> dict:
        d = asdict(self)
        d["N"] = self.N
        return d

    @staticmethod
    def from_dict(d: dict) -> "KernelCase":
        fields = KernelCase.__dataclass_fields__
        return KernelCase(**{k: v for k, v in d.items() if k in fields})


HEADLINE = KernelCase("grpo_loss", "full", B=8, T=256, H=256, V=32768, sweep="headline")


def suite_cases(quick: bool) -> list[KernelCase]:
    """The cases of one run. quick: the headline case, the GRPO loss at the smallest and largest vocabulary at a
    small N (memory flat in V?), and logprobs at one size; each in fp32, forward+backward. Sized so that
    `fastrl bench --quick` takes under 5 minutes on a quiet 2-core CPU: 4 timing processes + 16 memory processes
    (one per provider), each paying seconds of imports (torch, TRL, Liger) before it measures anything.
    Full: every operation × mode × dtype over the three vocabularies at N = 1024, plus token and hidden sweeps."""
    if quick:
        # N = 128: at V = 151936 the materialized fp32 logits are 74 MiB, Liger eager ~5 s per call on 2 cores
        small = dict(B=2, T=64, H=128)
        return ([HEADLINE]
                + [KernelCase("grpo_loss", "full", V=v, **small) for v in QUICK_VOCABS]
                + [KernelCase("logprobs", "full", V=VOCABS[0], **small)])
    cases = [HEADLINE]
    base = dict(B=4, T=256, H=256)  # N = 1024
    for dtype in ("float32", "bfloat16"):
        for op in OPERATIONS:
            for mode in MODES:
                cases += [KernelCase(op, mode, V=v, dtype=dtype, **base) for v in VOCABS]
        cases += [KernelCase("grpo_loss", "full", B=b, T=256, H=256, V=32768, dtype=dtype, sweep="tokens",
                             x_name="N") for b in (2, 4, 8, 16)]
        cases += [KernelCase("grpo_loss", "full", B=4, T=256, H=h, V=32768, dtype=dtype, sweep="hidden",
                             x_name="H") for h in (128, 256, 512, 1024)]
    return cases


def tiny_cases() -> list[KernelCase]:
    """Seconds-long cases for tests of the machinery (not results)."""
    small = dict(B=2, T=16, H=32, V=512)
    return [KernelCase(op, mode, **small) for op in OPERATIONS for mode in MODES] + \
        [replace(KernelCase("grpo_loss", "full", **small), V=1024)]


def make_inputs(case: KernelCase, device: str | torch.device = "cpu") -> dict:
    """The tensors every provider receives. hidden [B, T, H] and weight [V, H] require grad (a trainable head);
    logits come out ~N(0, 1) (weight scaled by H^-1/2); about a fifth of each completion is padding (mask 0);
    old/ref logprobs sit near the uniform -log V with noise, so clipping and the KL term both do work."""
    dtype = DTYPES[case.dtype]
    g = torch.Generator().manual_seed(case.seed)
    B, T, H, V = case.B, case.T, case.H, case.V
    hidden = torch.randn(B, T, H, generator=g).to(device=device, dtype=dtype).requires_grad_(True)
    weight = (torch.randn(V, H, generator=g) * H ** -0.5).to(device=device, dtype=dtype).requires_grad_(True)
    targets = torch.randint(0, V, (B, T), generator=g).to(device)
    lengths = torch.randint(max(1, (4 * T) // 5), T + 1, (B,), generator=g)
    mask = (torch.arange(T)[None, :] < lengths[:, None]).to(device=device, dtype=torch.float32)
    advantages = torch.randn(B, generator=g).to(device)
    base = -torch.log(torch.tensor(float(V)))
    old = (base + 0.3 * torch.randn(B, T, generator=g)).to(device)
    ref = (base + 0.3 * torch.randn(B, T, generator=g)).to(device)
    return dict(hidden=hidden, weight=weight, targets=targets, mask=mask, advantages=advantages,
                old_logprobs=old, ref_logprobs=ref)


def input_bytes(inputs: dict) -> int:
    return sum(t.numel() * t.element_size() for t in inputs.values() if isinstance(t, torch.Tensor))
