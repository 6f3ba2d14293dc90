"""Compile every Triton kernel ahead of time for sm_80 and sm_90 and report what the GPU would run.

    python -m fastrl.kernels.report            # a table
    python -m fastrl.kernels.report --json     # a JSON list, one record per kernel × arch (× H)

No GPU is needed: `triton.compile(ASTSource(...), target=GPUTarget("cuda", 80|90, 32))` runs the whole compiler
down to a cubin. Each kernel is compiled with the tile sizes, warps and stages its launcher uses, at a
representative shape (bf16, N 8192, H 896 and 4096, V 151936: Qwen2.5-0.5B and a 7B-class hidden size over the
Qwen vocabulary), with the same 16-divisibility specialization a real launch would give those sizes. The sweeps
are also compiled for fp32 inputs at H 4096, both ways a launch runs them ("dot"): "tf32" (tensor cores, when
torch allows TF32) and "fp32-fma" (IEEE fp32 on FMA units, torch's default; no tensor cores by nature).

Per record:
- registers, stack_bytes, shared_bytes (dynamic shared memory the launch requests; static shared from the cubin
  is added): Triton's bundled `cuobjdump --dump-resource-usage` on the cubin, and the kernel metadata;
- spills: bytes of spill stores + loads reported by the bundled `ptxas -v` on the same PTX, plus cuobjdump's
  LOCAL bytes (local memory is where spills go). The goal is 0 for every kernel;
- tensor_core_instructions: `mma` instructions in the PTX on sm_80, `wgmma.mma_async` on sm_90. The goal is > 0
  for both vocabulary sweeps (bf16 and tf32 dots).
The sweeps are compiled once more with SOFTCAP=True (tanh soft-capping of the logits, `*_softcap` records) at the
larger H, in each dot mode.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass, field

ARCHS = (80, 90)
HIDDEN_SIZES = (896, 4096)
N_ROWS = 8192  # B·T of a typical GRPO micro-batch (e.g. 16 completions × 512 tokens)
VOCAB = 151936  # Qwen2/2.5 vocabulary
GRAD_VARIANTS = ("grad_sweep", "grad_sweep_frozen_head", "grad_hidden_ordered", "grad_weight_ordered")
SOFTCAP_SUFFIX = "_softcap"  # the kernels compiled with SOFTCAP=True (LogitTransform.softcap set)
ENTROPY_SUFFIX = "_entropy"  # the gradient sweeps compiled with HAS_ENTROPY_GRAD=True


@dataclass
class KernelSpec:
    """One compilation: a kernel, its argument types and representative values, its constexprs and launch options."""

    name: str
    fn: object
    args: dict  # name -> (triton type string, representative int or None)
    constexprs: dict
    num_warps: int
    num_stages: int
    extra: dict = field(default_factory=dict)  # reported as-is (e.g. H, tile sizes)

    def signature(self) -> dict:
        """{argument: type} in the kernel's argument order, constexprs included."""
        types = {name: ty for name, (ty, _) in self.args.items()}
        return {name: types.get(name, "constexpr") for name in self.fn.arg_names}

    def attrs(self) -> dict:
        """tt.divisibility=16 where a real launch would specialize: every pointer, and ints divisible by 16."""
        names = list(self.fn.arg_names)
        out = {}
        for name, (ty, value) in self.args.items():
            if ty.startswith("*") or (value is not None and ty == "i32" and value % 16 == 0):
                out[(names.index(name),)] = [["tt.divisibility", 16]]
        return out


LOGIT_SCALARS = ("z_scale", "bias_scale", "cap_scale", "grad_scale")  # a LogitTransform's factors (forward: 3)


def _sweep_args(h: int) -> dict:
    return {"N": ("i32", N_ROWS), "H": ("i32", h), "V": ("i32", VOCAB), "stride_hn": ("i32", h),
            "stride_wv": ("i32", h), **{k: ("fp32", None) for k in LOGIT_SCALARS}}


# How the dots run: bf16 operands; fp32 operands as TF32 (torch.set_float32_matmul_precision("high"/"medium"));
# fp32 operands as IEEE fp32 on FMA units (torch's default "highest"). name -> (pointer dtype, DOT_PRECISION).
DOTS = {"bf16": ("bf16", "ieee"), "tf32": ("fp32", "tf32"), "fp32-fma": ("fp32", "ieee")}
TENSOR_CORE_DOTS = ("bf16", "tf32")


def _operand_args(dtype: str) -> dict:
    return {"p_h": (f"*{dtype}", None), "p_w": (f"*{dtype}", None), "p_b": (f"*{dtype}", None),
            "p_y": ("*i64", None)}


def _torch_dtype(dtype: str):
    import torch

    return {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]


