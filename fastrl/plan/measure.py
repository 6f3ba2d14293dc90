"""Measured peak memory of GRPO training steps on CPU, to check `fastrl plan`'s predictions against.

Each case runs in a fresh subprocess with MALLOC_MMAP_THRESHOLD_=65536 (so freed tensors go back to the OS and
RSS follows live memory). The child imports everything and warms the kernels up on a throw-away model, resets
the kernel's high-water mark (/proc/self/clear_refs), records the RSS as its baseline, then does what a GRPO
micro-step does, twice (so the second step runs with the optimizer states already allocated):

    build a random-init transformers Llama (fp32) -> fastrl.policy.prepare_for_training (LoRA, checkpointing)
    -> frozen reference copy (beta > 0, full fine-tuning) -> reference logprobs, no grad, fused kernel
    (LoRA: the same model with the adapter disabled) -> final hidden states of prompt + completion
    (fastrl.policy.completion_hidden, or packed_completion_hidden with padding_free) ->
    fastrl.kernels.fused_linear_grpo_loss(backend="torch") -> backward -> clip_grad_norm_ -> AdamW step
    -> zero_grad(set_to_none=True)

The batch: padded cases (padding_free false) have every prompt of max_prompt_length tokens but every other
one left-padded by a quarter, and every completion of max_completion_length; padding-free cases a long-tailed
ragged batch (`case_lengths`), whose mean lengths the plan is given.
Peak = VmHWM − baseline. Predicted = `fastrl.plan.predict(..., device="cpu").peak`.

    python -m fastrl.plan.measure --csv bench/results/plan_validation.csv     # every case, ~1-2 min
    python -m fastrl.plan.measure --case full_fp32                          # one case, printed
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import subprocess
import sys
import time

from fastrl.peak_rss import reset_peak_rss, status_kib

# name -> (model config.json fields, run config). Models: the 2-layer width-256 vocab-32768 Llama,
# and a 4-layer width-512 one (untied head, grouped KV heads) for a second shape.
SMALL = {"model_type": "llama", "hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 2,
         "num_attention_heads": 8, "num_key_value_heads": 8, "vocab_size": 32768, "tie_word_embeddings": True,
         "dtype": "float32"}
WIDER = {"model_type": "llama", "hidden_size": 512, "intermediate_size": 1376, "num_hidden_layers": 4,
         "num_attention_heads": 8, "num_key_value_heads": 2, "vocab_size": 32000, "tie_word_embeddings": False,
         "dtype": "float32"}
BASE_RUN = {"num_generations": 4, "max_prompt_length": 64, "max_completion_length": 256, "bf16": False,
            "gradient_checkpointing": False, "beta": 0.0, "per_device_train_batch_size": 8, "padding_free": False}
LORA_ALL = {"r": 8, "lora_alpha": 16, "target_modules": "all-linear"}

CASES = {
    "full_fp32": (SMALL, {}),
    "full_fp32_ckpt": (SMALL, {"gradient_checkpointing": True}),
    "full_fp32_beta": (SMALL, {"beta": 0.04, "per_device_train_batch_size": 4}),
    "lora_all_beta": (SMALL, {"beta": 0.04, "peft": LORA_ALL}),
    "full_bf16_autocast": (SMALL, {"bf16": True}),
    "wider_full_ckpt": (WIDER, {"gradient_checkpointing": True, "per_device_train_batch_size": 4,
                                "max_completion_length": 192}),
    "wider_full": (WIDER, {"per_device_train_batch_size": 4, "max_completion_length": 192}),
    "wider_lora_qv_ckpt": (WIDER, {"gradient_checkpointing": True, "beta": 0.04,
                                   "peft": {"r": 16, "target_modules": ["q_proj", "v_proj"]}}),
    "packed_fp32": (SMALL, {"padding_free": True, "per_device_train_batch_size": 16}),
    "packed_fp32_beta_ckpt": (SMALL, {"padding_free": True, "per_device_train_batch_size": 16, "beta": 0.04,
                                      "gradient_checkpointing": True}),
}


# Whole GRPOTrainer steps (generation with transformers, rewards, reference, loss, AdamW) on the built-in tiny
# model at the benchmark size. Digit-task prompts are longer than 12 characters, so left-truncation
# makes every prompt exactly max_prompt_length tokens; a random model almost never samples eos among 32768
# ids, so completions run to max_completion_length: the shapes the plan assumes.
TINY_BENCH = {"hidden_size": 256, "vocab_size": 32768, "num_layers": 2}
TRAINER_CASES = {
    "trainer_full_beta": (TINY_BENCH, {"per_device_train_batch_size": 8, "num_generations": 8, "beta": 0.04,
                                       "max_prompt_length": 12, "max_completion_length": 128,
                                       "gradient_checkpointing": False}),
    "trainer_lora_beta": (TINY_BENCH, {"per_device_train_batch_size": 8, "num_generations": 8, "beta": 0.04,
                                       "max_prompt_length": 12, "max_completion_length": 128,
                                       "peft": LORA_ALL}),
    # token-budget micro-batches: every sequence is 12 + 128 = 140 tokens, so a budget of 560 packs 4 per micro-batch
    "trainer_packed_budget": (TINY_BENCH, {"per_device_train_batch_size": 8, "num_generations": 8, "beta": 0.04,
                                           "max_prompt_length": 12, "max_completion_length": 128,
                                           "gradient_checkpointing": False, "padding_free": True,
                                           "max_tokens_per_micro_batch": 560}),
}


def case_inputs(name: str) -> tuple[dict, dict]:
    """A case name, or a JSON list [model config, run overrides] (tests pass their own cases this way)."""
    if name.startswith("["):
        model, run = json.loads(name)
        return dict(model), {**BASE_RUN, **run}
    if name in TRAINER_CASES:
        from fastrl.plan.cli import tiny_model_config

        tiny, run = TRAINER_CASES[name]
        return tiny_model_config(tiny), {**BASE_RUN, **run}
    if name not in CASES:
        raise ValueError(f"case {name!r}: known cases are {sorted(CASES) + sorted(TRAINER_CASES)}")
    model, run = CASES[name]
    return dict(model), {**BASE_RUN, **run}


# ------------------------------------------------------------------------------------------- the child
def _build(model_config: dict, run: dict):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from fastrl.config import GRPOConfig
    from fastrl.policy import frozen_reference, prepare_for_training, use_padding_free

    fields = {k: v for k, v in model_config.items() if k not in ("model_type", "dtype")}
    config = LlamaConfig(**fields, attn_implementation="sdpa")
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    args = GRPOConfig(**{k: v for k, v in run.items() if k != "peft"}, output_dir="/tmp/fastrl_plan_measure")
    peft_config = None
    if run.get("peft"):
        from peft import LoraConfig

        peft_config = LoraConfig(**run["peft"])
    model = prepare_for_training(model, args, torch.device("cpu"), peft_config)
    args.padding_free = use_padding_free(model, args.padding_free)  # as the trainer: sdpa per packed sequence
    ref = frozen_reference(model) if args.beta > 0 and peft_config is None else None
    return model, ref, args


def case_lengths(run: dict) -> tuple[list[int], list[int]]:
    """(prompt, completion) lengths of a case's micro-batch of b = per_device_train_batch_size sequences.
    Padded: prompts of P, every other one padded by P/4, completions of T. Padding-free: prompts uniform in
    [P/4, P], completions 8 + Geometric(mean T/4 − 8) up to T, the longest T (mean about a quarter of T)."""
    from fastrl.bench.ragged import long_tail_lengths

    b, p, t = run["per_device_train_batch_size"], run["max_prompt_length"], run["max_completion_length"]
    if not run.get("padding_free", True):
        return [p - (p // 4 if i % 2 == 0 else 0) for i in range(b)], [t] * b
    return long_tail_lengths(b, (p // 4, p), t, max(1.0, t / 4 - 8), seed=1)


def mean_lengths(run: dict) -> tuple[float, float] | None:
    """The mean (prompt, completion) lengths the plan is given for a padding-free case (None: padded)."""
    if not run.get("padding_free", True):
        return None
    prompts, completions = case_lengths(run)
    return sum(prompts) / len(prompts), sum(completions) / len(completions)


def _reference_logprobs(model, ref, batch, args):
    import contextlib

    import torch

    from fastrl.kernels import fused_linear_logprobs
    from fastrl.policy import lm_head

    source = ref if ref is not None else model
    adapter_off = model.disable_adapter() if ref is None else contextlib.nullcontext()
    with torch.no_grad(), adapter_off, _autocast(args):
        hidden = _completion_hidden(source, batch, args)  # [b, T, H] or packed [N, H]
        return fused_linear_logprobs(hidden, lm_head(source).weight.to(hidden.dtype), batch.loss_inputs()["targets"],
                                     backend="torch")


def _completion_hidden(model, batch, args):
    """batch: a RolloutBatch (padded, -> [b, T, H]) or a PackedBatch (padding_free, -> [N, H])."""
    from fastrl.policy import completion_hidden, packed_completion_hidden

    if args.padding_free:
        return packed_completion_hidden(model, batch)
    ids, attention = batch.input_ids()
    return completion_hidden(model, ids, attention, batch.prompt_ids.shape[1])


def _autocast(args):
    import contextlib

    import torch

    return torch.autocast("cpu", dtype=torch.bfloat16) if args.bf16 else contextlib.nullcontext()


def _step(model, ref, opt, args, batch, marks):
    """One micro-step + optimizer step; `marks(phase)` is called at the end of each phase."""
    import torch

    from fastrl.kernels import fused_linear_grpo_loss
    from fastrl.kernels.loss_spec import LossSpec
    from fastrl.policy import lm_head

    ref_logp = _reference_logprobs(model, ref, batch, args) if args.beta > 0 else None
    marks("logprob passes (reference/old)")
    with _autocast(args):
        hidden = _completion_hidden(model, batch, args)  # [b, T, H] or packed [N, H]
    weight = lm_head(model).weight
    inputs = {**batch.loss_inputs(), "advantages": torch.linspace(-1, 1, len(batch.advantages)),
              "ref_logprobs": ref_logp}
    spec = LossSpec.from_config(args)  # the trainer's loss settings
    loss, _ = fused_linear_grpo_loss(hidden, weight.to(hidden.dtype), backend="torch", **inputs,
                                     **spec.loss_kwargs(inputs["mask"].sum()))
    del hidden
    (loss * spec.micro_batch_scale).backward()
    marks("policy forward+backward")
    torch.nn.utils.clip_grad_norm_([q for q in model.parameters() if q.requires_grad], 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    marks("optimizer step")


def _warm_up(run: dict) -> None:
    """The case's code paths once on a throw-away model, so library pages and one-time buffers (oneDNN, the
    autograd engine's thread) are in the baseline rather than in the measured peak."""
    small = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1,
             "num_attention_heads": 2, "vocab_size": 256, "tie_word_embeddings": True}
    _run_steps(small, {**run, "max_prompt_length": 8, "max_completion_length": 8}, steps=1)


