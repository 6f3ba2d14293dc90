"""`fastrl plan --predict-time` (fastrl.plan.step_time): the arithmetic worked out by hand on a small config, and
the command line."""
import json

import pytest

from fastrl.config import GRPOConfig
from fastrl.plan import step_time
from fastrl.plan.shapes import ModelShape, lora_shape, run_shape
from fastrl.plan.step_time import Device, predict_step_time

# 1 layer, H 4, 2 heads of 2 (1 KV head), MLP 8, V 10, tied, fp32: linear weights q 4x4, k 4x2, v 4x2, o 4x4,
# gate/up 4x8, down 8x4 = 16 + 8 + 8 + 16 + 32 + 32 + 32 = 144; total = embedding 40 + layer (144 + q/k/v bias
# 4 + 2 + 2 + 2 norms x 4 = 160) + final norm 4 = 204 parameters
MODEL = ModelShape(hidden=4, intermediate=8, layers=1, heads=2, kv_heads=1, head_dim=2, vocab=10, tied=True,
                   weight_bytes=4, qkv_bias=True)
SLOW = Device("toy", matmul_bf16=2e3, matmul_tf32=1e3, fp32=1e3, bandwidth=100.0)  # flop/s, bytes/s
RUN = dict(per_device_train_batch_size=2, num_generations=2, max_prompt_length=2, max_completion_length=3,
           beta=0.04, bf16=False)


def phases(device=SLOW, peft=None, **changes):
    run = {**RUN, **changes}
    args = GRPOConfig(**run)
    shape = run_shape({**run, **({"peft": peft} if peft else {})})
    return {p.name: p for p in predict_step_time(MODEL, shape, args, device)}


def test_the_phases_by_hand(monkeypatch):
    monkeypatch.setattr(step_time, "PUBLISHED_TPOT_S", 0.0)  # the roofline alone
    got = phases(gradient_checkpointing=False)
    assert list(got) == ["generation", "reference logprobs", "policy forward", "fused loss", "backward", "optimizer"]
    # forward over 2 sequences of 2 + 3 tokens: per token 2·144 + attention 4·(5/2)·2·2·1 = 288 + 40 = 328
    assert got["policy forward"].flops == pytest.approx(10 * 328)
    # compute 3280 / 1e3 = 3.28 s against weights 204 x 4 bytes / 100 = 8.16 s: memory-bound
    assert got["policy forward"].seconds == pytest.approx(8.16) and got["policy forward"].bound == "memory"
    # the reference pass adds the forward sweep 2·N·H·V = 2·6·4·10
    assert got["reference logprobs"].flops == pytest.approx(3280 + 480)
    assert got["fused loss"].flops == pytest.approx(8 * 6 * 4 * 10)
    assert got["backward"].flops == pytest.approx(2 * 3280)  # full fine-tuning, no recompute
    assert got["optimizer"].bytes == pytest.approx(7 * 204 * 4)
    # generation: prefill of 2 prompts x 2 tokens (per token 288 + 4·1·2·2 = 304; head on the last position,
    # 2·2·4·10), then 3 decode steps of 2·2·(144 + 40) flops reading the weights and the KV cache
    kv_token = 2 * 1 * 1 * 2 * 4  # K and V, layers x KV heads x head_dim, fp32
    step_bytes = 204 * 4 + 2 * (2 + 1.5) * kv_token
    assert got["generation"].flops == pytest.approx(4 * 304 + 160 + 3 * 2 * 2 * 184)
    assert got["generation"].seconds == pytest.approx(204 * 4 / 100 + 3 * step_bytes / 100)


def test_what_each_setting_adds(monkeypatch):
    monkeypatch.setattr(step_time, "PUBLISHED_TPOT_S", 0.0)
    base = phases(gradient_checkpointing=False)
    assert phases(gradient_checkpointing=True)["backward"].flops == pytest.approx(3 * base["policy forward"].flops)
    lora = phases(gradient_checkpointing=False, peft={"r": 2, "target_modules": ["q_proj"]})
    assert lora["backward"].flops == pytest.approx(base["policy forward"].flops)  # no weight gradients
    assert lora["optimizer"].bytes == pytest.approx(7 * 2 * (4 + 4) * 4)  # A [2, 4] + B [4, 2]
    assert lora_shape({"r": 2, "target_modules": ["q_proj"]}).params(MODEL) == 16
    assert "reference logprobs" not in phases(beta=0.0)
    assert "old logprobs" in phases(num_iterations=2) and "old logprobs" not in base
    vllm = phases(use_vllm=True)
    assert "old logprobs" in vllm and vllm["weight push"].bytes == pytest.approx(2 * 204 * 2)
    assert phases(bf16=True)["fused loss"].seconds <= base["fused loss"].seconds  # the bf16 tensor-core rate


def test_decode_steps_take_at_least_the_published_time_per_token():
    fast = Device("fast", matmul_bf16=1e18, matmul_tf32=1e18, fp32=1e18, bandwidth=1e18)
    got = phases(device=fast)["generation"]
    assert got.seconds == pytest.approx(3 * step_time.PUBLISHED_TPOT_S, rel=1e-6)
    assert got.bound.startswith("per-token overhead")


def test_the_command_prints_a_stated_prediction(tmp_path, capsys):
    from fastrl.plan.cli import plan_main

    path = tmp_path / "run.yaml"
    path.write_text("model: tiny\nper_device_train_batch_size: 4\nnum_generations: 4\nmax_prompt_length: 8\n"
                    "max_completion_length: 16\nbeta: 0.04\n")
    assert plan_main([str(path), "--predict-time"]) == 0
    out = capsys.readouterr().out
    assert "prediction" in out and "H100" in out and "fused loss" in out and "steps/s" in out
    assert plan_main([str(path), "--predict-time", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["predicted_step_time_h100"]
    assert {r["name"] for r in rows} >= {"generation", "policy forward", "backward", "optimizer"}
    assert plan_main([str(path)]) == 2  # neither --memory nor --predict-time
    assert "--memory" in capsys.readouterr().err
