"""The ahead-of-time compile report: every Triton kernel compiles for sm_80 and sm_90 with no spills, and both
vocabulary sweeps use tensor cores. Runs `python -m fastrl.kernels.report --json` once, in a subprocess without
TRITON_INTERPRET (under the interpreter nothing is compiled), ~1 minute on a cold Triton cache on a quiet machine;
with the entropy-gradient and loss-option variants (28 more compiles) over 15 minutes on a shared, busy one."""
import json
import os
import subprocess
import sys

import pytest

from fastrl.kernels.report import (ARCHS, DOTS, ENTROPY_SUFFIX, HIDDEN_SIZES, SOFTCAP_SUFFIX, TENSOR_CORE_DOTS,
                                   format_table)

SWEEPS = ("forward_sweep", "grad_sweep", "grad_sweep_frozen_head", "grad_hidden_ordered", "grad_weight_ordered")
# Largest dynamic shared memory a block may request (CUDA programming guide, compute capabilities table).
MAX_SHARED = {"sm_80": 163 * 1024, "sm_90": 227 * 1024}


@pytest.fixture(scope="module")
def records():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-m", "fastrl.kernels.report", "--json"], env=env, capture_output=True,
                         text=True, timeout=2400)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout)


def test_every_kernel_is_reported_for_both_archs_hidden_sizes_and_dtypes(records):
    seen = {(r["kernel"], r["arch"], r.get("H"), r.get("dot")) for r in records}
    for kernel in SWEEPS:
        for arch in ARCHS:
            for h in HIDDEN_SIZES:
                assert (kernel, f"sm_{arch}", h, "bf16") in seen
            for dot in ("tf32", "fp32-fma"):
                assert (kernel, f"sm_{arch}", max(HIDDEN_SIZES), dot) in seen
    assert {r["arch"] for r in records if r["kernel"] == "grpo_epilogue"} == {f"sm_{a}" for a in ARCHS}
    for r in records:
        assert {"kernel", "arch", "registers", "spills", "shared_bytes", "tensor_core_instructions"} <= r.keys()


def test_softcap_sweeps_are_reported_and_use_tensor_cores(records):
    """The SOFTCAP=True variants (tanh soft-capping, LogitTransform.softcap) in every dot mode on both archs."""
    by_key = {(r["kernel"], r["arch"], r["dot"]): r for r in records if r["kernel"].endswith(SOFTCAP_SUFFIX)}
    for kernel in SWEEPS:
        for arch in ARCHS:
            for dot in DOTS:
                r = by_key[(kernel + SOFTCAP_SUFFIX, f"sm_{arch}", dot)]
                assert dot not in TENSOR_CORE_DOTS or r["tensor_core_instructions"] > 0, r


def test_entropy_gradient_sweeps_and_loss_option_epilogues_are_reported(records):
    """The gradient sweeps with dL/dentropy (the entropy bonus) in every dot mode, and the epilogue with VESPO and
    with every loss-side option on, on both archs (their spills are checked below with the rest)."""
    by_key = {(r["kernel"], r["arch"], r.get("dot")): r for r in records}
    for kernel in SWEEPS[1:]:
        for arch in ARCHS:
            for dot in DOTS:
                r = by_key[(kernel + ENTROPY_SUFFIX, f"sm_{arch}", dot)]
                assert dot not in TENSOR_CORE_DOTS or r["tensor_core_instructions"] > 0, r
    for kernel in ("grpo_epilogue_vespo_options", "grpo_epilogue_sequence_options"):
        assert {r["arch"] for r in records if r["kernel"] == kernel} == {f"sm_{a}" for a in ARCHS}


def test_no_kernel_spills(records):
    spilled = [(r["kernel"], r["arch"], r.get("H"), r["spills"]) for r in records if r["spills"] != 0]
    assert not spilled, f"spills (bytes of local memory traffic): {spilled}"


def test_sweeps_use_tensor_cores(records):
    """Every sweep with bf16 or TF32 dots (IEEE fp32 dots run on FMA units by definition)."""
    checked = [r for r in records if r["kernel"] in SWEEPS and r["dot"] in TENSOR_CORE_DOTS]
    assert len(checked) == len(SWEEPS) * len(ARCHS) * (len(HIDDEN_SIZES) + 1)
    for r in checked:
        assert r["tensor_core_instructions"] > 0, r


def test_resources_fit_the_hardware(records):
    for r in records:
        assert 0 < r["registers"] <= 255, r
        assert 0 <= r["shared_bytes"] <= MAX_SHARED[r["arch"]], r


def test_table_lists_every_record(records):
    table = format_table(records).splitlines()
    assert table[0].split()[:2] == ["kernel", "arch"]
    assert len(table) == len(records) + 1
