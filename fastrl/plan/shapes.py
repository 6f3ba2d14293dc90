"""What `fastrl plan` needs to know about a model and a run, read from a config.json and a run config.

`ModelShape` holds the sizes of a Llama-family decoder (Llama, Qwen2, Mistral: RMSNorm, rotary attention with
grouped KV heads, a SwiGLU MLP) and counts its parameters. `RunShape` holds the batch, the lengths and the
memory-relevant switches of a GRPO run, with GRPOConfig's defaults and checks (TRL's names), and the tokens a
training micro-batch holds: padded (b rows of P + T) or, with padding_free, packed (its valid tokens only).
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
from dataclasses import dataclass

from fastrl.config import GRPOConfig
from fastrl.launch import LAUNCH_VARIABLES

DTYPE_BYTES = {"float32": 4, "float": 4, "bfloat16": 2, "float16": 2, "half": 2}
REQUIRED_MODEL_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Keys of a run config that are not GRPOConfig fields (the `fastrl train` schema, plus `peft`).
RUN_ONLY_KEYS = ("model", "tiny_model", "task", "task_args", "dataset", "rewards", "peft")
PEFT_KEYS = ("r", "lora_alpha", "lora_dropout", "target_modules", "bias", "task_type")


@dataclass(frozen=True)
class ModelShape:
    hidden: int  # H
    intermediate: int  # I
    layers: int  # L
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int  # V
    tied: bool  # lm_head shares the embedding matrix
    weight_bytes: int  # bytes per parameter as loaded (config dtype)
    qkv_bias: bool = False

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """Each decoder layer's linear layers: name -> (in_features, out_features)."""
        h, q, kv, i = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.intermediate
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    def layer_params(self) -> int:
        """One decoder layer: 7 linear weights (+ q/k/v biases for Qwen2) + 2 RMSNorm weights [H]."""
        shapes = self.linear_shapes()
        bias = sum(shapes[n][1] for n in ("q_proj", "k_proj", "v_proj")) if self.qkv_bias else 0
        return sum(a * b for a, b in shapes.values()) + bias + 2 * self.hidden

    def head_params(self) -> int:
        return self.vocab * self.hidden  # [V, H]

    def total_params(self) -> int:
        """embedding [V, H] + L layers + final norm [H] + lm_head [V, H] unless tied."""
        head = 0 if self.tied else self.head_params()
        return self.head_params() + self.layers * self.layer_params() + self.hidden + head

    def largest_param(self) -> int:
        return max(self.head_params(), max(a * b for a, b in self.linear_shapes().values()))


def model_shape(config: dict, dtype_override: str | None = None) -> ModelShape:
    """A transformers config.json (as a dict) -> ModelShape. Raises ValueError naming missing/bad keys."""
    if not isinstance(config, dict):
        raise ValueError(f"model config: expected a dict (a config.json), got {type(config).__name__}")
    missing = [k for k in REQUIRED_MODEL_KEYS if k not in config]
    if missing:
        raise ValueError(f"model config: missing key(s) {missing}; plan needs {list(REQUIRED_MODEL_KEYS)} "
                         "(a Llama-family config.json)")
    for k in REQUIRED_MODEL_KEYS:
        if not isinstance(config[k], int) or config[k] < 1:
            raise ValueError(f"model config: {k} must be a positive integer, got {config[k]!r}")
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    dtype = dtype_override or config.get("dtype") or config.get("torch_dtype") or "float32"
    dtype = str(dtype).replace("torch.", "")
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"model config: dtype {dtype!r} is not one of {sorted(DTYPE_BYTES)}")
    return ModelShape(hidden=config["hidden_size"], intermediate=config["intermediate_size"],
                      layers=config["num_hidden_layers"], heads=heads, kv_heads=kv_heads, head_dim=head_dim,
                      vocab=config["vocab_size"], tied=bool(config.get("tie_word_embeddings", False)),
                      weight_bytes=DTYPE_BYTES[dtype],
                      qkv_bias=config.get("model_type") == "qwen2" or bool(config.get("attention_bias", False)))


@dataclass(frozen=True)
class LoraShape:
    r: int
    targets: tuple[str, ...]  # names among LINEAR_NAMES

    def params(self, model: ModelShape) -> int:
        """r·(in + out) per adapted linear (A [r, in], B [out, r]), in every layer."""
        shapes = model.linear_shapes()
        return model.layers * sum(self.r * (shapes[n][0] + shapes[n][1]) for n in self.targets)


