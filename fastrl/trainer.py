"""GRPOTrainer: TRL's GRPO, with the loss computed from hidden states by fused kernels.

    trainer = GRPOTrainer(model="path/or/id", reward_funcs=[f, g], args=GRPOConfig(...), train_dataset=ds)
    trainer.train()

One optimizer step, read top to bottom in `_training_step`:
  for each of gradient_accumulation_steps micro-batches:
      when due (every steps_per_generation × num_iterations micro-batches), build a new generation batch:
          sample prompts -> G completions each -> rewards (weighted nansum; None = NaN, excluded)
          (dynamic_sampling: drop groups with equal rewards, sample more prompts until the batch is full)
          -> group advantages -> old logprobs (only if the batch is reused) -> reference logprobs (beta > 0)
          -> shuffle, split into steps_per_generation micro-batches
      final hidden states of the policy -> fused_linear_grpo_loss -> backward
  clip gradients -> AdamW step -> scheduler step (-> reference model mixed towards the policy, sync_ref_model)
then log, and checkpoint every save_steps.
Callbacks (transformers' TrainerCallback) hear on_step_begin before the step and on_step_end after it, before the
log and the checkpoint; through TrainerControl they can ask to log, save, or stop after the step.

Batch sizes are TRL's: per_device_train_batch_size counts completions; a generation batch holds
generation_batch_size = per_device_train_batch_size × world_size × steps_per_generation completions.
Every normaliser and accumulation factor of the loss comes from one LossSpec (fastrl.kernels.loss_spec), built from
GRPOConfig and the world size.
Several processes (torchrun, accelerate launch; fastrl.distributed): every rank draws the same prompts, samples
its slice of the generation batch, and the completions and rewards are gathered, so advantages, normalisers and
generation metrics are those of the whole batch; each rank then trains on its slice of every micro-batch and the
gradients are averaged. Completions come from per-row random streams, so N processes and one sample the same.
"""
from __future__ import annotations

import contextlib
import logging
import math
import resource
import sys
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field, replace
from typing import NamedTuple

import torch
from torch.utils._foreach_utils import _get_fused_kernels_supported_devices
from transformers.optimization import get_scheduler
from transformers.utils import logging as transformers_logging

from fastrl import distributed
from fastrl.checkpoint import copy_into, latest_checkpoint, load_checkpoint, resolve_resume, save_checkpoint, \
    set_seed
from fastrl.config import GRPOConfig
from fastrl.data import check_dataset, completions_for_rewards, is_stream, make_sampler, tokenize_prompts
from fastrl.dynamic_sampling import ScoredGroups, concat_groups, fill_generation_batch
from fastrl.entropy_control import EntropyControl
from fastrl.environments import EMPTY_PROMPT, placeholder_dataset
from fastrl.evaluation import check_eval_dataset, eval_due, evaluate_set, named_sets
from fastrl.generation.base import Rollout, SamplingConfig
from fastrl.generation.extra_kwargs import transformers_generation_config
from fastrl.generation.is_correction import logprob_abs_diff
from fastrl.generation.streams import stream_keys, turn_keys
from fastrl.importance_sampling import sampling_ratio
from fastrl.kernels import fused_linear_grpo_loss, fused_linear_logprobs
from fastrl.kernels.checks import deferred_value_checks
from fastrl.kernels.loss_spec import COMPLETION_BUDGET, ITEMS, LOSS_RULES, MASK_TOTAL, LossSpec
from fastrl.launch import launch_from_env
from fastrl.logging_utils import MetricsLogger, NullLogger, append_jsonl
from fastrl.model_logits import check_fused_logits, logit_transform
from fastrl.output_dir import OutputDirLock, check_earlier_run, check_writable
from fastrl.phase_times import PhaseTimes
from fastrl.policy import (activations_offloaded, completion_hidden, frozen_reference,
                           is_peft, lm_head, load_policy, load_tokenizer, packed_completion_hidden,
                           prepare_for_training, reference_on, use_padding_free)
from fastrl.ref_sync import (REFERENCE_FILE, check_sync_supported, maybe_sync_reference, reference_state,
                             restore_reference, sync_due)
from fastrl.rewards.reward_model import wrap_reward_models
from fastrl.rollout_batch import PackedBatch, RolloutBatch, split_bins, token_budget_bins
from fastrl.rollout_hooks import HookedRollout, RolloutHooks
from fastrl.scoring import (UninformativeRewardWarning, aggregate_advantages, check_reward_columns,
                            check_reward_source, check_reward_weights, combine, resolve_reward_funcs, score)
from fastrl.sharded_checkpoint import is_sharded_checkpoint, load_sharded_checkpoint, restore_into_shards, \
    save_sharded_checkpoint

log = logging.getLogger(__name__)


UNSUPPORTED_ARGUMENTS = {"quantization_config": "quantized policies are not supported"}  # GRPOTrainer's, and why


class TrainOutput(NamedTuple):  # transformers' TrainOutput (importing its module pulls in peft: ~10 s)
    global_step: int
    training_loss: float
    metrics: dict[str, float]


@dataclass
class TrainerState:
    """transformers' TrainerState fields (what callbacks read), plus micro_step. Saved in every checkpoint."""
    global_step: int = 0  # optimizer steps done
    max_steps: int = 0
    micro_step: int = 0  # micro-batches done (drives when to generate)
    epoch: float = 0.0
    log_history: list[dict] = field(default_factory=list)
    logging_steps: int = 500  # this run's intervals in steps (a ratio of max_steps resolved), set by train()
    eval_steps: int = 500
    save_steps: int = 500
    train_batch_size: int | None = None
    num_train_epochs: float = 0
    num_input_tokens_seen: int = 0  # prompt + model-written completion tokens of every generation batch (TRL)
    total_flos: float = 0
    best_metric: float | None = None  # no evaluation: these stay None
    best_global_step: int | None = None
    best_model_checkpoint: str | None = None
    is_local_process_zero: bool = True  # one process
    is_world_process_zero: bool = True
    is_hyper_param_search: bool = False
    trial_name: str | None = None
    trial_params: dict | None = None


@dataclass
class TrainerControl:
    """transformers' TrainerControl: callbacks set these to steer the loop (importing its module costs ~10 s)."""
    should_training_stop: bool = False  # stop after this step
    should_epoch_stop: bool = False
    should_save: bool = False  # checkpoint after this step (whatever save_strategy says)
    should_evaluate: bool = False
    should_log: bool = False  # close the logging window after this step