def _run_steps(model_config: dict, run: dict, steps: int, marks=lambda phase: None) -> None:
    import torch

    model, ref, args = _build(model_config, run)
    from fastrl.bench.ragged import random_rollout
    from fastrl.rollout_batch import PackedBatch

    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-5)
    batch = random_rollout(*case_lengths(run), model_config["vocab_size"], seed=1)
    batch = PackedBatch.from_rollout(batch) if args.padding_free else batch
    for _ in range(steps):
        _step(model, ref, opt, args, batch, marks)


def child(name: str) -> dict:
    import gc

    import torch

    torch.set_num_threads(1)
    model_config, run = case_inputs(name)
    _warm_up(run)
    gc.collect()
    reset_peak_rss()
    baseline = status_kib("VmRSS") * 1024
    phases: dict[str, int] = {}  # each phase's peak above the baseline, the last step's
    overall = [0]  # the whole run's peak (building the model and step 1 included)

    def marks(phase: str) -> None:
        phases[phase] = status_kib("VmHWM") * 1024 - baseline
        overall[0] = max(overall[0], phases[phase])
        reset_peak_rss()

    t0 = time.perf_counter()
    _run_steps(model_config, run, steps=2, marks=marks)
    return {"case": name, "baseline": baseline, "peak": overall[0], "phases": phases,
            "seconds": time.perf_counter() - t0}