def lora_shape(peft: dict | None) -> LoraShape | None:
    if peft is None:
        return None
    if not isinstance(peft, dict):
        raise ValueError(f"peft: expected a mapping (r, lora_alpha, target_modules), got {peft!r}")
    unknown = [k for k in peft if k not in PEFT_KEYS]
    if unknown:
        raise ValueError(f"peft: unknown key(s) {unknown}; known: {list(PEFT_KEYS)}")
    r = peft.get("r", 8)
    if not isinstance(r, int) or r < 1:
        raise ValueError(f"peft.r: expected a positive integer, got {r!r}")
    targets = peft.get("target_modules", ["q_proj", "v_proj"])  # peft's default for Llama
    if targets == "all-linear":
        targets = list(LINEAR_NAMES)
    if isinstance(targets, str):
        targets = [targets]
    bad = [t for t in targets if t not in LINEAR_NAMES]
    if "lm_head" in bad:
        raise ValueError("peft.target_modules: LoRA on lm_head is not supported by the fused loss")
    if bad:
        raise ValueError(f"peft.target_modules: {bad} do not exist in the model's layers; "
                         f"its linear layers are {list(LINEAR_NAMES)} (or 'all-linear')")
    return LoraShape(r=r, targets=tuple(dict.fromkeys(targets)))


@dataclass(frozen=True)
class RunShape:
    micro_batch: int  # completions per micro-batch (per_device_train_batch_size)
    generation_batch: int  # completions generated at once (generation_batch_size)
    prompt_len: int  # P (max_prompt_length)
    completion_len: int  # T (max_completion_length)
    checkpointing: bool
    bf16: bool  # bf16 autocast on top of the loaded dtype
    beta: float
    lora: LoraShape | None
    use_vllm: bool
    vllm_utilization: float
    vllm_sleep: bool
    vllm_sleep_level: int
    offload_reference: bool = False  # the reference model kept in host memory between uses
    offload_activations: bool = False  # checkpointed activations in host memory (gradient_checkpointing_offload)
    padding_free: bool = False  # packed micro-batches: valid tokens only, in one row
    token_budget: int | None = None  # max_tokens_per_micro_batch (padding_free only)
    window: int = 1  # sequences per optimizer step and process (micro_batch × gradient_accumulation_steps)
    mean_prompt_len: float | None = None  # P̄, expected (padding_free only); None: P, every prompt full length
    mean_completion_len: float | None = None  # T̄, likewise; None: T
    world_size: int = 1  # processes in the launch (nproc per node × nodes); the shape is one rank's
    fsdp: bool = False  # FSDP2 full sharding across the world_size ranks (else each rank holds a replica)
    bucket_bytes: int = 25 << 20  # replicas' gradient all-reduce bucket (GRPOConfig.gradient_bucket_bytes)

    def replace(self, **changes) -> "RunShape":
        return dataclasses.replace(self, **changes)

    @property
    def micro_tokens(self) -> int:
        """S, the tokens the decoder reads per micro-batch: b·(P + T) padded; packed b·(P̄ + T̄), or with a
        token budget the budget (first-fit fills it; one sequence longer than it gets its own micro-batch),
        at most the window's tokens."""
        if not self.padding_free:
            return self.micro_batch * (self.prompt_len + self.completion_len)
        mean = self._mean_prompt + self._mean_completion
        if self.token_budget is None:
            return math.ceil(self.micro_batch * mean)
        return min(max(self.token_budget, self.prompt_len + self.completion_len), math.ceil(self.window * mean))

    @property
    def micro_rows(self) -> int:
        """N, the completion rows the loss sweeps per micro-batch (b·T padded; packed S·T̄ / (P̄ + T̄))."""
        if not self.padding_free:
            return self.micro_batch * self.completion_len
        return math.ceil(self.micro_tokens * self._mean_completion / (self._mean_prompt + self._mean_completion))

    @property
    def attention_row(self) -> int:
        """Keys each query's attention mask row spans: P + T padded ([b, 1, P+T, P+T]); none packed (sdpa per
        sequence with is_causal, fastrl.packed_attention, or flash_attention_2's varlen cu_seqlens)."""
        return 0 if self.padding_free else self.prompt_len + self.completion_len

    @property
    def _mean_prompt(self) -> float:
        return self.prompt_len if self.mean_prompt_len is None else self.mean_prompt_len

    @property
    def _mean_completion(self) -> float:
        return self.completion_len if self.mean_completion_len is None else self.mean_completion_len

    @property
    def has_reference_copy(self) -> bool:
        """beta > 0 with full fine-tuning needs a frozen copy; LoRA disables the adapter on the same model."""
        return self.beta > 0 and self.lora is None