def _forward_spec(h: int, dot: str = "bf16", softcap: bool = False) -> KernelSpec:
    from .forward_sweep_triton import _forward_sweep_kernel, forward_config

    dtype, precision = DOTS[dot]
    c = forward_config(_torch_dtype(dtype), precision)
    args = {**_operand_args(dtype), "p_lse": ("*fp32", None), "p_logp": ("*fp32", None), "p_ent": ("*fp32", None),
            **_sweep_args(h)}
    const = {"HAS_BIAS": False, "SOFTCAP": softcap, "WITH_ENTROPY": True, "DOT_FP32": False,
             "DOT_PRECISION": precision, "BLOCK_N": c.block_n, "BLOCK_V": c.block_v, "BLOCK_H": c.block_h}
    return KernelSpec("forward_sweep" + SOFTCAP_SUFFIX * softcap, _forward_sweep_kernel, args, const, c.num_warps,
                      c.num_stages, {"H": h, "dot": dot, "blocks": [c.block_n, c.block_v, c.block_h]})


def _grad_spec(h: int, variant: str, dot: str = "bf16", softcap: bool = False, entropy: bool = False) -> KernelSpec:
    """variant: "grad_sweep" (atomics, dh + dW), "grad_sweep_frozen_head" (atomics, dh only), or the
    deterministic pair "grad_hidden_ordered" / "grad_weight_ordered"; entropy: with dL/dentropy (the entropy
    bonus, or a logprobs caller that uses the entropy)."""
    from . import grad_sweep_triton as g
    from .forward_sweep_triton import forward_config

    dtype, precision = DOTS[dot]
    c = g.grad_config(_torch_dtype(dtype), precision)
    fn, outputs, needs = {
        "grad_sweep": (g._grad_sweep_kernel, ["p_dh", "p_dw", "p_db"], {"NEED_DH": True, "NEED_DW": True}),
        "grad_sweep_frozen_head": (g._grad_sweep_kernel, ["p_dh", "p_dw", "p_db"],
                                   {"NEED_DH": True, "NEED_DW": False}),
        "grad_hidden_ordered": (g._grad_hidden_ordered_kernel, ["p_dh"], {}),
        "grad_weight_ordered": (g._grad_weight_ordered_kernel, ["p_dw", "p_db"], {"NEED_DW": True}),
    }[variant]
    if "p_db" in outputs:
        needs["NEED_DB"] = False  # Qwen-style heads have no bias
    ptrs = ["p_lse", "p_g", "p_ge", "p_ent", *outputs]
    args = {**_operand_args(dtype), **{p: ("*fp32", None) for p in ptrs}, **_sweep_args(h)}
    const = {"HAS_BIAS": False, "SOFTCAP": softcap, "HAS_ENTROPY_GRAD": entropy, **needs, "DOT_FP32": False,
             "DOT_PRECISION": precision, "BLOCK_N": c.block_n, "BLOCK_V": c.block_v, "BLOCK_H": c.block_h,
             "BLOCK_HZ": forward_config(_torch_dtype(dtype), precision).block_h}
    stages = (g.ordered_num_stages(_torch_dtype(dtype)) if "ordered" in variant
              else g.atomic_num_stages(c, needs["NEED_DW"], entropy))
    return KernelSpec(variant + SOFTCAP_SUFFIX * softcap + ENTROPY_SUFFIX * entropy, fn, args, const, c.num_warps,
                      stages, {"H": h, "dot": dot, "blocks": [c.block_n, c.block_v, c.block_h]})


def kernel_specs() -> list[KernelSpec]:
    specs = []
    for h in HIDDEN_SIZES:
        specs += [_forward_spec(h)] + [_grad_spec(h, variant) for variant in GRAD_VARIANTS]
    for dot in ("tf32", "fp32-fma"):  # fp32 inputs at the larger H: twice the operand bytes, the tightest fit
        specs += [_forward_spec(max(HIDDEN_SIZES), dot)] + [_grad_spec(max(HIDDEN_SIZES), v, dot)
                                                             for v in GRAD_VARIANTS]
    for dot in DOTS:  # tanh soft-capping (Gemma2/3) adds an exp and a division per logit, in every dot mode
        specs += [_forward_spec(max(HIDDEN_SIZES), dot, True)] + [_grad_spec(max(HIDDEN_SIZES), v, dot, True)
                                                                  for v in GRAD_VARIANTS]
    for dot in DOTS:  # with dL/dentropy (the entropy bonus): a second [BN, BV] term in dz, in every dot mode
        specs += [_grad_spec(max(HIDDEN_SIZES), v, dot, entropy=True) for v in GRAD_VARIANTS]
    specs += _epilogue_specs()
    return specs


