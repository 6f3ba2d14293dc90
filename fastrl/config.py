"""GRPOConfig: a plain dataclass with TRL's field names and defaults wherever fastrl and TRL overlap.

Defaults are those of TRL 1.16's `trl.GRPOConfig` (which overrides some of transformers' `TrainingArguments`:
learning_rate 1e-6, logging_steps 10, gradient_checkpointing True, bf16 True unless fp16). `tests/test_config.py`
checks every shared default against an installed TRL, so a drift shows up as a failing test.

Fields fall in three groups:
- supported: they do what they do in TRL;
- accepted and harmless: they do not change the training math (NO_EFFECT says why for each);
- unsupported: setting them away from their default would change the math in a way fastrl does not implement,
  so `__post_init__` raises a ValueError naming the field rather than silently training something else.
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import math
from dataclasses import dataclass, field
from typing import Any

from fastrl.generation.extra_kwargs import check_generation_kwargs
from fastrl.kernels.loss_spec import LOSS_TYPES
from fastrl.launch import launch_from_env

AGGREGATIONS = ("sum_then_normalize", "normalize_then_sum")  # multi_objective_aggregation (fastrl.scoring)
VLLM_IS_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")
SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
              "inverse_sqrt", "reduce_lr_on_plateau", "cosine_with_min_lr", "warmup_stable_decay")
OPTIMIZERS = ("adamw_torch", "adamw_torch_fused")
LOG_LEVELS = ("passive", "debug", "info", "warning", "error", "critical")  # transformers' log_level values

# field -> (the default it must keep, why another value is refused). Checked in __post_init__.
UNSUPPORTED = {
    "router_aux_loss_coef": (None, "MoE router auxiliary losses are not implemented"),
    "use_transformers_continuous_batching": (False, "continuous batching is not implemented"),
    "use_transformers_paged": (False, "continuous batching is not implemented"),
    "auto_find_batch_size": (False, "shrinking the batch would split prompt groups (TRL refuses it too)"),
    "torch_compile": (False, "torch.compile of the policy is not implemented"),
    "neftune_noise_alpha": (None, "NEFTune noise is not implemented"),
    "deepspeed": (None, "DeepSpeed is not supported"),
    "label_smoothing_factor": (0.0, "label smoothing does not apply to the GRPO loss"),
    "fp16": (False, "fp16 needs loss scaling, which is not implemented; use bf16=True"),
    "load_best_model_at_end": (False, "keeping the best checkpoint by an eval metric is not implemented"),
    "push_to_hub": (False, "no network: hub upload is not supported"),
    "sapo_temperature_pos": (1.0, "the fused loss uses TRL's default SAPO temperatures"),
    "sapo_temperature_neg": (1.05, "the fused loss uses TRL's default SAPO temperatures"),
    "vllm_structured_outputs_regex": (None, "use generation_kwargs={'structured_outputs': {'regex': ...}}"),
    "full_determinism": (False, "transformers' deterministic-algorithms switch is not applied"),
    "bf16_full_eval": (False, "evaluation runs under the training precision (bf16 autocast or fp32)"),
    "fp16_full_eval": (False, "fp16 is not supported"),
    "dataloader_drop_last": (False, "the last partial eval batch is always evaluated (training batches are "
                                    "always whole)"),
    "enable_jit_checkpoint": (False, "checkpoints are written at save_steps only"),
    "ignore_data_skip": (False, "a resumed run always continues from the checkpoint's data position"),
    "liger_kernel_config": (None, "use_liger_kernel patches a fixed set (norms, MLP, RoPE)"),
    "optim_args": (None, "fastrl's AdamW takes no extra optimizer arguments"),
    "optim_target_modules": (None, "fastrl's AdamW takes no extra optimizer arguments"),
    "parallelism_config": (None, "ranks replicate or shard (fsdp) the policy; its tensor/context parallelism is "
                                 "not implemented"),
    "restore_callback_states_from_checkpoint": (False, "callback states are not saved in checkpoints"),
    "torch_compile_backend": (None, "torch.compile of the policy is not implemented"),
    "torch_compile_mode": (None, "torch.compile of the policy is not implemented"),
    "transformers_continuous_batching_config": (None, "continuous batching is not implemented"),
}

# TRL / transformers fields accepted with no effect on a fastrl run, and why (`fastrl trl-fields` lists them)
NO_EFFECT = {
    "do_train": "a flag for scripts", "do_predict": "a flag for scripts", "debug": "no debug modes",
    "log_level_replica": "rank 0 alone logs",
    "log_on_each_node": "rank 0 alone logs", "save_on_each_node": "rank 0 alone writes (shards: every rank its own)",
    "local_rank": "read from the launcher's LOCAL_RANK", "ddp_backend": "nccl on CUDA, gloo on CPU",
    "ddp_broadcast_buffers": "rank 0's parameters and buffers are broadcast once, at the start",
    "ddp_find_unused_parameters": "no DDP wrapper: a parameter without a gradient counts as zero",
    "ddp_static_graph": "no DDP wrapper",
    "accelerator_config": "accelerate launch only starts the processes; batches are never dispatched",
    "average_tokens_across_devices": "token normalisers are global already (LossSpec takes the world size)",
    "ds3_gather_for_generation": "no DeepSpeed",
    "dataloader_num_workers": "no DataLoader: prompts are read in the main process",
    "dataloader_pin_memory": "no DataLoader", "dataloader_persistent_workers": "no DataLoader",
    "dataloader_prefetch_factor": "no DataLoader", "dataloader_multiprocessing_context": "no DataLoader",
    "dataloader_in_order": "no DataLoader", "remove_unused_columns": "every dataset column reaches the rewards",
    "train_sampling_strategy": "GRPO samples prompt groups its own way (TRL ignores it too)",
    "length_column_name": "no length grouping", "hub_model_id": "no hub upload", "hub_token": "no hub upload",
    "hub_strategy": "no hub upload", "hub_private_repo": "no hub upload", "hub_always_push": "no hub upload",
    "hub_revision": "no hub upload", "log_completions_hub_repo": "no hub upload",
    "project": "no trackio", "trackio_space_id": "no trackio", "trackio_bucket_id": "no trackio",
    "trackio_static_space_id": "no trackio", "skip_memory_metrics": "peak memory is always logged",
    "include_num_input_tokens_seen": "tokens are always counted (num_tokens)",
    "logging_nan_inf_filter": "non-finite values are logged as null",
    "torch_empty_cache_steps": "no cache emptying", "save_only_model": "checkpoints always hold the optimizer state",
    "cache_implementation": "fastrl's sampling loop keeps a dynamic KV cache (a speed choice, not the math)",
    "use_cache": "the training forward never uses a KV cache",
    "eval_accumulation_steps": "eval metrics are scalars", "eval_do_concat_batches": "eval metrics are scalars",
    "eval_use_gather_object": "eval metrics are scalars, the same on every rank",
    "batch_eval_metrics": "GRPO has no compute_metrics",
    "include_for_metrics": "GRPO has no compute_metrics", "label_names": "GRPO has no labels",
    "prediction_loss_only": "evaluation returns the loss and the generation metrics",
    "metric_for_best_model": "load_best_model_at_end is refused", "greater_is_better": "load_best_model_at_end is "
    "refused", "log_multimodal": "text models only", "pad_to_multiple_of": "completions are not padded to a multiple",
    "vllm_server_base_url": "vllm_mode 'server' is refused", "vllm_server_host": "vllm_mode 'server' is refused",
    "vllm_server_port": "vllm_mode 'server' is refused", "vllm_server_timeout": "vllm_mode 'server' is refused",
    "vllm_group_port": "vllm_mode 'server' is refused",
}

FSDP_OPTIONS = ("full_shard", "auto_wrap")
FSDP_CONFIG_KEYS = ("reshard_after_forward",)

@dataclass
class GRPOConfig:
    # ---- output, logging, checkpoints (TrainingArguments) ----
    output_dir: str | None = None  # None -> "trainer_output", as in TRL
    overwrite_output_dir: bool = False
    run_name: str | None = None
    report_to: str | list[str] | None = "none"  # "tensorboard", "wandb", "all", "none"
    logging_dir: str | None = None
    logging_strategy: str = "steps"
    logging_steps: float = 10
    logging_first_step: bool = False
    disable_tqdm: bool | None = None
    save_strategy: str = "steps"  # "steps" or "no"
    save_steps: float = 500
    save_total_limit: int | None = None
    save_only_model: bool = False
    resume_from_checkpoint: str | bool | None = None
    # ---- optimization (TrainingArguments; learning_rate is TRL's override) ----
    learning_rate: float = 1e-6
    lr_scheduler_type: str = "linear"
    lr_scheduler_kwargs: dict | None = None
    warmup_steps: float = 0  # >= 1: steps; in (0, 1): a ratio of max_steps (transformers 5)
    warmup_ratio: float | None = None  # transformers 4 name, still accepted; wins over warmup_steps when set
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    optim: str = "adamw_torch_fused"
    max_grad_norm: float = 1.0
    per_device_train_batch_size: int = 8  # completions (not prompts) per micro-batch, as in TRL
    gradient_accumulation_steps: int = 1
    max_steps: int = -1
    num_train_epochs: float = 3.0
    seed: int = 42
    data_seed: int | None = None
    bf16: bool | None = None  # None -> True unless fp16 (TRL)
    fp16: bool = False
    tf32: bool | None = None
    gradient_checkpointing: bool = True  # TRL's default
    gradient_checkpointing_kwargs: dict | None = None
    # fastrl: the tensors autograd keeps from the checkpointed forward (each layer's input) wait in host memory
    # (pinned on CUDA) until backward; needs gradient_checkpointing. Costs a copy each way per micro-batch.
    gradient_checkpointing_offload: bool = False
    use_liger_kernel: bool = False
    use_cpu: bool = False
    activation_checkpointing: bool | None = None  # transformers 5's name for gradient_checkpointing (wins when set)
    activation_checkpointing_kwargs: dict | None = None  # ... and for gradient_checkpointing_kwargs
    # ---- evaluation (TrainingArguments; fastrl.evaluation) ----
    do_eval: bool = False  # set when eval_strategy is not "no" (transformers' rule)
    eval_strategy: str = "no"  # "no", "steps" (every eval_steps) or "epoch"
    eval_steps: float | None = None  # None -> logging_steps; in (0, 1): a ratio of max_steps
    eval_on_start: bool = False
    per_device_eval_batch_size: int = 8  # completions per eval batch
    eval_delay: float = 0  # no evaluation before this many steps
    # ---- TRL / transformers fields with no effect here (NO_EFFECT) or refused when changed (UNSUPPORTED) ----
    accelerator_config: dict | str | None = None
    batch_eval_metrics: bool = False
    bf16_full_eval: bool = False
    fp16_full_eval: bool = False
    dataloader_drop_last: bool = False
    dataloader_in_order: bool = True
    dataloader_multiprocessing_context: str | None = None
    dataloader_persistent_workers: bool = False
    dataloader_pin_memory: bool = True
    dataloader_prefetch_factor: int | None = None
    ddp_backend: str | None = None
    ddp_broadcast_buffers: bool | None = None
    ddp_bucket_cap_mb: float | None = None  # replicas all-reduce gradients in buckets of this many MiB (None: 25)
    ddp_find_unused_parameters: bool | None = None
    ddp_static_graph: bool | None = None
    ddp_timeout: int = 1800  # seconds a collective waits before failing a multi-process run (fastrl.distributed)
    debug: str | list = ""
    do_predict: bool = False
    ds3_gather_for_generation: bool = True
    enable_jit_checkpoint: bool = False
    eval_accumulation_steps: int | None = None
    eval_do_concat_batches: bool = True
    eval_use_gather_object: bool = False
    fsdp_config: dict | str | None = None  # with fsdp: {"reshard_after_forward": bool} (FSDP2's layer option)
    greater_is_better: bool | None = None
    hub_always_push: bool = False
    hub_private_repo: bool | None = None
    hub_revision: str | None = None
    hub_strategy: str = "every_save"
    ignore_data_skip: bool = False
    include_for_metrics: list = field(default_factory=list)
    include_num_input_tokens_seen: str | bool = "no"
    label_names: list | None = None
    length_column_name: str = "length"
    liger_kernel_config: dict | None = None
    local_rank: int = -1
    log_completions_hub_repo: str | None = None
    log_level_replica: str = "warning"
    log_multimodal: bool = True
    log_on_each_node: bool = True
    logging_nan_inf_filter: bool = True
    metric_for_best_model: str | None = None
    optim_args: str | None = None
    optim_target_modules: str | list | None = None
    parallelism_config: Any = None
    prediction_loss_only: bool = False
    project: str = "huggingface"
    restore_callback_states_from_checkpoint: bool = False
    save_on_each_node: bool = False
    skip_memory_metrics: bool = True
    torch_compile_backend: str | None = None
    torch_compile_mode: str | None = None
    torch_empty_cache_steps: int | None = None
    trackio_bucket_id: str | None = None
    trackio_space_id: str | None = None
    trackio_static_space_id: str | bool | None = None
    train_sampling_strategy: str = "random"
    transformers_continuous_batching_config: dict | str | None = None
    use_cache: bool = False
    dataloader_num_workers: int = 0
    remove_unused_columns: bool | None = False
    average_tokens_across_devices: bool = True
    full_determinism: bool = False
    # accepted and unused or refused when changed (see UNSUPPORTED)
    label_smoothing_factor: float = 0.0
    auto_find_batch_size: bool = False
    torch_compile: bool = False
    neftune_noise_alpha: float | None = None
    deepspeed: str | dict | None = None
    fsdp: str | list | None = None  # "full_shard" ("auto_wrap" accepted): FSDP2 per decoder layer + root
    do_train: bool = False
    load_best_model_at_end: bool = False
    push_to_hub: bool = False
    hub_model_id: str | None = None
    hub_token: str | None = None
    log_level: str = "passive"
    # ---- model ----
    model_init_kwargs: dict | None = None
    trust_remote_code: bool = False
    disable_dropout: bool = False
    cast_lm_head_to_fp32: bool = False
    router_aux_loss_coef: float | None = None
    # ---- data ----
    num_generations: int | None = 8
    num_generations_eval: int | None = None
    max_prompt_length: int | None = None  # not in TRL 1.16 (removed there); kept: left-truncates prompts when set
    max_completion_length: int | None = 512
    shuffle_dataset: bool | None = True
    pad_to_multiple_of: int | str | None = "auto"
    # ---- generation ----
    generation_batch_size: int | None = None
    steps_per_generation: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float | None = None
    repetition_penalty: float = 1.0
    generation_kwargs: dict | None = None  # merged over the fields above (fastrl.generation.extra_kwargs)
    chat_template_kwargs: dict | None = None
    cache_implementation: str | None = None
    use_transformers_continuous_batching: bool = False
    use_transformers_paged: bool = False
    # ---- vLLM (used by fastrl.generation.vllm) ----
    use_vllm: bool = False
    vllm_mode: str = "colocate"
    vllm_model_impl: str = "vllm"
    vllm_enable_sleep_mode: bool = False
    vllm_sleep_level: int = 1  # fastrl: 1 offloads weights + drops KV cache, 2 drops both (vLLM's levels)
    vllm_gpu_memory_utilization: float = 0.3
    vllm_max_model_length: int | None = None
    vllm_max_model_len: int | None = None  # vLLM's own spelling; an alias of vllm_max_model_length
    vllm_tensor_parallel_size: int = 1
    vllm_structured_outputs_regex: str | None = None
    vllm_server_base_url: str | None = None
    vllm_server_host: str = "0.0.0.0"
    vllm_server_port: int = 8000
    vllm_server_timeout: float = 240.0
    vllm_group_port: int = 51216
    vllm_importance_sampling_correction: bool = True
    vllm_importance_sampling_mode: str = "sequence_mask"
    vllm_importance_sampling_clip_max: float | None = 3.0
    vllm_importance_sampling_clip_min: float | None = None
    vllm_importance_sampling_cap: float | None = None  # deprecated TRL name for clip_max
    # ---- the GRPO loss ----
    beta: float = 0.0
    num_iterations: int = 1
    epsilon: float = 0.2
    delta: float | None = None
    epsilon_high: float | None = None
    sapo_temperature_neg: float = 1.05
    sapo_temperature_pos: float = 1.0
    importance_sampling_level: str = "token"
    reward_weights: list[float] | None = None
    multi_objective_aggregation: str = "sum_then_normalize"
    scale_rewards: str = "group"
    loss_type: str = "dapo"
    mask_truncated_completions: bool = False
    sync_ref_model: bool = False  # TR-DPO reference resets (fastrl.ref_sync); needs beta > 0
    ref_model_mixup_alpha: float = 0.6  # every ref_model_sync_steps steps: ref = alpha·policy + (1 − alpha)·ref
    ref_model_sync_steps: int = 512
    # fastrl: full fine-tuning with beta > 0 keeps the frozen reference model in host memory and moves it to the
    # device only for its logprob pass (once per generation batch). No effect without a reference model
    # (beta = 0, or LoRA, whose reference is the same model with the adapter disabled) or on a CPU run.
    ref_model_offload: bool = False
    dynamic_sampling: bool = False  # fastrl, DAPO: drop groups whose rewards are all equal (fastrl.dynamic_sampling)
    dynamic_sampling_max_attempts: int = 10  # generation rounds per batch before it is topped up with such groups
    top_entropy_quantile: float = 1.0
    entropy_coef: float = 0.0  # loss −= entropy_coef · mean entropy, scaled for accumulation only (TRL)
    use_adaptive_entropy: bool = False  # Skywork-OR1's controller (fastrl.entropy_control), TRL's semantics
    off_policy_mask_threshold: float | None = None  # DeepSeek-V3.2's off-policy sequence mask (TRL's OPSM)
    entropy_target: float = 0.2  # the adaptive entropy controller's fields
    entropy_coef_min: float = 0.0
    entropy_coef_max: float = 1.0
    entropy_coef_delta: float = 0.005
    vespo_k_pos: float = 2.0  # loss_type="vespo"'s gamma weight (kernels/params.VespoParams)
    vespo_k_neg: float = 3.0
    vespo_lambda_pos: float = 3.0
    vespo_lambda_neg: float = 2.0
    use_bias_correction_kl: bool = True  # TRL 1.16's default
    max_tool_calling_iterations: int | None = None
    # ---- completions logging ----
    log_completions: bool = False
    num_completions_to_print: int | None = None
    log_unique_prompts: bool = False  # the printed table shows each prompt once (TRL: its wandb/trackio table)
    # ---- packed batches (fastrl) ----
    # True: the decoder and the loss read each micro-batch padding-free (PackedBatch: tokens back to back, the
    # sequences kept apart by their position ids); False: the padded [B, P+T] path, TRL's, kept as the test twin;
    # None: packed when the model's attention keeps packed sequences apart (checked once before training,
    # fastrl.policy.use_padding_free), else padded with one log line saying why. The trainer sets the result here.
    padding_free: bool | None = None
    # micro-batches of at most this many prompt + completion tokens (first-fit over the sequences sorted by
    # length) instead of per_device_train_batch_size sequences each; needs padding_free. None = off
    max_tokens_per_micro_batch: int | None = None
    use_dynamic_bsz: bool = False  # veRL's name: with ppo_max_token_len_per_gpu, sets max_tokens_per_micro_batch
    ppo_max_token_len_per_gpu: int | None = None  # veRL's name for max_tokens_per_micro_batch
    # ---- distributed: filled from the launcher's environment (torchrun, accelerate launch; fastrl.distributed) ----
    world_size: int | None = None  # None -> WORLD_SIZE (1 without a launcher); a value must agree with it
    process_index: int | None = None  # None -> RANK

    def __post_init__(self):
        self._coerce_numbers()
        if self.output_dir is None:
            self.output_dir = "trainer_output"
        if self.bf16 is None:
            self.bf16 = not self.fp16
        if self.disable_tqdm is None:
            self.disable_tqdm = False
        if self.pad_to_multiple_of == "auto":  # TRL: 128 on Neuron devices, else None; padding is not used here
            self.pad_to_multiple_of = None
        self.scale_rewards = {True: "group", False: "none"}.get(self.scale_rewards, self.scale_rewards)
        if self.vllm_max_model_len is not None:
            self.vllm_max_model_length = self.vllm_max_model_len
        self.vllm_max_model_len = self.vllm_max_model_length
        if self.vllm_importance_sampling_cap is not None:
            self.vllm_importance_sampling_clip_max = self.vllm_importance_sampling_cap
        if self.use_dynamic_bsz:  # veRL's names for the token budget
            if self.ppo_max_token_len_per_gpu is None:
                raise ValueError("ppo_max_token_len_per_gpu: expected a token count when use_dynamic_bsz=True")
            self.max_tokens_per_micro_batch = self.ppo_max_token_len_per_gpu
        if isinstance(self.report_to, str):
            self.report_to = [] if self.report_to in ("none", "") else [self.report_to]
        self.report_to = list(self.report_to or [])
        if self.eval_strategy != "no":
            self.do_eval = True
        if self.activation_checkpointing is not None:  # transformers 5's names win over the deprecated ones
            self.gradient_checkpointing = self.activation_checkpointing
        if self.activation_checkpointing_kwargs is not None:
            self.gradient_checkpointing_kwargs = self.activation_checkpointing_kwargs
        self.activation_checkpointing = self.gradient_checkpointing
        self.activation_checkpointing_kwargs = self.gradient_checkpointing_kwargs
        self.debug = self.debug.split() if isinstance(self.debug, str) else list(self.debug)  # TrainingArguments'
        if self.use_cpu:
            self.dataloader_pin_memory = False  # as TrainingArguments sets it (no effect here)
        self._set_launch()
        self._check_fsdp()
        self._refuse_unsupported()
        self._check_types()
        self._check_values()
        self._derive_batch_sizes()

    def _coerce_numbers(self) -> None:
        """YAML 1.1 reads 1e-3 as a string (it wants 1.0e-3): turn numeric strings into the field's number type."""
        for f in dataclasses.fields(self):
            value, kind = getattr(self, f.name), str(f.type)
            if not isinstance(value, str) or not kind.startswith(("float", "int")) or "str" in kind:
                continue
            try:
                number = float(value)
            except ValueError:
                raise ValueError(f"{f.name}: expected a number, got {value!r}") from None
            setattr(self, f.name, int(number) if kind.startswith("int") and number.is_integer() else number)

    def _check_types(self) -> None:
        """Fields typed int, float or bool (or None) hold what they say: an int field an integer (8.0 is taken as 8,
        2.5 is refused rather than rounded), a float field a finite number (inf or NaN would train NaN weights or
        switch clipping off), a bool field True or False (a string such as "false" would read as true)."""
        for f in dataclasses.fields(self):
            kinds = {k.strip() for k in str(f.type).split("|")}
            value = getattr(self, f.name)
            if value is None or not kinds <= {"int", "float", "bool", "None"}:
                continue
            if "bool" in kinds:
                if not isinstance(value, bool):
                    raise ValueError(f"{f.name}: expected true or false, got {value!r}")
            elif isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{f.name}: expected a number, got {value!r}")
            elif not math.isfinite(value):
                raise ValueError(f"{f.name}: expected a finite number, got {value!r}")
            elif "float" not in kinds:
                if not float(value).is_integer():
                    raise ValueError(f"{f.name}: expected an integer, got {value!r}")
                setattr(self, f.name, int(value))

    def _refuse_unsupported(self) -> None:
        for name, (default, why) in UNSUPPORTED.items():
            if getattr(self, name) != default:
                raise ValueError(f"{name}={getattr(self, name)!r} is not supported by fastrl ({why}); "
                                 f"leave it at {default!r}")
        if self.optim not in OPTIMIZERS:
            raise ValueError(f"optim={self.optim!r} is not supported; fastrl uses torch AdamW ({OPTIMIZERS})")

    def _check_fsdp(self) -> None:
        """transformers' `fsdp` spelling, mapped to FSDP2: only full sharding (auto_wrap is what it does anyway)."""
        options = self.fsdp.split() if isinstance(self.fsdp, str) else list(self.fsdp or [])
        if not options:
            if self.fsdp_config:
                raise ValueError("fsdp_config: set without fsdp; add fsdp='full_shard'")
            return
        if "full_shard" not in options or set(options) - set(FSDP_OPTIONS):
            raise ValueError(f"fsdp: expected 'full_shard' (optionally with 'auto_wrap'), got {options!r}; "
                             "FSDP2 offload, hybrid and grad-op sharding are not implemented")
        if self.world_size < 2:
            raise ValueError(f"fsdp={options!r}: needs a launch with several processes (torchrun, accelerate "
                             "launch); one process trains unsharded")
        if self.sync_ref_model and self.save_strategy != "no":
            raise ValueError("sync_ref_model=True with fsdp and save_strategy='steps': a sharded checkpoint does not "
                             "hold the mixed reference model yet, so it could not resume; set save_strategy='no' or "
                             "train replicated (without fsdp)")
        if not isinstance(self.fsdp_config, (dict, type(None))):
            raise ValueError(f"fsdp_config: expected a dict, got {self.fsdp_config!r} (a JSON file is not read)")
        unknown = set(self.fsdp_config or {}) - set(FSDP_CONFIG_KEYS)
        if unknown:
            raise ValueError(f"fsdp_config: keys {sorted(unknown)} are not supported; expected {FSDP_CONFIG_KEYS}")

    def _set_launch(self) -> None:
        """world_size and process_index from the launcher (torchrun / accelerate launch set WORLD_SIZE, RANK)."""
        launch = launch_from_env()
        for name, value in (("world_size", launch.world_size), ("process_index", launch.rank)):
            given = getattr(self, name)
            if given is not None and given != value:
                raise ValueError(f"{name}={given} disagrees with the launch ({value} from the environment's "
                                 f"{'WORLD_SIZE' if name == 'world_size' else 'RANK'}); leave it unset")
            setattr(self, name, value)

    def _check_values(self) -> None:
        def need(cond: bool, name: str, expected: str) -> None:
            if not cond:
                raise ValueError(f"{name}: expected {expected}, got {getattr(self, name)!r}")

        need(isinstance(self.num_generations, int) and self.num_generations >= 2, "num_generations",
             "an integer >= 2 (GRPO needs a group to compare completions within)")
        need(isinstance(self.max_completion_length, int) and self.max_completion_length > 0,
             "max_completion_length", "a positive integer")
        need(self.max_prompt_length is None or self.max_prompt_length > 0, "max_prompt_length",
             "None or a positive integer")
        need(self.per_device_train_batch_size >= 1, "per_device_train_batch_size", "an integer >= 1")
        need(self.gradient_accumulation_steps >= 1, "gradient_accumulation_steps", "an integer >= 1")
        need(self.num_iterations >= 1, "num_iterations", "an integer >= 1")
        need(self.learning_rate >= 0, "learning_rate", "a number >= 0")
        need(self.max_grad_norm >= 0, "max_grad_norm", "a number >= 0 (0 = no clipping)")
        need(self.temperature > 0, "temperature", "a number > 0")
        need(0 < self.top_p <= 1, "top_p", "a number in (0, 1]")
        need(self.top_k is None or self.top_k >= 0, "top_k", "an integer >= 0 (0 = disabled)")
        need(self.min_p is None or 0 <= self.min_p <= 1, "min_p", "None or a number in [0, 1]")
        need(self.repetition_penalty > 0, "repetition_penalty", "a number > 0")
        need(self.beta >= 0, "beta", "a number >= 0")
        need(self.epsilon >= 0, "epsilon", "a number >= 0")
        need(self.loss_type in LOSS_TYPES, "loss_type", f"one of {LOSS_TYPES}")
        need(self.eval_strategy in ("no", "steps", "epoch"), "eval_strategy", "'no', 'steps' or 'epoch'")
        need(self.eval_steps is None or self.eval_steps > 0, "eval_steps", "None or a number > 0")
        need(self.per_device_eval_batch_size >= 1, "per_device_eval_batch_size", "an integer >= 1")
        need(self.num_generations_eval is None or self.num_generations_eval >= 1, "num_generations_eval",
             "None or an integer >= 1")
        eval_g = self.num_generations_eval or self.num_generations
        need(not self.do_eval or self.eval_strategy == "no"
             or self.per_device_eval_batch_size * self.world_size % eval_g == 0, "per_device_eval_batch_size",
             f"× world_size ({self.world_size}) a multiple of the number of generations used for evaluation "
             f"({eval_g})")
        if isinstance(self.generation_kwargs, str):  # TRL accepts a JSON string (from a command line)
            self.generation_kwargs = json.loads(self.generation_kwargs)
        check_generation_kwargs(self.generation_kwargs, self.use_vllm)
        need(self.multi_objective_aggregation in AGGREGATIONS, "multi_objective_aggregation", f"one of {AGGREGATIONS}")
        need(self.scale_rewards in ("group", "batch", "none"), "scale_rewards", "'group', 'batch' or 'none'")
        need(self.importance_sampling_level in ("token", "sequence"), "importance_sampling_level",
             "'token' or 'sequence'")
        need(0 < self.top_entropy_quantile <= 1, "top_entropy_quantile", "a number in (0, 1]")
        need(self.lr_scheduler_type in SCHEDULERS, "lr_scheduler_type", f"one of {SCHEDULERS}")
        need(self.save_strategy in ("steps", "no"), "save_strategy", "'steps' or 'no'")
        need(self.logging_strategy in ("steps", "no"), "logging_strategy", "'steps' or 'no'")
        need(self.vllm_mode in ("colocate", "server"), "vllm_mode", "'colocate' or 'server'")
        need(self.log_level in LOG_LEVELS, "log_level", f"one of {LOG_LEVELS}")
        need(self.save_steps > 0, "save_steps", "a number > 0")
        need(self.save_total_limit is None or self.save_total_limit >= 1, "save_total_limit", "None or >= 1")
        need(self.logging_steps > 0, "logging_steps", "a number > 0")
        need(self.max_steps > 0 or self.num_train_epochs > 0, "max_steps", "> 0, or num_train_epochs > 0")
        need(self.vllm_importance_sampling_mode in VLLM_IS_MODES, "vllm_importance_sampling_mode",
             f"one of {VLLM_IS_MODES}")
        need(self.vllm_sleep_level in (1, 2), "vllm_sleep_level", "1 or 2")
        need(self.vllm_tensor_parallel_size >= 1 and self.world_size % self.vllm_tensor_parallel_size == 0,
             "vllm_tensor_parallel_size", f"a divisor of world_size={self.world_size} (each group of that many ranks "
             "shares one vLLM engine)")
        need(self.warmup_ratio is None or 0 <= self.warmup_ratio <= 1, "warmup_ratio", "None or in [0, 1]")
        need(0 <= self.ref_model_mixup_alpha <= 1, "ref_model_mixup_alpha", "a number in [0, 1]")
        need(self.ref_model_sync_steps >= 1, "ref_model_sync_steps", "an integer >= 1")
        need(not self.sync_ref_model or self.beta > 0, "sync_ref_model",
             "False when beta=0 (no reference model is used, so there is nothing to sync; TRL refuses it too)")
        need(not self.gradient_checkpointing_offload or self.gradient_checkpointing, "gradient_checkpointing_offload",
             "False when gradient_checkpointing=False (it offloads the checkpointed activations; without "
             "checkpointing every activation and weight autograd saves would be copied)")
        need(self.dynamic_sampling_max_attempts >= 1, "dynamic_sampling_max_attempts", "an integer >= 1")
        need(self.max_tokens_per_micro_batch is None or self.max_tokens_per_micro_batch >= 1,
             "max_tokens_per_micro_batch", "None or a positive token count")
        need(self.max_tokens_per_micro_batch is None or self.padding_free is not False, "max_tokens_per_micro_batch",
             "None when padding_free=False (token-budget micro-batches are packed)")
        need(self.ddp_timeout > 0, "ddp_timeout", "a number of seconds > 0")
        need(self.ddp_bucket_cap_mb is None or self.ddp_bucket_cap_mb > 0, "ddp_bucket_cap_mb",
             "None (DDP's 25 MiB) or a size in MiB > 0")
        if self.loss_type == "dr_grpo":
            need(self.max_completion_length is not None, "max_completion_length", "set for loss_type='dr_grpo'")
        if self.loss_type == "vespo" and self.use_vllm and self.vllm_importance_sampling_correction:
            need(self.vllm_importance_sampling_mode in ("token_truncate", "token_mask"), "vllm_importance_sampling_mode",
                 "'token_truncate' or 'token_mask' with loss_type='vespo' (VESPO folds per-token ratios into its "
                 "sequence weight; TRL refuses the sequence modes too)")
        lo, hi = self.vllm_importance_sampling_clip_min, self.vllm_importance_sampling_clip_max
        if lo is not None and hi is not None and lo >= hi:
            raise ValueError(f"vllm_importance_sampling_clip_min ({lo}) must be less than "
                             f"vllm_importance_sampling_clip_max ({hi})")

    def needs_old_logprobs(self) -> bool:
        """TRL's rule for a pass of old logprobs: a generation batch outlives one optimizer step (it is reused over
        num_iterations or spread over steps); and with vLLM always: rollout/logprob_abs_diff, the stale-weights
        detector, compares them with the generator's every step."""
        generate_every = self.steps_per_generation * self.num_iterations
        return self.gradient_accumulation_steps % generate_every != 0 or self.use_vllm

    def _derive_batch_sizes(self) -> None:
        """TRL's rule: generation_batch_size = per_device_train_batch_size × world_size × steps_per_generation."""
        global_micro = self.per_device_train_batch_size * self.world_size
        if self.generation_batch_size is None and self.steps_per_generation is None:
            self.steps_per_generation = self.gradient_accumulation_steps
            self.generation_batch_size = global_micro * self.steps_per_generation
        elif self.generation_batch_size is not None and self.steps_per_generation is None:
            if self.generation_batch_size % global_micro:
                raise ValueError(f"generation_batch_size ({self.generation_batch_size}) must be divisible by the "
                                 f"global batch size per_device_train_batch_size × world_size ({global_micro})")
            self.steps_per_generation = self.generation_batch_size // global_micro
        elif self.generation_batch_size is None:
            self.generation_batch_size = global_micro * self.steps_per_generation
        else:
            raise ValueError("generation_batch_size and steps_per_generation can not be both set")
        if self.generation_batch_size % self.num_generations:
            raise ValueError(f"generation_batch_size ({self.generation_batch_size}) must be divisible by "
                             f"num_generations ({self.num_generations})")
        if self.max_tokens_per_micro_batch is not None and self.steps_per_generation % self.gradient_accumulation_steps:
            raise ValueError(f"steps_per_generation ({self.steps_per_generation}) must be a multiple of "
                             f"gradient_accumulation_steps ({self.gradient_accumulation_steps}) with "
                             "max_tokens_per_micro_batch: an optimizer step regroups one generation batch's sequences")

    # ---- derived quantities the trainer uses ----
    @property
    def prompts_per_generation(self) -> int:
        return self.generation_batch_size // self.num_generations

    @property
    def gradient_bucket_bytes(self) -> int:
        """Replicas all-reduce their gradients in fp32 buckets of ddp_bucket_cap_mb MiB, or of DDP's default 25 MiB
        (torch.nn.parallel.DistributedDataParallel's bucket_cap_mb) when it is None."""
        return int((25 if self.ddp_bucket_cap_mb is None else self.ddp_bucket_cap_mb) * 2**20)

    def warmup_steps_for(self, num_training_steps: int) -> int:
        if self.warmup_ratio is not None:
            return math.ceil(num_training_steps * self.warmup_ratio)
        w = self.warmup_steps
        return int(w) if w >= 1 else math.ceil(num_training_steps * w)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in dataclasses.fields(cls)}


def _unknown_fields_are_value_errors(init):
    """GRPOConfig(learnin_rate=...) is a ValueError naming the closest field, not a TypeError."""

    @functools.wraps(init)
    def wrapper(self, *args, **kwargs):
        unknown = [k for k in kwargs if k not in GRPOConfig.field_names()]
        if unknown:
            hint = difflib.get_close_matches(unknown[0], GRPOConfig.field_names(), n=1)
            said = f" (did you mean {hint[0]!r}?)" if hint else ""
            raise ValueError(f"{unknown[0]}: not a GRPOConfig field{said}")
        init(self, *args, **kwargs)

    return wrapper


GRPOConfig.__init__ = _unknown_fields_are_value_errors(GRPOConfig.__init__)
