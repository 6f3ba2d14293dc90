"""`fastrl plan`: predicted peaks against peaks measured on CPU, the ordering facts, budgets and bad input.

The measured cases each run two real GRPO micro-steps (random-init Llama, fused loss, backward, AdamW) in a
fresh subprocess (fastrl/plan/measure.py); the prediction must be within 15% of the measured peak RSS.
"""
from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor

import pytest

from fastrl.plan import parse_memory, plan_main, predict
from fastrl.plan.measure import SMALL, WIDER, measure, predicted, predicted_peak
from fastrl.plan.measure_ranks import measure as measure_ranks
from fastrl.plan.measure_ranks import predicted as predicted_ranks

GiB = 1 << 30

# Small enough for a ~15-30 s subprocess each, large enough (~200-1000 MiB) that allocator noise is small; the
# first two peak in backward (activations), the LoRA one in the loss's forward, the wider one in the optimizer.
# The padded cases set padding_free false (measure.BASE_RUN); the packed one trains a long-tailed ragged batch
# (measure.case_lengths) and the plan is given its mean lengths.
MEASURED = {
    "L2-H256-V32768-full-b8-T192": (SMALL, {"max_prompt_length": 32, "max_completion_length": 192}),
    "L2-H256-V32768-full-ckpt-b8-T256": (SMALL, {"max_prompt_length": 64, "max_completion_length": 256,
                                                 "gradient_checkpointing": True}),
    "L2-H256-V32768-lora-beta-b4-T128": (SMALL, {"per_device_train_batch_size": 4, "max_prompt_length": 32,
                                                 "max_completion_length": 128, "beta": 0.04,
                                                 "peft": {"r": 8, "target_modules": "all-linear"}}),
    "L4-H512-V32000-untied-beta-ckpt-b2-T96": (WIDER, {"per_device_train_batch_size": 2, "max_prompt_length": 32,
                                                       "max_completion_length": 96, "beta": 0.04, "num_generations": 2,
                                                       "gradient_checkpointing": True}),
    "L2-H256-V32768-packed-b16-T256": (SMALL, {"per_device_train_batch_size": 16, "max_prompt_length": 64,
                                               "max_completion_length": 256, "padding_free": True}),
}


@pytest.fixture(scope="module")
def measurements():
    """Every case measured, two subprocesses at a time (each its own process: RSS is per process)."""
    specs = {case: json.dumps(spec) for case, spec in MEASURED.items()}
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {case: pool.submit(measure, spec) for case, spec in specs.items()}
        return {case: f.result() for case, f in futures.items()}


def _within(predicted_bytes: int, measured_bytes: int, what: str) -> None:
    error = (predicted_bytes - measured_bytes) / measured_bytes
    assert abs(error) <= 0.15, (f"{what}: predicted {predicted_bytes / 2**20:.1f} MiB, measured "
                                f"{measured_bytes / 2**20:.1f} MiB ({100 * error:+.1f}%)")


@pytest.mark.parametrize("case", list(MEASURED))
def test_prediction_within_15_percent_of_measured_peak(case, measurements):
    spec = json.dumps(MEASURED[case])
    plan = predicted(spec)
    peak, _ = predicted_peak(spec, plan)  # the phases the measurement runs (no generation)
    _within(peak, measurements[case]["peak"], f"{case} peak")
    for phase in ("policy forward+backward", "optimizer step"):  # each phase on its own, too
        _within(plan.phase(phase).total, measurements[case]["phases"][phase], f"{case} {phase}")


# Per rank under torchrun (2 CPU processes, gloo): whole GRPOTrainer steps, every rank's peak RSS against the
# one-rank plan (fastrl/plan/measure_ranks.py), two launches at once: FSDP2 at 128- and 64-token completions
# (the plan's per-token terms at two lengths; bench/results/plan_ranks.csv) and replicated.
MEASURED_RANKS = ("fsdp_full_beta", "fsdp_full_beta_t64", "replicated_full_beta")