def check_run_keys(run: dict) -> None:
    from fastrl.run_config import check_keys

    check_keys(run, RUN_ONLY_KEYS, "run config")


def run_shape(run: dict, mean_lengths: tuple[float, float] | None = None, world_size: int = 1) -> RunShape:
    """A run config (GRPOConfig fields at top level, TRL's names, + `peft`) -> one rank's RunShape in a launch of
    world_size processes, with GRPOConfig's defaults and value checks as that launch's ranks apply them.
    mean_lengths: the expected mean (prompt, completion) length in tokens, which sets a padding-free
    micro-batch's size; None: every sequence at its maximum (the worst case)."""
    if not isinstance(run, dict):
        raise ValueError(f"run config: expected a mapping, got {type(run).__name__}")
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size: expected a positive integer (processes per node × nodes), got {world_size!r}")
    check_run_keys(run)
    with launched_as(world_size):
        args = GRPOConfig(**{k: v for k, v in run.items() if k not in RUN_ONLY_KEYS})
    if args.max_prompt_length is None:
        raise ValueError("max_prompt_length: plan needs the longest prompt in tokens (set max_prompt_length)")
    _check_mean_lengths(mean_lengths, args.max_prompt_length, args.max_completion_length)
    mean_prompt, mean_completion = mean_lengths or (None, None)
    # every rank samples its 1/world_size slice of the global generation batch (GRPOTrainer._generate)
    return RunShape(micro_batch=args.per_device_train_batch_size,
                    generation_batch=args.generation_batch_size // world_size,
                    prompt_len=args.max_prompt_length, completion_len=args.max_completion_length,
                    checkpointing=bool(args.gradient_checkpointing), bf16=bool(args.bf16), beta=float(args.beta),
                    lora=lora_shape(run.get("peft")), use_vllm=bool(args.use_vllm),
                    vllm_utilization=float(args.vllm_gpu_memory_utilization),
                    vllm_sleep=bool(args.vllm_enable_sleep_mode), vllm_sleep_level=int(args.vllm_sleep_level),
                    offload_reference=bool(args.ref_model_offload),
                    offload_activations=bool(args.gradient_checkpointing_offload),
                    # None (the default) packs wherever the model's attention can (fastrl.policy.use_padding_free)
                    padding_free=args.padding_free is not False, token_budget=args.max_tokens_per_micro_batch,
                    window=args.per_device_train_batch_size * args.gradient_accumulation_steps,
                    mean_prompt_len=mean_prompt, mean_completion_len=mean_completion,
                    world_size=world_size, fsdp=bool(args.fsdp), bucket_bytes=args.gradient_bucket_bytes)


def _check_mean_lengths(mean_lengths, max_prompt: int, max_completion: int) -> None:
    if mean_lengths is None:
        return
    prompt, completion = mean_lengths
    if not 0 < prompt <= max_prompt:
        raise ValueError(f"mean_lengths (--mean-lengths): the prompt's, expected a number in "
                         f"(0, max_prompt_length = {max_prompt}], got {prompt!r}")
    if not 0 < completion <= max_completion:
        raise ValueError(f"mean_lengths (--mean-lengths): the completion's, expected a number in "
                         f"(0, max_completion_length = {max_completion}], got {completion!r}")


@contextlib.contextmanager
def launched_as(world_size: int):
    """The launcher's variables of rank 0 in a world_size-process launch, for the duration (GRPOConfig reads the
    world size from them, as in a real launch); one process: none set. Restored after."""
    saved = {k: os.environ.pop(k) for k in LAUNCH_VARIABLES if k in os.environ}
    if world_size > 1:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size))
    try:
        yield
    finally:
        for k in LAUNCH_VARIABLES:
            os.environ.pop(k, None)
        os.environ.update(saved)


def loaded_dtype(run: dict) -> str | None:
    """A dtype forced through model_init_kwargs (dtype / torch_dtype), else None (the config's dtype)."""
    kwargs = run.get("model_init_kwargs") or {}
    dtype = kwargs.get("dtype") or kwargs.get("torch_dtype")
    return None if dtype in (None, "auto") else str(dtype)