class GRPOTrainer:
    def __init__(self, model, reward_funcs=None, args: GRPOConfig | None = None, train_dataset=None,
                 eval_dataset=None, processing_class=None, reward_processing_classes=None, callbacks=None,
                 optimizers=(None, None), quantization_config=None, peft_config=None, tools=None, rollout_func=None,
                 environment_factory=None):
        if args is None:  # TRL's default: an output folder named after the model
            name = model if isinstance(model, str) else getattr(model.config, "_name_or_path", "")
            args = GRPOConfig(f"{name.split('/')[-1]}-GRPO")
        self.args = args
        _refuse_unsupported_arguments(quantization_config=quantization_config)
        set_seed(args.seed)
        _warn_like_trl(args)
        _apply_process_settings(args)
        check_writable(args.output_dir)  # a read-only or full disk, found before the model loads
        if train_dataset is None:  # TRL's rule: allowed when the environment gives the prompts
            train_dataset = placeholder_dataset(args, environment_factory)
        self.prompt_optional = environment_factory is not None  # TRL's: then a row's prompt defaults to EMPTY_PROMPT
        check_dataset(train_dataset, self.prompt_optional)
        if is_stream(train_dataset) or any(is_stream(ds) for ds in named_sets(eval_dataset, "").values()):
            _check_stream_settings(args, is_stream(train_dataset))
        if eval_dataset is not None:
            check_eval_dataset(eval_dataset, self.prompt_optional)
        elif args.eval_strategy != "no":  # transformers' rule
            raise ValueError(f"eval_dataset: eval_strategy={args.eval_strategy!r} needs an eval_dataset (or set "
                             "eval_strategy='no')")
        self.eval_dataset = eval_dataset
        check_sync_supported(args, peft_config)
        self.train_dataset = train_dataset
        if processing_class is None:
            processing_class = load_tokenizer(model if isinstance(model, str) else model.config._name_or_path)
        self.processing_class = processing_class
        self.hooks = None  # rollout_func, tools, environment_factory (fastrl.rollout_hooks)
        if rollout_func is not None or tools or environment_factory is not None:
            self.hooks = RolloutHooks(processing_class, args, tools, rollout_func, environment_factory)
            if self._ranks_per_engine() > 1:
                raise ValueError(f"vllm_tensor_parallel_size={args.vllm_tensor_parallel_size}: a rollout_func (or "
                                 "tools, environment_factory) samples its own rank's rows alone, which needs an "
                                 "engine per rank; use 1")
        env = self.hooks.environments if self.hooks is not None else None
        self.reward_funcs, self.reward_func_names = resolve_reward_funcs(reward_funcs, args.model_init_kwargs,
                                                                         optional=env is not None)
        self.reward_weights = self._reward_weights()
        # a rollout function's extra fields are columns too, known only once it ran; so are a stream's without features
        if rollout_func is None and train_dataset.column_names is not None:
            known = list(train_dataset.column_names) + (["environments"] if env is not None else [])
            check_reward_columns(self.reward_funcs, self.reward_func_names, known)
        self.launch = launch_from_env()
        self.device = distributed.device_for(self.launch, args.use_cpu)
        distributed.init_process_group(self.launch, self.device, args.ddp_timeout)
        if args.tf32 is not None and self.device.type == "cuda":  # TrainingArguments' switch
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = args.tf32
        self.reward_funcs = wrap_reward_models(self.reward_funcs, reward_processing_classes, self.device, args)
        if env is not None and env.reward_funcs:  # environments that score their rollouts: weight 1 each (TRL)
            self.reward_funcs += env.reward_funcs
            self.reward_func_names += env.reward_names
            self.reward_weights = torch.cat([self.reward_weights, torch.ones(len(env.reward_funcs))])
        check_reward_source(self.reward_funcs)
        self._reward_watch = UninformativeRewardWarning(self.reward_func_names)
        self.tokenizer = getattr(processing_class, "tokenizer", processing_class)
        if self.tokenizer.pad_token_id is None:
            if self.tokenizer.eos_token_id is None:
                raise ValueError("processing_class: the tokenizer has neither a pad nor an eos token")
            self.tokenizer.pad_token = self.tokenizer.eos_token  # padding is always masked out; TRL does the same
        self.model = prepare_for_training(load_policy(model, args, self.device), args, self.device, peft_config)
        distributed.broadcast_parameters(self.model)  # replicas start from rank 0's weights
        self.logit_transform = logit_transform(self.model)  # the family's scales / softcap, folded into the sweeps
        check_fused_logits(self.model, lm_head(self.model), completion_hidden)  # before any work (model_logits.py)
        # packed when the model's attention keeps packed sequences apart (None: else padded, logged; True: refused)
        args.padding_free = use_padding_free(self.model, args.padding_free, args.max_tokens_per_micro_batch and
                                             "max_tokens_per_micro_batch (token-budget micro-batches are packed)")
        # beta > 0: a frozen copy for full fine-tuning (in host memory with ref_model_offload); a PEFT policy is
        # its own reference with the adapter disabled, so no second copy of the model exists (TRL does the same)
        self.ref_model = None
        if args.beta != 0.0 and not is_peft(self.model):
            self.ref_model = frozen_reference(self.model, "cpu" if args.ref_model_offload else None)
        if args.fsdp:  # FSDP2, after the reference copy was taken from the whole model
            self.model = distributed.shard(self.model, self.device, args)
            if self.ref_model is not None:  # ref_model_offload: FSDP2 moves its shards, reference_on does not
                self.ref_model = distributed.shard(self.ref_model, self.device, args, offload=args.ref_model_offload)
        self.generator = self._build_generator()
        self.sampler = make_sampler(train_dataset, args.prompts_per_generation,
                                    args.data_seed if args.data_seed is not None else args.seed, args.shuffle_dataset,
                                    self.prompt_optional)
        self.state = TrainerState(is_local_process_zero=self.launch.local_rank == 0,
                                  is_world_process_zero=self.launch.rank == 0)
        self.control = TrainerControl()
        self.callbacks = [cb() if isinstance(cb, type) else cb for cb in callbacks or []]  # transformers' rule
        self.optimizer = self.lr_scheduler = None
        self._given_optimizers = optimizers  # TRL's (optimizer, scheduler); a None is built by train()
        self._logger: MetricsLogger | None = None  # while train() runs
        self.loss_spec = LossSpec.from_config(args)  # every normaliser and accumulation factor of the loss
        self.entropy_control = EntropyControl(args)  # the entropy bonus's coefficient (static or adaptive)
        self._loss_fn = fused_linear_grpo_loss  # injectable: tests swap in the float64 reference
        self._logprob_fn = fused_linear_logprobs
        self._buffer: list[RolloutBatch] | None = None  # the current generation batch, split into micro-batches
        self._buffer_info: dict = {}  # its loss-token count, generation metrics and log_completions rows
        self._window: list[dict] = []  # per-step metrics since the last log_history entry
        self._extra_metrics: dict[str, list[float]] = defaultdict(list)  # from reward functions' log_metric
        self._extra_columns: dict[str, list] = defaultdict(list)  # from reward functions' log_extra
        self._times = PhaseTimes(self.device)  # this step's seconds per phase, logged as time/<phase>
        self._callback("on_init_end")

    # ------------------------------------------------------------------ training loop
    def train(self, resume_from_checkpoint=None) -> TrainOutput:
        args = self.args
        resume = resolve_resume(resume_from_checkpoint if resume_from_checkpoint is not None
                                else args.resume_from_checkpoint, args.output_dir)
        # a peer that dies fails this rank's next collective: its error names the peer and the checkpoint to use
        with distributed.peer_failures(lambda: latest_checkpoint(args.output_dir)):
            if self.launch.rank != 0:  # rank 0 owns the folder: it locks it and writes every file
                return self._train(resume)
            with OutputDirLock(args.output_dir):  # one run at a time in a folder
                check_earlier_run(args.output_dir, resume is not None, args.overwrite_output_dir)
                return self._train(resume)

    def _train(self, resume: str | None) -> TrainOutput:
        args = self.args
        self.state.max_steps = self._total_steps()
        self.optimizer = self._given_optimizers[0] or self._build_optimizer()
        self.lr_scheduler = self._given_optimizers[1] or get_scheduler(
            args.lr_scheduler_type, self.optimizer, num_warmup_steps=args.warmup_steps_for(self.state.max_steps),
            num_training_steps=self.state.max_steps, scheduler_specific_kwargs=args.lr_scheduler_kwargs or {})
        if resume:
            self._load_checkpoint(resume)
        self._set_run_settings()
        self._logger = logger = NullLogger()  # rank 0 alone writes files, dashboards and the progress bar
        if self.state.is_world_process_zero:
            self._logger = logger = MetricsLogger(
                args.output_dir, args.report_to, args.run_name, self.state.max_steps, self.state.global_step,
                disable_tqdm=bool(args.disable_tqdm), config=args.to_dict(), log_completions=args.log_completions,
                logging_dir=args.logging_dir)
        started, first_step, losses = time.time(), self.state.global_step, []
        self.control.should_training_stop = False
        self._callback("on_train_begin")
        if args.eval_on_start and self.state.global_step == 0:
            self.evaluate()
        while self.state.global_step < self.state.max_steps:
            epoch_before = self.state.epoch
            self.control.should_log = self.control.should_save = self.control.should_evaluate = False
            self._callback("on_step_begin")
            metrics = self._training_step()
            self.state.global_step += 1
            if sync_due(args, self.state.global_step) and self.ref_model is not None:  # TR-DPO resets
                with reference_on(self.ref_model, self.device, args.ref_model_offload):
                    maybe_sync_reference(args, self.state.global_step, self.model, self.ref_model)
            self.state.epoch = self.sampler.epochs_done
            losses.append(metrics["loss"])
            self._callback("on_step_end")  # a callback may ask to log, save or stop after this step
            self._log_step(metrics, logger)
            if self.control.should_evaluate or eval_due(args, self.state.global_step, self.state.eval_steps,
                                                        epoch_before, self.state.epoch):
                self.evaluate()  # after the log and before the checkpoint, as transformers does
            if self._should_save() or self.control.should_save:
                self._save_checkpoint()
                self.control.should_save = False
                self._callback("on_save")
            if self.control.should_training_stop:
                break
        runtime = time.time() - started  # the training loop; drawing curves.png below is not training
        logger.close()
        self._logger = None
        steps = self.state.global_step - first_step
        samples = steps * args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
        summary = {"train_runtime": round(runtime, 4),  # transformers' speed_metrics, rounded as it rounds them
                   "train_samples_per_second": round(samples / max(runtime, 1e-9), 3),
                   "train_steps_per_second": round(steps / max(runtime, 1e-9), 3),
                   "total_flos": self.state.total_flos, "train_loss": sum(losses) / max(1, len(losses))}
        entry = {**summary, "epoch": self.state.epoch, "step": self.state.global_step}
        self.state.log_history.append(entry)
        self._callback("on_log", logs=entry)
        self._callback("on_train_end")
        return TrainOutput(self.state.global_step, summary["train_loss"], summary)

    def _training_step(self) -> dict:
        """One optimizer step over gradient_accumulation_steps micro-batches; returns its metrics."""
        args, t0 = self.args, time.perf_counter()
        self.model.train()
        self._times.reset()  # what evaluation timed between steps is not this step's
        loss_total, tokens, per_batch = 0.0, 0, defaultdict(list)
        # the kernels' input value checks of the whole step (losses, old/reference logprobs) in one device->host
        # read at the end of this block, before the optimizer step (kernels/checks.py)
        with deferred_value_checks():
            for batch, scale, entropy_scale in self._step_micro_batches():
                loss, loss_metrics = self._micro_batch_loss(batch, scale=scale, entropy_scale=entropy_scale)
                with self._times.phase("backward"):
                    loss.backward()
                loss_total += loss.item()
                if not math.isfinite(loss_total):
                    raise FloatingPointError(f"step {self.state.global_step + 1}: the loss is {loss_total} (a "
                                             "non-finite loss would train NaN weights); stopped before the optimizer "
                                             "step")
                tokens += int(batch.prompt_mask.sum() + batch.completion_attention.sum())
                # token means over the ranks' slices, weighted by their tokens: the micro-batch's token means
                local = {k: float(v) for k, v in loss_metrics.items()}
                loss_metrics = distributed.mean_over_ranks(local, weight=float(batch.completion_mask.sum()))
                for extreme, pick in (("clip_ratio/low_min", min), ("clip_ratio/high_max", max)):
                    if extreme in local:  # TRL's min/max over processes of their clip ratios
                        loss_metrics[extreme] = pick(distributed.gather(local[extreme]))
                for k, v in {**loss_metrics, **self._buffer_info["metrics"]}.items():
                    per_batch[k].append(float("nan") if v is None else float(v))
        loss_total = distributed.mean_over_ranks({"loss": loss_total})["loss"]  # ranks' gradients are averaged
        if self.entropy_control.enabled:  # TRL: the coefficient for the next step, logged at the step's end
            self.entropy_control.end_step(*map(distributed.sum_over_ranks, self.entropy_control.window))
            per_batch["entropy_coef"].append(self.entropy_control.coef)
        tokens = int(distributed.sum_over_ranks(tokens))
        learning_rate = self.lr_scheduler.get_last_lr()[0]  # the rate this update uses
        with self._times.phase("optimizer"):  # gradient averaging and clipping included
            grad_norm = self._clip_and_step()
        step_time = time.perf_counter() - t0
        return {"loss": loss_total, **{k: _nanmean(v) for k, v in per_batch.items()},
                "grad_norm": float(grad_norm), "learning_rate": learning_rate, "step_time": step_time,
                "tokens_per_second": tokens / step_time, "peak_memory_mb": _peak_memory_mb(self.device),
                **self._times.metrics()}

    def _clip_and_step(self) -> torch.Tensor:
        """Average the ranks' gradients, clip them (refusing non-finite ones), step AdamW and the schedule; returns
        the gradient norm before clipping."""
        args = self.args
        params = [p for p in self.model.parameters() if p.requires_grad]
        distributed.average_gradients(self.model, params, args.gradient_bucket_bytes)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm if args.max_grad_norm > 0 else math.inf)
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm  # sharded: a DTensor
        if not math.isfinite(float(grad_norm)):  # the one host read of the gradients, needed for the log anyway
            bad = _first_non_finite(self.model, "grad")
            raise FloatingPointError(f"step {self.state.global_step + 1}: the gradient of {bad} is not finite; "
                                     "stopped before the optimizer step")
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    def _next_micro_batch(self) -> RolloutBatch:
        args = self.args
        generate_every = args.steps_per_generation * args.num_iterations
        if self.state.micro_step % generate_every == 0 or self._buffer is None:
            batch, self._buffer_info = self._generate_and_score()
            self._buffer = batch.split(args.steps_per_generation)
        micro_batch = self._buffer[self.state.micro_step % args.steps_per_generation]
        self.state.micro_step += 1
        return micro_batch

    def _step_micro_batches(self):
        """(micro-batch, the factor on its loss) for one optimizer step: gradient_accumulation_steps micro-batches
        of per_device_train_batch_size sequences (TRL's), or, with max_tokens_per_micro_batch, the same sequences
        regrouped into micro-batches of at most that many tokens (LossSpec.token_budget_scale keeps the step's
        loss independent of the grouping; ranks with fewer split theirs to run as many as the rank with most)."""
        args, spec = self.args, self.loss_spec
        if args.max_tokens_per_micro_batch is None:
            for _ in range(args.gradient_accumulation_steps):
                yield self._next_micro_batch(), spec.micro_batch_scale, spec.micro_batch_entropy_scale
            return
        window = RolloutBatch.cat([self._next_micro_batch() for _ in range(args.gradient_accumulation_steps)])
        lengths = (window.prompt_mask.sum(1) + window.completion_attention.sum(1)).tolist()
        totals = (len(window), float(window.completion_mask.sum()))
        bins = token_budget_bins(lengths, args.max_tokens_per_micro_batch)
        for index in split_bins(bins, max(distributed.gather(len(bins)))):  # every rank as many micro-batches
            mb = window.select(torch.tensor(index))
            micro = (len(mb), float(mb.completion_mask.sum()))
            yield mb, spec.token_budget_scale(micro, totals), spec.token_budget_entropy_scale(micro, totals)

    def _micro_batch_loss(self, mb: RolloutBatch, spec: LossSpec | None = None, loss_tokens: float | None = None,
                          scale: float | None = None, entropy_scale: float | None = None) -> tuple[torch.Tensor, dict]:
        """The GRPO loss of one micro-batch times `scale`, its entropy bonus times `entropy_scale` (by default the
        run's spec, the current generation batch's token count and TRL's gradient-accumulation factors; evaluation
        passes its own spec and count, token-budget micro-batches their own factors). In training the bonus's
        entropy feeds the adaptive controller."""
        spec = spec or self.loss_spec
        loss_tokens = self._buffer_info["loss_tokens"] if loss_tokens is None else loss_tokens
        scale = spec.micro_batch_scale if scale is None else scale
        entropy_scale = spec.micro_batch_entropy_scale if entropy_scale is None else entropy_scale
        with activations_offloaded(self.args.gradient_checkpointing_offload, self.device), self._times.phase("forward"):
            hidden, rows = self._decode(self.model, mb)  # padded [b, T, H] or packed [N, H]
        # fetched after the forward: a sharded root holds its whole lm_head from its forward to its backward;
        # the loss keeps its tensors on the device
        hidden, weight, bias = self._head_inputs(hidden, lm_head(self.model))
        inputs = rows.loss_inputs()
        loss_kwargs = spec.loss_kwargs(loss_tokens, self.entropy_control.applied_coef(), scale, entropy_scale)
        with self._times.phase("loss"):  # the fused loss; with the loss last, its gradient sweep runs here too
            loss, metrics = self._loss_fn(hidden, weight, inputs.pop("targets"), inputs.pop("mask"),
                                          inputs.pop("advantages"), bias=bias, logit_transform=self.logit_transform,
                                          **inputs, **loss_kwargs)
        bonus = [metrics.pop(f"entropy_bonus/{k}", None) for k in ("entropy", "tokens")]  # not logged (TRL)
        if bonus[1] is not None and self.model.training:
            self.entropy_control.observe(float(bonus[0]) * float(bonus[1]), float(bonus[1]))
        for extreme, mean in (("low_min", "low_mean"), ("high_max", "high_mean")):  # TRL's min/max over processes
            if f"clip_ratio/{mean}" in metrics:  # of the clip ratios: this process's here, over ranks in the step
                metrics[f"clip_ratio/{extreme}"] = metrics[f"clip_ratio/{mean}"]
        return loss * scale, metrics

    def _decode(self, model, mb: RolloutBatch):
        """(final hidden states, the batch in their layout): packed rows [N, H] and mb's PackedBatch with
        padding_free, else padded [b, T, H] and mb itself."""
        with self._autocast():
            if self.args.padding_free:
                packed = PackedBatch.from_rollout(mb)
                return packed_completion_hidden(model, packed), packed
            ids, attention = mb.input_ids()
            return completion_hidden(model, ids, attention, mb.prompt_ids.shape[1]), mb

    # ------------------------------------------------------------------ one generation batch
    def _generate_and_score(self, rows: list[dict] | None = None, num_generations: int | None = None,
                            draw: int | None = None) -> tuple[RolloutBatch, dict]:
        """Prompts -> completions -> rewards -> advantages -> (old, reference) logprobs, as one RolloutBatch.
        Training draws the prompts from the sampler; evaluation passes its `rows`, num_generations_eval and its
        random-stream `draw`, and gets the whole batch on every rank and no old logprobs (nothing is updated, so
        the policy is its own old policy)."""
        args, G, training = self.args, num_generations or self.args.num_generations, rows is None
        # each backend wakes what it needs itself: the weights for the push, then the KV cache to generate; one
        # push per generation batch (dynamic sampling's further draws use the same, unchanged weights)
        with self._times.phase("weight_push"):
            self.generator.push_weights(self.model)
        if rows is not None:
            scored, sampling_metrics = self._sample_and_score(rows, G, draw), {}
        elif args.dynamic_sampling:  # DAPO: only groups whose rewards differ, sampling more prompts until full
            scored, sampling_metrics = fill_generation_batch(self._sample_and_score, args.prompts_per_generation, G,
                                                             args.dynamic_sampling_max_attempts)
        else:
            scored, sampling_metrics = self._sample_and_score(), {}
        self.generator.sleep()  # after the last draw: a level-2 sleep discards the pushed weights
        prompt_ids, rollout, rewards_per_func, rewards = (scored.prompt_ids, scored.rollout, scored.rewards_per_func,
                                                           scored.rewards)
        advantages, reward_std = aggregate_advantages(rewards_per_func.to(self.device), self.reward_weights, G,
                                                      args.multi_objective_aggregation, args.scale_rewards)  # [B]
        records = self._records(scored, advantages) if args.log_completions else []  # for completions.jsonl

        row_prompts = rollout.prompt_ids or [ids for ids in prompt_ids for _ in range(G)]  # [B] token id lists
        batch = self._to_tensors(row_prompts, rollout, advantages)
        if training:  # TRL's count, once per generation batch: prompt tokens and the model's completion tokens
            self.state.num_input_tokens_seen += sum(map(len, row_prompts)) + sum(rollout.model_lengths())
        loss_tokens = float(batch.completion_mask.sum())  # the whole batch's: the spec's num_items_in_batch
        sampler_logprobs = None if rollout.logprobs is None else self._padded(rollout.logprobs, batch)  # [B, T]
        if training:
            own = self._rows_to_train(len(batch))  # this rank's rows, shuffled: [B / world_size]
            batch = batch.select(own)
            sampler_logprobs = None if sampler_logprobs is None else sampler_logprobs[own]
        with torch.no_grad():
            if training and args.needs_old_logprobs():
                with self._times.phase("old_logprobs"):
                    batch.old_logprobs = self._completion_logprobs(self.model, batch)  # [B, T]
            if training and args.use_vllm and args.vllm_importance_sampling_correction:
                if sampler_logprobs is None:
                    raise ValueError("vllm_importance_sampling_correction=True needs the generator's sampling "
                                     "logprobs")
                batch.is_ratio = sampling_ratio(batch.old_logprobs, sampler_logprobs,
                                                batch.completion_mask, args.vllm_importance_sampling_mode,
                                                args.vllm_importance_sampling_clip_min,
                                                args.vllm_importance_sampling_clip_max)
            if args.beta != 0.0:
                with self._times.phase("ref_logprobs"):
                    batch.ref_logprobs = self._reference_logprobs(batch)  # [B, T]
        if args.off_policy_mask_threshold is not None and args.use_vllm:  # TRL measures vLLM's, else the old ones
            batch.sampling_logprobs = sampler_logprobs
        metrics = {**self._generation_metrics(rewards_per_func, rewards, reward_std, rollout), **sampling_metrics}
        if batch.old_logprobs is not None and sampler_logprobs is not None:
            # a push that did not land (stale generator weights) shows up here at once
            diff = logprob_abs_diff(sampler_logprobs, batch.old_logprobs, batch.completion_mask)  # model tokens
            metrics.update(distributed.mean_over_ranks({"rollout/logprob_abs_diff": diff},
                                                       weight=float(batch.completion_mask.sum())))
        return batch, {"loss_tokens": loss_tokens, "metrics": metrics, "completions": records}

    def _sample_and_score(self, rows: list[dict] | None = None, num_generations: int | None = None,
                          draw: int | None = None) -> ScoredGroups:
        """P prompts (from the sampler unless given, with their random-stream `draw`) -> G completions each ->
        rewards (weighted nansum; None = NaN, excluded)."""
        args, G = self.args, num_generations or self.args.num_generations
        if rows is None:
            rows = self.sampler.next_rows(self.train_dataset)  # P prompts, the same on every rank
            draw = self.sampler.draws
        # this rank's completions: rows `mine` of the B = P × G (grouped by prompt; a group may span ranks),
        # each from its own random stream. Ranks that share one vLLM engine (vllm_tensor_parallel_size) all submit
        # their group's rows `shared`, then keep theirs. A share may be empty (a small last eval batch): it samples
        # row 0 and drops it, since the sampler's forwards are collectives (FSDP2) and its loop stops on all ranks.
        world, rank, engine_ranks = self.launch.world_size, self.launch.rank, self._ranks_per_engine()
        mine = distributed.rank_slice(len(rows) * G, rank, world)
        shared = distributed.rank_slice(len(rows) * G, rank // engine_ranks, world // engine_ranks)
        if shared.stop == shared.start:
            shared = slice(0, 1)  # sampled, then dropped: mine is empty
        keys = stream_keys(args.seed, draw, torch.arange(len(rows) * G)[shared])  # [B·tp / world]
        sampling = replace(self._sampling(), stream_keys=keys.tolist())
        with self._autocast(), self._times.phase("generation"):
            hooked = self._rollout(rows, G, mine, shared, sampling)
        rollout = hooked.rollout

        # rewards, one per completion
        texts = self.tokenizer.batch_decode(rollout.completion_ids, skip_special_tokens=True)
        completions = hooked.completions if hooked.completions is not None else \
            completions_for_rewards(hooked.prompts, texts)
        columns = {k: [r[k] for r in rows for _ in range(G)][mine] for k in rows[0]
                   if k not in ("prompt", "completion", "completion_ids")}
        extras = {"trainer_state": self.state, "log_metric": self._log_metric, "log_extra": self._log_extra}
        if hooked.prompts:
            with self._times.phase("rewards"):
                rewards_per_func = score(self.reward_funcs, self.reward_func_names, hooked.prompts, completions,
                                         rollout.completion_ids, {**columns, **hooked.columns},
                                         {**extras, **hooked.extras})
            self._reward_watch.check(rewards_per_func)
        else:  # this rank sampled nothing: reward functions are not called with empty lists
            rewards_per_func = torch.empty(0, len(self.reward_funcs))
        rewards = combine(rewards_per_func, self.reward_weights)  # [b], NaN = unscorable (row by row)
        shown = (hooked.prompts, completions) if args.log_completions else ([], [])  # for completions.jsonl
        scored = self._gather_scored(ScoredGroups([], [], rollout, rewards_per_func, rewards,
                                                  self._pending_columns(len(hooked.prompts)), *shown))
        prompt_ids = scored.rollout.prompt_ids[::G] if scored.rollout.prompt_ids else hooked.prompt_ids
        return scored._replace(rows=rows, prompt_ids=prompt_ids)  # every rank: all B rows

    def _rollout(self, rows: list[dict], G: int, mine: slice, shared: slice, sampling: SamplingConfig) -> HookedRollout:
        """This rank's rows `mine` of P prompts × G completions: one generate() call of the rows `shared` with the
        ranks of its engine (sampling's stream keys are theirs), or the rollout hooks (an engine per rank)."""
        prompts = [r.get("prompt", EMPTY_PROMPT) for r in rows for _ in range(G)][mine]  # (prompt_optional)
        if self.hooks is not None:
            keys = sampling.stream_keys

            def generate(ids: list[list[int]], batch_rows: list[int], turn: int):  # turn t of rows `batch_rows`
                if not ids:  # no row of this rank's, some of another's: the sampling is collective, take part
                    self.generator.generate([[self.tokenizer.pad_token_id]], 1, replace(sampling, stream_keys=[0]))
                    return Rollout([], [], [])
                k = None if keys is None else turn_keys(torch.tensor(keys)[batch_rows], turn).tolist()
                return self.generator.generate(ids, 1, replace(sampling, stream_keys=k))

            # the context a tool result must leave room in (TRL: vLLM's max_model_len, else the model's)
            max_len = (self.args.use_vllm and self.args.vllm_max_model_len) or \
                getattr(getattr(self.model, "config", None), "max_position_embeddings", None) or sys.maxsize
            return self.hooks.run(self, prompts, [r for r in rows for _ in range(G)][mine], generate,
                                  set(self._eos_ids()) | {self.tokenizer.pad_token_id}, max_len)
        prompt_ids = tokenize_prompts(self.processing_class, [r["prompt"] for r in rows], self.args.max_prompt_length,
                                      self.args.chat_template_kwargs)
        if self.launch.world_size == 1:
            rollout = self.generator.generate(prompt_ids, G, sampling)
        else:
            rollout = self.generator.generate([p for p in prompt_ids for _ in range(G)][shared], 1, sampling)
            rollout = rollout.select(list(range(mine.start - shared.start, mine.stop - shared.start)))
        return HookedRollout(prompts, rollout, None, {}, {}, prompt_ids)

    def _gather_scored(self, mine: ScoredGroups) -> ScoredGroups:
        """Every rank's scored completions -> the whole batch's, in row order (rows and prompts are the caller's:
        every rank has them); the reward functions' log_metric values of every rank are pooled."""
        parts = distributed.gather((mine, dict(self._extra_metrics)))
        if len(parts) == 1:
            return mine
        self._extra_metrics = defaultdict(list)
        for _, metrics in parts:
            for k, v in metrics.items():
                self._extra_metrics[k].extend(v)
        return concat_groups([p for p, _ in parts])

    def _rows_to_train(self, n: int) -> torch.Tensor:
        """This rank's rows of the n-row generation batch, in training order: a shuffle (TRL shuffles before
        splitting) seeded by (seed, draw), so every rank and world size cuts the same global micro-batches."""
        order = torch.randperm(n, generator=torch.Generator().manual_seed(
            hash((self.args.seed, self.sampler.draws)) % 2**63))
        return distributed.micro_batch_rows(order, self.args.steps_per_generation, self.launch.world_size,
                                            self.launch.rank)

    def _records(self, scored: ScoredGroups, advantages: torch.Tensor) -> list[dict]:
        """One row per completion of TRL's completions table: prompt, completion (as the reward functions saw
        them: an environment's observation appended, a tool rollout's messages), one column per reward function,
        advantage, then the columns reward functions added (log_extra)."""
        rewards, advantages = scored.rewards_per_func.tolist(), advantages.tolist()  # [B, F], [B]
        return [{"prompt": p, "completion": c, **dict(zip(self.reward_func_names, rewards[i])),
                 "advantage": advantages[i], **{k: v[i] for k, v in scored.extra.items()}}
                for i, (p, c) in enumerate(zip(scored.prompts, scored.completions))]

    def _to_tensors(self, prompt_ids: list[list[int]], rollout, advantages: torch.Tensor) -> RolloutBatch:
        pad = self.tokenizer.pad_token_id
        p_width = max(len(x) for x in prompt_ids)
        t_width = max(1, max(len(x) for x in rollout.completion_ids))
        prompt = torch.full((len(prompt_ids), p_width), pad, dtype=torch.long)  # [B, P] left-padded
        prompt_mask = torch.zeros_like(prompt)
        completion = torch.full((len(prompt_ids), t_width), pad, dtype=torch.long)  # [B, T] right-padded
        attention = torch.zeros_like(completion)
        for i, (p, c) in enumerate(zip(prompt_ids, rollout.completion_ids)):
            prompt[i, p_width - len(p):], prompt_mask[i, p_width - len(p):] = torch.tensor(p), 1
            if c:
                completion[i, :len(c)], attention[i, :len(c)] = torch.tensor(c), 1
        loss_mask = attention.clone()
        for i, m in enumerate(rollout.tool_mask or []):  # tool and environment tokens: attended to, not trained
            loss_mask[i, :len(m)] *= torch.tensor(m, dtype=loss_mask.dtype)
        if self.args.mask_truncated_completions:
            loss_mask[torch.tensor(rollout.truncated, dtype=torch.bool)] = 0
        d = self.device
        return RolloutBatch(prompt.to(d), prompt_mask.to(d), completion.to(d), attention.to(d), loss_mask.to(d),
                            advantages.float().to(d))

    def _completion_logprobs(self, model, batch: RolloutBatch) -> torch.Tensor:
        """Per-token logprobs [B, T] of the completions under `model`, one micro-batch at a time, no logits."""
        out = []
        for mb in batch.split(max(1, len(batch) // self.args.per_device_train_batch_size)):
            hidden, rows = self._decode(model, mb)
            hidden, weight, bias = self._head_inputs(hidden, lm_head(model))
            logp = self._logprob_fn(hidden, weight, rows.loss_inputs()["targets"], bias=bias,
                                    temperature=self.args.temperature, logit_transform=self.logit_transform)
            out.append(logp if rows is mb else rows.to_padded(logp, mb.completion_ids.shape))  # [b, T]
        distributed.reshard(model)
        return torch.cat(out).float()

    def _reference_logprobs(self, batch: RolloutBatch) -> torch.Tensor:
        """[B, T] under the reference: the PEFT policy with its adapter disabled, else the frozen copy (brought
        to the device for this pass only with ref_model_offload)."""
        if self.ref_model is None:
            with self.model.disable_adapter():
                return self._completion_logprobs(self.model, batch)
        with reference_on(self.ref_model, self.device, self.args.ref_model_offload):
            return self._completion_logprobs(self.ref_model, batch)

    # ------------------------------------------------------------------ evaluation (fastrl.evaluation)
    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """Generation, rewards and the loss on the eval set(s), no update (transformers' signature; a str picks
        one set of a dict). The metrics go to log_history, metrics.jsonl and the dashboards."""
        if isinstance(eval_dataset, str):
            if not isinstance(self.eval_dataset, dict) or eval_dataset not in self.eval_dataset:
                raise ValueError(f"eval_dataset: no eval set named {eval_dataset!r}")
            eval_dataset, metric_key_prefix = self.eval_dataset[eval_dataset], f"{metric_key_prefix}_{eval_dataset}"
        eval_dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        if eval_dataset is None:
            raise ValueError("Trainer: evaluation requires an eval_dataset.")
        check_eval_dataset(eval_dataset, self.prompt_optional)
        metrics = {}
        for prefix, dataset in named_sets(eval_dataset, metric_key_prefix).items():
            found = {**evaluate_set(self, dataset, prefix), f"{prefix}_num_tokens": self.state.num_input_tokens_seen,
                     "epoch": self.state.epoch}
            entry = {**found, "step": self.state.global_step}
            self.state.log_history.append(entry)
            if self._logger is not None:
                self._logger.evaluation(self.state.global_step, found)
            elif self.state.is_world_process_zero:  # outside train(): rank 0 alone writes, as in training
                append_jsonl(f"{self.args.output_dir}/metrics.jsonl", {"step": self.state.global_step, **found})
            self._callback("on_log", logs=entry)
            metrics.update(found)
        self.control.should_evaluate = False
        self._callback("on_evaluate", metrics=metrics)
        return metrics

    # ------------------------------------------------------------------ helpers of the loop
    def _ranks_per_engine(self) -> int:
        """How many ranks share one generator: a vLLM tensor-parallel group, else each rank has its own."""
        return self.args.vllm_tensor_parallel_size if self.args.use_vllm else 1

    def _sampling(self) -> SamplingConfig:
        a = self.args
        return SamplingConfig(max_completion_length=a.max_completion_length, temperature=a.temperature,
                              top_p=a.top_p, top_k=a.top_k or 0, min_p=a.min_p or 0.0,
                              repetition_penalty=a.repetition_penalty, seed=a.seed,
                              generation_kwargs=a.generation_kwargs)

    def _head_inputs(self, hidden: torch.Tensor, head) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(hidden, weight, bias) for the vocabulary sweep: the head in the hidden states' dtype (under bf16
        autocast the hidden states are bf16), or everything in fp32 with cast_lm_head_to_fp32 (TRL's fp32 head:
        the sweep's matmuls then read fp32 operands; the hidden states are cast as TRL casts them)."""
        weight, bias = head
        dtype = torch.float32 if self.args.cast_lm_head_to_fp32 else hidden.dtype
        bias = bias.to(dtype) if bias is not None else None
        return hidden.to(dtype), weight.to(dtype), bias

    def _autocast(self):
        if not self.args.bf16:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)

    def _padded(self, rows: list[list[float]], batch: RolloutBatch) -> torch.Tensor:
        out = torch.zeros(batch.completion_ids.shape, dtype=torch.float32)
        for i, r in enumerate(rows):
            out[i, :len(r)] = torch.tensor([math.nan if x is None else x for x in r], dtype=torch.float32)
        return out.to(self.device)

    def _generation_metrics(self, rewards_per_func, rewards, reward_std, rollout) -> dict:
        lengths = torch.tensor(rollout.model_lengths(), dtype=torch.float32)
        truncated = torch.tensor(rollout.truncated, dtype=torch.bool)
        terminated = lengths[~truncated]
        m = {"completions/mean_length": lengths.mean().item(), "completions/min_length": lengths.min().item(),
             "completions/max_length": lengths.max().item(),
             "completions/clipped_ratio": truncated.float().mean().item(),
             "completions/mean_terminated_length": terminated.mean().item() if len(terminated) else 0.0,
             "completions/min_terminated_length": terminated.min().item() if len(terminated) else 0.0,
             "completions/max_terminated_length": terminated.max().item() if len(terminated) else 0.0}
        for i, name in enumerate(self.reward_func_names):
            m[f"rewards/{name}/mean"] = torch.nanmean(rewards_per_func[:, i]).item()
            m[f"rewards/{name}/std"] = _nanstd(rewards_per_func[:, i]).item()
        m["reward"] = torch.nanmean(rewards).item()
        m["reward_std"] = _nanstd(rewards).item()
        # TRL's: the share of completions whose advantage scaling std (group or batch, per aggregation) is 0
        m["frac_reward_zero_std"] = torch.isclose(reward_std, torch.zeros_like(reward_std)).float().mean().item()
        m.update(self._pending_metrics())
        return m

    def _log_metric(self, name: str, value: float) -> None:
        """Given to reward functions (TRL's `log_metric`): extra scalars, averaged into this batch's metrics."""
        self._extra_metrics[name].append(float(value))

    def _log_extra(self, column: str, values: list) -> None:
        """Given to reward functions (TRL's `log_extra`): a column of the completions table, one value per
        completion of the batch being scored."""
        self._extra_columns[column].extend(values)

    def _pending_columns(self, num_rows: int) -> dict[str, list]:
        extra, self._extra_columns = self._extra_columns, defaultdict(list)
        for column, values in extra.items():
            if len(values) != num_rows:
                raise ValueError(f"log_extra: column {column!r} got {len(values)} values for {num_rows} completions "
                                 "(one per completion of the batch being scored)")
        return dict(extra)

    def _pending_metrics(self) -> dict:
        extra, self._extra_metrics = self._extra_metrics, defaultdict(list)
        return {k: sum(v) / len(v) for k, v in extra.items()}

    # ------------------------------------------------------------------ logging and checkpoints
    def _log_step(self, metrics: dict, logger: MetricsLogger) -> None:
        step = self.state.global_step
        logger.step(step, metrics)
        self._window.append(metrics)
        every = self._every(self.args.logging_steps)
        last = step == self.state.max_steps or self.control.should_training_stop
        due = step % every == 0 or last or (step == 1 and self.args.logging_first_step)
        if (due and self.args.logging_strategy == "steps") or self.control.should_log:
            keys = dict.fromkeys(k for m in self._window for k in m)
            averaged = {k: _nanmean([m[k] for m in self._window if k in m]) for k in keys}
            averaged["num_tokens"] = float(self.state.num_input_tokens_seen)  # TRL's: the running total
            entry = {**averaged, "step": step, "epoch": self.state.epoch}
            self.state.log_history.append(entry)
            logger.window(step, averaged)
            if self.args.log_completions:  # the generation batch this step trained on (TRL logs the latest)
                a = self.args
                logger.completions(step, self._buffer_info.get("completions", []), a.num_completions_to_print,
                                   a.log_unique_prompts)
            self._window = []
            self.control.should_log = False
            self._callback("on_log", logs=entry)

    def _should_save(self) -> bool:
        a = self.args
        if a.save_strategy != "steps":
            return False
        step = self.state.global_step
        return step % self._every(a.save_steps) == 0 or step == self.state.max_steps

    def _every(self, value: float) -> int:
        """An interval in steps; values below 1 are a ratio of max_steps (TrainingArguments' rule)."""
        return max(1, math.ceil(value * self.state.max_steps) if value < 1 else int(value))

    def _save_checkpoint(self) -> str | None:
        """Sharded (fsdp): every rank writes its shards (fastrl.sharded_checkpoint). Replicated: rank 0 writes (the
        replicas hold equal weights and optimizer states), the others wait for it. With several processes each
        holds its own slice of the generation batch, so none is saved: such a checkpoint resumes only where a new
        generation batch starts (_load_checkpoint refuses the others)."""
        bad = _first_non_finite(self.model, "data")  # every rank (sharded: each checks its own shards)
        if bad is not None:
            raise FloatingPointError(f"step {self.state.global_step}: weight {bad} is not finite; not saved")
        state = {**asdict(self.state), "sampler": self.sampler.state_dict(), "window": self._window,
                 "entropy_control": self.entropy_control.state_dict()}
        if distributed.is_sharded(self.model):
            return save_sharded_checkpoint(self.args.output_dir, self.state.global_step, model=self.model,
                                           tokenizer=self.processing_class, optimizer=self.optimizer,
                                           scheduler=self.lr_scheduler, trainer_state=state,
                                           save_total_limit=self.args.save_total_limit, rank=self.launch.rank)
        if not self.state.is_world_process_zero:
            distributed.barrier()
            return None
        buffer = None
        if self._buffer is not None and self.launch.world_size == 1:
            buffer = {"micro_batches": [b.state_dict() for b in self._buffer], "info": self._buffer_info}
        path = save_checkpoint(self.args.output_dir, self.state.global_step, model=self.model,
                               tokenizer=self.processing_class, optimizer=self.optimizer,
                               scheduler=self.lr_scheduler, trainer_state=state, rollout_buffer=buffer,
                               save_total_limit=self.args.save_total_limit,
                               extra_files={REFERENCE_FILE: reference_state(self.ref_model)}
                               if self.args.sync_ref_model else None)
        distributed.barrier()
        return path

    def _load_checkpoint(self, path: str) -> None:
        if is_sharded_checkpoint(path):  # resharded by DCP to this run's placement (one process included)
            state, buffer = load_sharded_checkpoint(path, model=self.model, optimizer=self.optimizer,
                                                    scheduler=self.lr_scheduler, rank=self.launch.rank), None
        else:  # one process's (or rank 0's) whole tensors; cut into this rank's shards under fsdp
            restore = restore_into_shards if distributed.is_sharded(self.model) else copy_into
            state, buffer = load_checkpoint(path, model=self.model, optimizer=self.optimizer,
                                            scheduler=self.lr_scheduler, restore=restore)
        self.sampler.load_state_dict(state.pop("sampler"))
        if self.args.sync_ref_model:
            restore_reference(path, self.ref_model)
        self._window = state.pop("window")
        self.entropy_control.load_state_dict(state.pop("entropy_control", None))
        state["max_steps"] = self.state.max_steps  # this run's setting: a resumed run may train longer
        state.update(is_local_process_zero=self.state.is_local_process_zero,
                     is_world_process_zero=self.state.is_world_process_zero)  # this run's launch
        generate_every = self.args.steps_per_generation * self.args.num_iterations
        if state["micro_step"] % generate_every and (buffer is None or self.launch.world_size > 1):
            raise ValueError(f"resume_from_checkpoint: {path!r} was taken inside a generation batch; with several "
                             "processes (when saving or resuming) resume from a checkpoint where a batch starts")
        self.state = TrainerState(**state)
        if buffer is not None and self.launch.world_size == 1:
            self._buffer = [self._on_device(RolloutBatch.from_state_dict(b)) for b in buffer["micro_batches"]]
            self._buffer_info = buffer["info"]

    def _on_device(self, batch: RolloutBatch) -> RolloutBatch:
        state = {k: (v.to(self.device) if isinstance(v, torch.Tensor) else v) for k, v in batch.state_dict().items()}
        return RolloutBatch.from_state_dict(state)

    def save_model(self, output_dir: str | None = None) -> None:
        """The policy (or its PEFT adapter) and tokenizer, loadable with transformers' from_pretrained."""
        output_dir = output_dir or self.args.output_dir
        # replicas are equal: rank 0 writes for all; shards are gathered into rank 0's memory first
        state_dict = distributed.full_state_dict(self.model) if distributed.is_sharded(self.model) else None
        if self.state.is_world_process_zero:
            self.model.save_pretrained(output_dir, state_dict=state_dict)
            self.processing_class.save_pretrained(output_dir)
        distributed.barrier()

    # ------------------------------------------------------------------ set-up
    def _reward_weights(self) -> torch.Tensor:
        w = self.args.reward_weights
        check_reward_weights(w, self.reward_funcs)
        if w is None:
            return torch.ones(len(self.reward_funcs))
        return torch.tensor(w, dtype=torch.float32)

    def _total_steps(self) -> int:
        a = self.args
        if a.max_steps > 0:
            return a.max_steps
        micro_per_epoch = self.sampler.batches_per_epoch * a.steps_per_generation * a.num_iterations
        return max(1, math.ceil(a.num_train_epochs * micro_per_epoch / a.gradient_accumulation_steps))

    def _build_optimizer(self) -> torch.optim.Optimizer:
        a = self.args
        params = [p for p in self.model.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": a.weight_decay},  # no decay on
                  {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]  # biases and norm scales
        # adamw_torch_fused (the default) is fused on every device torch has the kernel for, CPU included, as
        # transformers does for TRL: at 494M fp32 parameters on a 2-core CPU a step took ~0.95 s fused against ~6 s
        # foreach (measured side by side); adamw_torch keeps torch's default (foreach)
        fused = a.optim == "adamw_torch_fused" and self.device.type in _get_fused_kernels_supported_devices()
        return torch.optim.AdamW([g for g in groups if g["params"]], lr=a.learning_rate,
                                 betas=(a.adam_beta1, a.adam_beta2), eps=a.adam_epsilon, fused=fused or None)

    def _build_generator(self):
        a, tok = self.args, self.tokenizer
        if a.use_vllm:
            from fastrl.generation.vllm import VLLMGenerator  # optional: needs vllm installed

            return VLLMGenerator(model=self.model, args=a, tokenizer=tok)
        from fastrl.generation.transformers import TransformersGenerator

        if a.generation_kwargs:  # unknown GenerationConfig keys are refused now, not at the first generation
            transformers_generation_config(a.generation_kwargs, self._sampling())
        return TransformersGenerator(self.model, tok.pad_token_id, self._eos_ids(), a.cache_implementation)

    def _eos_ids(self) -> list[int]:
        """The ids that end a completion: the model's generation config's eos ids and the tokenizer's."""
        tok = self.tokenizer
        eos = self.model.generation_config.eos_token_id if self.model.generation_config else None
        eos_ids = [tok.eos_token_id] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        if tok.eos_token_id is not None and tok.eos_token_id not in eos_ids:
            eos_ids.append(tok.eos_token_id)
        return eos_ids

    def _set_run_settings(self) -> None:
        """The state fields that describe this run's settings (after a resume too: a resumed run may change them)."""
        a, s = self.args, self.state
        s.logging_steps, s.save_steps = self._every(a.logging_steps), self._every(a.save_steps)
        s.eval_steps = self._every(a.eval_steps) if a.eval_steps is not None else s.logging_steps  # transformers
        s.train_batch_size, s.num_train_epochs = a.per_device_train_batch_size, a.num_train_epochs

    # ------------------------------------------------------------------ callbacks (transformers' TrainerCallback)
    def _callback(self, event: str, **kwargs) -> None:
        """transformers' CallbackHandler.call_event: each callback gets (args, state, control, model, ...); one
        that returns a control replaces it. Methods a duck-typed callback lacks are skipped."""
        for cb in self.callbacks:
            fn = getattr(cb, event, None)
            if fn is None:
                continue
            result = fn(self.args, self.state, self.control, model=self.model, processing_class=self.processing_class,
                        optimizer=self.optimizer, lr_scheduler=self.lr_scheduler, train_dataloader=None,
                        eval_dataloader=None, **kwargs)
            if result is not None:
                self.control = result

    def add_callback(self, callback) -> None:
        self.callbacks.append(callback() if isinstance(callback, type) else callback)

    def pop_callback(self, callback):
        """Remove and return the first callback that is `callback` (or an instance of it, given a class)."""
        for cb in self.callbacks:
            if cb is callback or (isinstance(callback, type) and isinstance(cb, callback)):
                self.callbacks.remove(cb)
                return cb
        return None

    def remove_callback(self, callback) -> None:
        self.pop_callback(callback)


def _check_stream_settings(args: GRPOConfig, training_stream: bool) -> None:
    """transformers' and TRL's rules for datasets without a length (IterableDataset)."""
    if training_stream and args.max_steps <= 0:
        raise ValueError(f"max_steps: must be set to a positive value when train_dataset has no length (an "
                         f"IterableDataset), was {args.max_steps}")
    dispatch = args.accelerator_config.get("dispatch_batches") if isinstance(args.accelerator_config, dict) else None
    if dispatch:
        raise ValueError("Iterable datasets require `dispatch_batches=False`, but it is set to `True` in "
                         "`accelerator_config`. Please set it to `False`.")


def _refuse_unsupported_arguments(**arguments) -> None:
    """TRL's GRPOTrainer arguments fastrl does not implement yet: a ValueError naming the one given."""
    for name, value in arguments.items():
        if value is not None:
            raise ValueError(f"{name} is not supported by fastrl ({UNSUPPORTED_ARGUMENTS[name]}); leave it out")


def _warn_like_trl(args: GRPOConfig) -> None:
    """TRL's set-up warnings for settings that run but are probably not what was meant."""
    rule = LOSS_RULES[args.loss_type]  # VESPO sums tokens but has its own warning (it ignores the level)
    token_summed = rule.reduction in (MASK_TOTAL, COMPLETION_BUDGET, ITEMS) and rule.objective != "vespo"
    if args.importance_sampling_level == "sequence" and token_summed:  # the normalizer spans sequences
        log.warning(f"When using `importance_sampling_level='sequence'`, the `'{args.loss_type}'` loss sums per-token "
                    "contributions, which effectively weights each sequence by its completion length instead of "
                    "optimizing the per-sequence objective. To reproduce the GSPO paper's setup, set "
                    "`loss_type='grpo'`.")
    if args.loss_type == "luspo" and args.importance_sampling_level != "sequence":
        log.warning("When using `'luspo'` loss, `importance_sampling_level` should be set to `'sequence'` to mirror "
                    "the paper's setup.")
    if args.loss_type == "vespo" and args.importance_sampling_level != "token":
        log.warning("VESPO computes sequence-level importance weights internally. `importance_sampling_level` should "
                    "be set to `'token'` (the default).")


def _apply_process_settings(args: GRPOConfig) -> None:
    """Process-wide settings TrainingArguments applies too: tf32 sets the fp32 matmul precision (torch's matmuls
    and the Triton kernels' dot, which read it), log_level sets transformers' verbosity."""
    if args.tf32 is not None:
        torch.set_float32_matmul_precision("high" if args.tf32 else "highest")
    if args.log_level != "passive":
        transformers_logging.set_verbosity(logging.getLevelName(args.log_level.upper()))


def _first_non_finite(model: torch.nn.Module, attr: str) -> str | None:
    """The name of the first trainable parameter whose `attr` ("data" or "grad") holds NaN or inf, else None."""
    for name, p in model.named_parameters():
        t = getattr(p, attr)
        if p.requires_grad and t is not None and not bool(torch.isfinite(t).all()):
            return name
    return None


def _nanmean(values: list[float]) -> float | None:
    valid = [v for v in values if v is not None and not math.isnan(v)]
    return sum(valid) / len(valid) if valid else None


def _peak_memory_mb(device: torch.device) -> float:
    """Peak allocated device memory (CUDA), else the process's peak resident set size (Linux reports KiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _nanstd(x: torch.Tensor) -> torch.Tensor:
    """Bessel-corrected std over the non-NaN entries (TRL's nanstd)."""
    valid = x[~torch.isnan(x)]
    return valid.std() if valid.numel() > 1 else torch.tensor(0.0 if valid.numel() else math.nan)