@pytest.fixture(scope="module")
def rank_measurements():
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {case: pool.submit(measure_ranks, case) for case in MEASURED_RANKS}
        return {case: f.result() for case, f in futures.items()}


@pytest.mark.parametrize("case", MEASURED_RANKS)
def test_per_rank_prediction_within_15_percent_of_two_process_runs(case, rank_measurements):
    plan = predicted_ranks(case)
    assert plan.run.world_size == 2 and plan.run.fsdp == case.startswith("fsdp")
    assert [r["rank"] for r in rank_measurements[case]] == [0, 1]
    for r in rank_measurements[case]:
        _within(plan.peak, r["peak"], f"{case} rank {r['rank']}")


# ------------------------------------------------------------------------------------------- ordering facts
LLAMA_8B = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
            "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
            "tie_word_embeddings": False, "dtype": "bfloat16"}
QWEN_05B = {"model_type": "qwen2", "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
            "num_attention_heads": 14, "num_key_value_heads": 2, "vocab_size": 151936,
            "tie_word_embeddings": True, "dtype": "bfloat16"}
RUN = {"per_device_train_batch_size": 8, "num_generations": 8, "max_prompt_length": 256,
       "max_completion_length": 1024, "beta": 0.04}


def _policy_activations(plan):
    return next(v for k, v in plan.phase("policy forward+backward").parts.items() if k.startswith("activations"))


def test_checkpointing_lowers_activations():
    on = predict(QWEN_05B, {**RUN, "gradient_checkpointing": True})
    off = predict(QWEN_05B, {**RUN, "gradient_checkpointing": False})
    assert _policy_activations(on) < _policy_activations(off) / 4
    assert on.peak < off.peak


def test_activation_offload_moves_the_checkpointed_inputs_to_host_on_cuda_only():
    # long completions, so that the peak sits where layer inputs are saved (not at the embedding's gradient)
    on = {**RUN, "max_completion_length": 4096, "gradient_checkpointing": True}
    kept = predict(QWEN_05B, on, "cuda", 80 * GiB)
    offloaded = predict(QWEN_05B, {**on, "gradient_checkpointing_offload": True}, "cuda", 80 * GiB)
    moved = offloaded.phase("policy forward+backward").host["checkpointed activations (offloaded)"]
    assert moved == 24 * 896 * 2 * 8 * (256 + 4096)  # layers × H × bf16 × micro-batch × (P + T)
    # lower, though by less than `moved`: past the loss, the peak is where most layer inputs are freed already
    assert _policy_activations(offloaded) < _policy_activations(kept) and offloaded.peak <= kept.peak
    cpu = predict(QWEN_05B, {**on, "gradient_checkpointing_offload": True})  # host memory is where it already is
    assert cpu.peak == predict(QWEN_05B, on).peak


def test_reference_offload_moves_the_copy_to_host_between_uses():
    kept = predict(QWEN_05B, RUN, "cuda", 80 * GiB)
    offloaded = predict(QWEN_05B, {**RUN, "ref_model_offload": True}, "cuda", 80 * GiB)
    assert "reference copy" in kept.phases[0].parts and "reference copy" not in offloaded.phases[0].parts
    assert "reference copy (brought back)" in offloaded.phase("logprob passes (reference/old)").parts


def test_lora_lowers_optimizer_states_and_drops_the_reference_copy():
    full = predict(QWEN_05B, RUN)
    lora = predict(QWEN_05B, {**RUN, "peft": {"r": 16, "target_modules": "all-linear"}})
    key = "AdamW states (2 per trainable param)"
    assert lora.phases[0].parts[key] < full.phases[0].parts[key] / 20
    assert "reference copy" in full.phases[0].parts and "reference copy" not in lora.phases[0].parts


def test_beta_zero_has_no_reference_pass():
    plan = predict(QWEN_05B, {**RUN, "beta": 0.0})
    assert "reference copy" not in plan.phases[0].parts
    assert all("logprob" not in p.name for p in plan.phases)