def _train(model_path: str, run: dict, steps: int, output_dir: str) -> None:
    from fastrl import GRPOConfig, GRPOTrainer
    from fastrl.tasks import get_task

    task = get_task("reverse", num_examples=256)
    peft_config = None
    if run.get("peft"):
        from peft import LoraConfig

        peft_config = LoraConfig(**run["peft"])
    args = GRPOConfig(**{k: v for k, v in run.items() if k != "peft"}, output_dir=output_dir,
                      max_steps=steps, save_strategy="no", logging_steps=1, report_to="none",
                      reward_weights=task.reward_weights, disable_tqdm=True)
    GRPOTrainer(model_path, task.reward_funcs, args=args, train_dataset=task.train_dataset,
                peft_config=peft_config).train()


def trainer_child(name: str) -> dict:
    """Two real GRPOTrainer steps; the peak covers generation, rewards, reference, loss and optimizer."""
    import gc
    import tempfile

    import torch

    from fastrl.tasks.tiny_model import build_tiny_model

    torch.set_num_threads(1)
    tiny, run = TRAINER_CASES[name]
    run = {**BASE_RUN, **run}
    with tempfile.TemporaryDirectory(prefix="fastrl_plan_") as tmp:
        warm = build_tiny_model(os.path.join(tmp, "warm"))
        path = build_tiny_model(os.path.join(tmp, "bench"), **tiny)
        _train(warm, {**run, "max_completion_length": 8}, steps=1, output_dir=os.path.join(tmp, "warm-out"))
        gc.collect()
        reset_peak_rss()
        baseline = status_kib("VmRSS") * 1024
        t0 = time.perf_counter()
        _train(path, run, steps=2, output_dir=os.path.join(tmp, "out"))  # its own folder: runs may overlap
        return {"case": name, "baseline": baseline, "peak": status_kib("VmHWM") * 1024 - baseline, "phases": {},
                "seconds": time.perf_counter() - t0}