def _epilogue_spec(sequence_level: bool, loss: str = "clip", options: bool = False) -> KernelSpec:
    """The epilogue at a mean completion length of 1024; `options`: TRL's loss-side options all on (the entropy
    quantile and bonus, the off-policy mask on sampling logprobs), the most registers any variant holds."""
    from .grpo_epilogue_triton import NORM_MASK_TOTAL, NUM_WARPS, OBJECTIVE_KIND, _grpo_epilogue_kernel, block_t

    length = 1024  # mean completion length N / B (packed rows; the loops run to each sequence's own length)
    ptrs = ["p_logp", "p_mask", "p_adv", "p_old", "p_ref", "p_isr", "p_ent", "p_samp", "p_mask_total", "p_g",
            "p_gent", "p_part", "p_ent_thr", "p_bonus_tokens"]
    scalars = ("n_seq", "norm_const", "beta", "eps_low", "eps_high", "delta", "t_pos", "t_neg", "k_pos", "lam_pos",
               "k_neg", "lam_neg", "opsm_thr", "ent_coef")
    args = {**{p: ("*fp32", None) for p in ptrs}, "p_cu": ("*i64", None), "stride_isr_b": ("i32", None),
            "stride_isr_t": ("i32", None), **{k: ("fp32", None) for k in scalars}}
    const = {"LOSS": OBJECTIVE_KIND[loss], "NORM": NORM_MASK_TOTAL, "SEQ_LEVEL": sequence_level,
             "HAS_OLD": True, "HAS_KL": True, "BIAS_KL": False, "HAS_DELTA": False, "HAS_IS": True,
             "HAS_ENT": True, "ENT_MASK": options, "OPSM": options, "HAS_SAMP": options, "BONUS": options,
             "BLOCK_T": block_t(length)}
    name = "grpo_epilogue" + ("_sequence" if sequence_level else "") + ("" if loss == "clip" else f"_{loss}") + \
        ("_options" if options else "")
    return KernelSpec(name, _grpo_epilogue_kernel, args, const, NUM_WARPS, 1,
                      {"mean_T": length, "blocks": [block_t(length)]})


def _epilogue_specs() -> list[KernelSpec]:
    return [_epilogue_spec(False), _epilogue_spec(True), _epilogue_spec(False, "vespo", True),
            _epilogue_spec(True, "clip", True)]


def _bin(tool: str) -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", tool)


def _ptxas_spills(ptx: str, arch: int) -> int:
    """Spill bytes (stores + loads) from `ptxas -v` on the PTX: the ptxas and flags Triton itself uses."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        cmd = [get_ptxas(arch).path, "-lineinfo", "-v", "--regAllocOptLevel=2",
               f"--gpu-name={sm_arch_from_capability(arch)}", src, "-o", os.path.join(tmp, "k.cubin")]
        log = subprocess.run(cmd, capture_output=True, text=True, check=True).stderr
    stores = sum(int(x) for x in re.findall(r"(\d+) bytes spill stores", log))
    loads = sum(int(x) for x in re.findall(r"(\d+) bytes spill loads", log))
    return stores + loads


def _resource_usage(cubin: bytes) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([_bin("cuobjdump"), "--dump-resource-usage", f.name], capture_output=True, text=True,
                             check=True).stdout
    fields = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", out))
    return {k: int(v) for k, v in fields.items()}


def compile_and_measure(spec: KernelSpec, arch: int) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(fn=spec.fn, signature=spec.signature(), constexprs=spec.constexprs, attrs=spec.attrs())
    kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                            options={"num_warps": spec.num_warps, "num_stages": spec.num_stages})
    usage = _resource_usage(kernel.asm["cubin"])
    ptxas_spill = _ptxas_spills(kernel.asm["ptx"], arch)
    ptx = kernel.asm["ptx"]
    pattern = r"^\s*wgmma\.mma_async" if arch >= 90 else r"^\s*mma\."
    return {
        "kernel": spec.name, "arch": f"sm_{arch}", "registers": usage["REG"],
        "spills": ptxas_spill + usage.get("LOCAL", 0),
        "shared_bytes": kernel.metadata.shared + usage.get("SHARED", 0),
        "tensor_core_instructions": len(re.findall(pattern, ptx, re.M)),
        "stack_bytes": usage.get("STACK", 0), "num_warps": spec.num_warps, "num_stages": spec.num_stages,
        **spec.extra,
    }


def run_report() -> list[dict]:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("TRITON_INTERPRET is set: the kernels are interpreted, nothing can be compiled; unset it")
    return [compile_and_measure(spec, arch) for spec in kernel_specs() for arch in ARCHS]


def format_table(records: list[dict]) -> str:
    cols = ["kernel", "arch", "dot", "H", "registers", "spills", "shared_bytes", "tensor_core_instructions", "num_warps",
            "blocks"]
    rows = [[str(r.get(c, "")) for c in cols] for r in records]
    widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in rows]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    args = parser.parse_args(argv)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, stated to silence its warning
    records = run_report()
    print(json.dumps(records, indent=1) if args.json else format_table(records))


if __name__ == "__main__":
    main()