def test_sleep_level_2_frees_the_weights_that_level_1_keeps_in_host_memory():
    vllm = {**RUN, "use_vllm": True, "vllm_enable_sleep_mode": True, "vllm_gpu_memory_utilization": 0.3}
    one = predict(QWEN_05B, {**vllm, "vllm_sleep_level": 1}, "cuda", 24 * GiB)
    two = predict(QWEN_05B, {**vllm, "vllm_sleep_level": 2}, "cuda", 24 * GiB)
    training = one.phase("policy forward+backward")
    assert sum(training.host.values()) > 0 and sum(two.phase("policy forward+backward").host.values()) == 0
    awake = predict(QWEN_05B, {**vllm, "vllm_enable_sleep_mode": False}, "cuda", 24 * GiB)
    assert awake.phase("policy forward+backward").total - training.total == pytest.approx(0.3 * 24 * GiB, rel=1e-6)


def test_materializing_path_needs_more_than_the_fused_loss_at_large_vocab():
    plan = predict(QWEN_05B, RUN)
    n, v = 8 * 1024, 151936  # completion tokens per micro-batch, vocabulary
    policy = plan.phase("policy forward+backward")
    resident = sum(v for k, v in policy.parts.items() if not k.startswith("activations"))
    assert plan.materializing_policy >= resident + 4 * n * v * 4  # logits, log_softmax and both grads in fp32
    assert plan.materializing_policy > 3 * policy.total
    assert plan.materializing_peak >= plan.peak


def test_optimizer_states_follow_the_parameter_dtype():
    fp32 = predict({**QWEN_05B, "dtype": "float32"}, RUN)
    bf16 = predict(QWEN_05B, RUN)
    key = "AdamW states (2 per trainable param)"
    assert fp32.phases[0].parts[key] == 2 * bf16.phases[0].parts[key]


def test_padding_free_counts_the_valid_tokens():
    """Packed: S = b·(P̄ + T̄) tokens and N = b·T̄ rows, not b·(P + T) and b·T, and no attention mask (sdpa per
    sequence); with a token budget S is the budget, whatever the micro-batch's sequence count."""
    run = {**RUN, "gradient_checkpointing": False}  # activations set the policy phase's peak
    packed = {**run, "padding_free": True}
    quarter = predict(QWEN_05B, packed, mean_lengths=(64, 256))
    assert (quarter.run.micro_tokens, quarter.run.micro_rows) == (8 * 320, 8 * 256)
    padded = predict(QWEN_05B, {**run, "padding_free": False})
    assert (padded.run.micro_tokens, padded.run.micro_rows, padded.run.attention_row) == (8 * 1280, 8 * 1024, 1280)
    assert quarter.run.attention_row == 0
    assert _policy_activations(quarter) < _policy_activations(padded) / 3
    worst = predict(QWEN_05B, packed)  # no mean lengths: every sequence full, the padded tokens without a mask
    assert worst.run.micro_tokens == padded.run.micro_tokens
    assert _policy_activations(worst) < _policy_activations(padded)
    budget = {**packed, "max_tokens_per_micro_batch": 4096, "gradient_accumulation_steps": 4}
    for b in (8, 16):  # a window of 32 or 64 sequences regrouped into micro-batches of 4096 tokens
        plan = predict(QWEN_05B, {**budget, "per_device_train_batch_size": b}, mean_lengths=(64, 256))
        assert plan.run.micro_tokens == 4096 and plan.run.micro_rows == 3277  # ⌈4096 · 256 / 320⌉
    small_window = predict(QWEN_05B, {**budget, "gradient_accumulation_steps": 1}, mean_lengths=(64, 256))
    assert small_window.run.micro_tokens == 8 * 320  # the window's 8 sequences hold fewer tokens than the budget


def test_bad_mean_lengths_are_named(tmp_path, capsys):
    with pytest.raises(ValueError, match="mean_lengths.*max_completion_length = 1024"):
        predict(QWEN_05B, {**RUN, "padding_free": True}, mean_lengths=(64, 2000))
    config = _write(tmp_path, QWEN_05B, RUN)
    assert plan_main([config, "--memory", "24GB", "--mean-lengths", "64"]) == 2
    assert "--mean-lengths" in capsys.readouterr().err