# ------------------------------------------------------------------------------------------- the parent
def measure(name: str, timeout: float = 300) -> dict:
    """Run one case in a fresh subprocess; returns its measured peak (bytes above the baseline)."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false", "TRANSFORMERS_VERBOSITY": "error"}
    proc = subprocess.run([sys.executable, "-m", "fastrl.plan.measure", "--child", name], env=env,
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"measuring {name!r} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def predicted(name: str):
    from fastrl.plan.predict import predict

    model_config, run = case_inputs(name)
    # GRPOTrainer cases: every sequence at its maximum length (see TRAINER_CASES), the plan's default
    return predict(model_config, run, device="cpu", mean_lengths=None if name in TRAINER_CASES else mean_lengths(run))


STEP_PHASES = ("logprob passes (reference/old)", "policy forward+backward", "optimizer step")


def predicted_peak(name: str, plan) -> tuple[int, str]:
    """The prediction a case is compared with: the whole plan for GRPOTrainer cases; for the training-step
    cases, which run no generation, the largest of the phases they run."""
    if name in TRAINER_CASES:
        return plan.peak, "whole step"
    phases = [p for p in plan.phases if p.name in STEP_PHASES]
    return max(p.total for p in phases), "training phases (no generation)"


def compare(name: str, timeout: float = 300) -> dict:
    m, plan = measure(name, timeout), predicted(name)
    peak, compared = predicted_peak(name, plan)
    model_config, run = case_inputs(name)
    return {"case": name, "layers": model_config["num_hidden_layers"], "hidden": model_config["hidden_size"],
            "vocab": model_config["vocab_size"], "micro_batch": run["per_device_train_batch_size"],
            "prompt_len": run["max_prompt_length"], "completion_len": run["max_completion_length"],
            "checkpointing": run["gradient_checkpointing"], "bf16": run["bf16"], "beta": run["beta"],
            "padding_free": run["padding_free"], "max_tokens_per_micro_batch": run.get("max_tokens_per_micro_batch") or "",
            "micro_batch_tokens": plan.run.micro_tokens,
            "lora": json.dumps(run.get("peft")) if run.get("peft") else "",
            "compared": compared, "predicted_mib": _mib(peak), "measured_mib": _mib(m["peak"]),
            "error_pct": round(100 * (peak - m["peak"]) / m["peak"], 1), "plan_peak_phase": plan.peak_phase.name,
            "policy_phase_predicted_mib": _mib(plan.phase("policy forward+backward").total),
            "policy_phase_measured_mib": _mib(m["phases"].get("policy forward+backward", math.nan)),
            "optimizer_phase_predicted_mib": _mib(plan.phase("optimizer step").total),
            "optimizer_phase_measured_mib": _mib(m["phases"].get("optimizer step", math.nan)),
            "materializing_predicted_mib": round(plan.materializing_peak / 2**20, 1),
            "seconds": round(m["seconds"], 1)}


def _mib(n: int) -> float:
    return round(n / 2**20, 1)


def write_csv(path: str, rows: list[dict], module: str, cases: list[str] | None) -> None:
    """The rows with the commit they measured, under a header naming the command that made them."""
    from fastrl.bench.results import git_commit

    command = f"python -m {module} --csv {path}" + "".join(f" --case {c}" for c in cases or [])
    commit = git_commit()
    rows = [{**r, "commit": commit} for r in rows]  # the code every row measured
    with open(path, "w", newline="") as f:
        f.write(f"# made by: {command}\n")
        f.write(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; peak RSS above a warmed-up baseline, "
                "2 steps, one fresh process per case, MALLOC_MMAP_THRESHOLD_=65536, 1 thread\n")
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="measured vs predicted peak memory of GRPO steps on CPU")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--case", action="append",
                        help=f"one of {sorted(CASES) + sorted(TRAINER_CASES)} (default: all)")
    parser.add_argument("--csv", help="write the comparison to this CSV file")
    parser.add_argument("--timeout", type=float, default=300, help="seconds per case (a busy machine needs more)")
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(trainer_child(args.child) if args.child in TRAINER_CASES else child(args.child)))
        return 0
    rows = []
    for name in args.case or list(CASES) + list(TRAINER_CASES):
        rows.append(compare(name, args.timeout))
        print(json.dumps(rows[-1]), flush=True)
    if args.csv:
        write_csv(args.csv, rows, "fastrl.plan.measure", args.case)
    return 0


if __name__ == "__main__":
    sys.exit(main())
