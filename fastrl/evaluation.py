"""Evaluation as TRL 1.16 runs it: generation and rewards on held-out prompts, and the loss, with no update.

`GRPOTrainer.evaluate()` (and `eval_strategy` / `eval_steps` / `eval_on_start` during training) walks the eval
set in batches of per_device_eval_batch_size × world_size completions (TRL's global eval batch),
num_generations_eval (default num_generations) per prompt, in a seeded order (TRL's RepeatSampler for a `Dataset`;
an `IterableDataset` is read in its own order), the last batch possibly smaller. Each batch is generated and scored
like a training batch (each rank sampling its share, from random streams keyed by the step and the batch, so an
evaluation samples the same at any world size and whenever that step is evaluated again) and its loss computed on
policy (old = current logprobs) without gradients. Every rank computes the loss of the whole eval batch: the eval
metrics are then the global ones on every rank without a further all-reduce, at the cost of each rank running the
batch's forward (eval batches are small next to training's). The result is one dict, as transformers'
`evaluate` returns it: `{prefix}_loss`, `{prefix}_runtime`, `{prefix}_samples_per_second`,
`{prefix}_steps_per_second`, and every training metric of the batches (reward, rewards/<name>/mean, kl, completions/*, ...) averaged over them under the
same prefix. The prefix is "eval", or "eval_<name>" for each set of a dict / DatasetDict of eval sets (TRL
prefixes its own metrics of a named set with plain "eval_"; here a named set keeps all its keys apart).
"""
from __future__ import annotations

import dataclasses
import itertools
import math
import time
from collections import defaultdict
from typing import Iterator

import torch

from fastrl import distributed
from fastrl.data import check_rows, is_stream


def named_sets(eval_dataset, prefix: str) -> dict[str, object]:
    """One eval set, or a dict / DatasetDict of them -> {metric prefix: dataset}."""
    if isinstance(eval_dataset, dict):
        if not eval_dataset:
            raise ValueError("eval_dataset: an empty dict of eval sets")
        return {f"{prefix}_{name}": ds for name, ds in eval_dataset.items()}
    return {prefix: eval_dataset}


def check_eval_dataset(eval_dataset, prompt_optional: bool = False) -> None:
    """prompt_optional: an environment gives the prompt (fastrl.data.check_dataset)."""
    for name, ds in named_sets(eval_dataset, "eval_dataset").items():
        columns = getattr(ds, "column_names", None)
        if columns is None and is_stream(ds):  # a generator's stream declares no columns: rows are checked as read
            continue
        if columns is None or ("prompt" not in columns and not prompt_optional):
            raise ValueError(f"{name}: expected a Dataset or IterableDataset with a 'prompt' column, "
                             f"got {type(ds).__name__} with columns {columns}")


def prompt_batches(dataset, num_prompts: int, seed: int, prompt_optional: bool = False) -> Iterator[list[dict]]:
    """Rows of `dataset`, num_prompts at a time (the last batch may be smaller): a seeded permutation of a
    `Dataset` (as TRL's eval RepeatSampler), an `IterableDataset` in its stream order."""
    if not is_stream(dataset):
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed)).tolist()
        rows: Iterator[dict] = (dataset[i] for i in order)
    else:
        rows = iter(dataset)
    while batch := list(itertools.islice(rows, num_prompts)):
        check_rows(batch, "eval_dataset", prompt_optional)
        yield batch


def evaluate_set(trainer, dataset, prefix: str) -> dict[str, float]:
    """Generation, rewards and the on-policy loss over one eval set -> {prefix}_* metrics."""
    args = trainer.args
    G = args.num_generations_eval or args.num_generations
    completions = args.per_device_eval_batch_size * args.world_size  # TRL's global eval batch
    if completions % G:
        raise ValueError(f"per_device_eval_batch_size ({args.per_device_eval_batch_size}) × world_size "
                         f"({args.world_size}) must be divisible by the number of generations used for evaluation "
                         f"({G}) (num_generations_eval)")
    # one eval batch is one generation batch and one micro-batch, whole on every rank: no accumulation or rank
    # scaling
    spec = dataclasses.replace(trainer.loss_spec, gradient_accumulation_steps=1, steps_per_generation=1, world_size=1)
    started, was_training = time.time(), trainer.model.training
    losses, sizes, per_batch = [], [], defaultdict(list)
    trainer.model.eval()
    try:
        for i, rows in enumerate(prompt_batches(dataset, completions // G, args.seed, trainer.prompt_optional)):
            batch, info = trainer._generate_and_score(rows, G, eval_draw(trainer.state.global_step, i))
            with torch.no_grad():
                loss, loss_metrics = trainer._micro_batch_loss(batch, spec, info["loss_tokens"])
            distributed.reshard(trainer.model)
            losses.append(float(loss))
            sizes.append(len(batch))
            for k, v in {**loss_metrics, **info["metrics"]}.items():
                per_batch[k].append(float(v))
    finally:
        trainer.model.train(was_training)
    if not sizes:
        raise ValueError(f"{prefix}: the eval set is empty")
    runtime, samples = time.time() - started, sum(sizes)
    metrics = {f"{prefix}_loss": sum(x * n for x, n in zip(losses, sizes)) / samples,
               f"{prefix}_runtime": round(runtime, 4),  # transformers' speed_metrics, rounded as it rounds them
               f"{prefix}_samples_per_second": round(samples / max(runtime, 1e-9), 3),
               f"{prefix}_steps_per_second": round(len(sizes) / max(runtime, 1e-9), 3)}
    for k, values in per_batch.items():
        valid = [v for v in values if not math.isnan(v)]
        metrics[f"{prefix}_{k}"] = sum(valid) / len(valid) if valid else None
    return metrics


def eval_draw(step: int, batch: int) -> int:
    """The random-stream draw (fastrl.generation.streams) of eval batch `batch` at optimizer step `step`: negative,
    so apart from training's draws (0, 1, ...), and the same whenever that step is evaluated."""
    return -1 - (step << 24) - batch


def eval_due(args, step: int, every: int, epoch_before: float, epoch_after: float) -> bool:
    """eval_strategy 'steps': every `every` steps; 'epoch': when the epoch count passes a whole number; never
    before eval_delay steps (transformers' rule)."""
    if step < args.eval_delay:
        return False
    if args.eval_strategy == "steps":
        return step % every == 0
    if args.eval_strategy == "epoch":
        return math.floor(epoch_after) > math.floor(epoch_before)
    return False