def test_fsdp_divides_weights_gradients_and_adamw_states_by_the_world_size():
    """Per rank: the sharded parts are the one-replica parts / W (rounded up), the gathered root is the whole
    embedding + norm + untied head, each rank generates its 1/W of the global batch; replicated ranks hold
    everything and all-reduce their gradients in fp32 buckets: DDP's 25 MiB, ddp_bucket_cap_mb's when set, a
    parameter larger than a bucket alone (Llama-8B's largest is the [V, H] head: 2 GiB in fp32)."""
    run = {**RUN, "gradient_checkpointing": True}
    replica = predict(LLAMA_8B, run, "cuda", 80 * GiB, world_size=8)
    sharded = predict(LLAMA_8B, {**run, "fsdp": "full_shard"}, "cuda", 80 * GiB, world_size=8)
    one = predict(LLAMA_8B, run, "cuda", 80 * GiB)
    for key in ("policy weights", "reference copy", "AdamW states (2 per trainable param)"):
        assert replica.phases[0].parts[key] == one.phases[0].parts[key]
        assert sharded.phases[0].parts[key] == -(-one.phases[0].parts[key] // 8)
    grads = one.phase("optimizer step").parts["gradients"]
    assert sharded.phase("optimizer step").parts["gradients"] == grads // 8
    root = (2 * 128256 * 4096 + 4096) * 2  # embedding + untied lm_head + final norm, bf16
    assert sharded.phase("policy forward+backward").parts[
        "FSDP: policy root gathered (embedding, norm, lm_head)"] == root
    # per_device_train_batch_size is per rank: 8 ranks generate 64 completions, 8 each, as one process does alone
    assert one.run.generation_batch == replica.run.generation_batch == sharded.run.generation_batch == 8
    allreduce = replica.phase("gradient all-reduce (replicated)").parts
    assert allreduce["fp32 all-reduce bucket"] == 128256 * 4096 * 4  # the head, a bucket of its own
    assert replica.run.bucket_bytes == 25 * 2**20
    lora = predict(LLAMA_8B, {**run, "peft": {"r": 8}, "ddp_bucket_cap_mb": 5}, "cuda", 80 * GiB, world_size=8)
    lora_grads = lora.phase("gradient all-reduce (replicated)").parts  # 13 MiB of fp32 adapter gradients
    assert lora_grads["fp32 all-reduce bucket"] == 5 * 2**20 < 2 * lora_grads["gradients"]
    assert sharded.peak < replica.peak < one.peak + allreduce["fp32 all-reduce bucket"] + 1


def test_world_size_applies_grpoconfigs_rules_of_that_launch():
    """num_generations divides the global batch: 2 completions per rank make one group of 4 on 2 ranks."""
    run = {**RUN, "per_device_train_batch_size": 2, "num_generations": 4}
    assert predict(QWEN_05B, run, world_size=2).run.generation_batch == 2
    with pytest.raises(ValueError, match="num_generations"):
        predict(QWEN_05B, run)
    with pytest.raises(ValueError, match="fsdp"):
        predict(QWEN_05B, {**RUN, "fsdp": "full_shard"})  # one process trains unsharded
    with pytest.raises(ValueError, match="world_size"):
        predict(QWEN_05B, RUN, world_size=0)


def test_nproc_nnodes_on_the_command_line(tmp_path, capsys):
    config = _write(tmp_path, LLAMA_8B, {**RUN, "gradient_checkpointing": True})
    assert plan_main([config, "--memory", "40GB", "--nproc", "4", "--nnodes", "2", "--json"]) == 1
    report = json.loads(capsys.readouterr().out)  # replicated 8B: over 40 GB; sharding is the first lever
    assert report["plan"]["world_size"] == 8 and not report["plan"]["fsdp"]
    assert report["advice"]["combined"]["label"].startswith("fsdp: full_shard")
    assert plan_main([config, "--memory", "40GB", "--nproc", "0"]) == 2
    assert "--nproc" in capsys.readouterr().err


def test_the_readme_qwen_7b_on_8_gpus_prediction(capsys, monkeypatch):
    """The README's command: Qwen2.5-7B, FSDP2 over 8 ranks, fits 80 GB per GPU (a prediction, not measured)."""
    monkeypatch.chdir(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root
    assert plan_main(["examples/qwen2.5-7b-8gpu.yaml", "--memory", "80GB", "--nproc", "8"]) == 0
    out = capsys.readouterr().out
    assert "per rank, 8 processes, FSDP2 full_shard" in out and "fits" in out


# ------------------------------------------------------------------------------------------- CLI and budgets
def _write(tmp_path, model_config, run):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(model_config))
    lines = [f"model: {folder}"] + [f"{k}: {json.dumps(v)}" for k, v in run.items()]
    path = tmp_path / "run.yaml"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_a_budget_no_setting_meets_says_why(tmp_path, capsys):
    config = _write(tmp_path, LLAMA_8B, RUN)
    assert plan_main([config, "--memory", "12GB", "--device", "cuda"]) == 1
    out = capsys.readouterr().out
    assert "no setting fits" in out and "weights alone" in out and "14.96 GiB" in out


def test_a_tight_budget_gets_a_recommendation_whose_plan_fits(tmp_path, capsys):
    config = _write(tmp_path, LLAMA_8B, {**RUN, "gradient_checkpointing": False})
    assert plan_main([config, "--memory", "80GB", "--device", "cuda", "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert not report["fits"] and report["advice"]["combined"]["fits"]
    assert report["advice"]["combined"]["peak"] <= 80 * GiB < report["plan"]["peak"]


def test_tiny_model_config_runs_end_to_end(tmp_path, capsys):
    path = tmp_path / "tiny.yaml"
    path.write_text("model: tiny\ntiny_model: {hidden_size: 256, vocab_size: 32768}\nmax_prompt_length: 64\n"
                    "max_completion_length: 256\nnum_generations: 8\n")
    assert plan_main([str(path), "--memory", "24GB", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "policy forward+backward" in out and "materializing path" in out and "fits" in out


# ------------------------------------------------------------------------------------------- bad input
def test_unknown_field_is_named(tmp_path, capsys):
    config = _write(tmp_path, QWEN_05B, {**RUN, "per_device_batch_size": 4})
    assert plan_main([config, "--memory", "24GB"]) == 2
    err = capsys.readouterr().err
    assert "per_device_batch_size" in err and "per_device_train_batch_size" in err


def test_missing_config_json(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text(f"model: {tmp_path / 'nowhere'}\nmax_prompt_length: 64\n")
    assert plan_main([str(path), "--memory", "24GB"]) == 2
    assert "config.json" in capsys.readouterr().err


def test_bad_model_config_and_lora_targets():
    with pytest.raises(ValueError, match="intermediate_size"):
        predict({k: v for k, v in QWEN_05B.items() if k != "intermediate_size"}, RUN)
    with pytest.raises(ValueError, match="qkv_proj"):
        predict(QWEN_05B, {**RUN, "peft": {"r": 8, "target_modules": ["qkv_proj"]}})
    with pytest.raises(ValueError, match="max_prompt_length"):
        predict(QWEN_05B, {k: v for k, v in RUN.items() if k != "max_prompt_length"})
    with pytest.raises(ValueError, match="device_memory"):
        predict(QWEN_05B, {**RUN, "use_vllm": True}, "cuda")


@pytest.mark.parametrize("text,expected", [("24GB", 24 * GiB), ("24GiB", 24 * GiB), ("512MB", 512 << 20),
                                           ("1.5G", 3 * GiB // 2)])
def test_parse_memory(text, expected):
    assert parse_memory(text) == expected


@pytest.mark.parametrize("text", ["lots", "-3GB", "0GB", "24 parsecs"])
def test_parse_memory_rejects(text):
    with pytest.raises(ValueError, match="--memory"):
        parse_memory(text)
