"""Prompts: loading datasets, checking them, drawing prompt batches in a resumable order, tokenizing them.

Order follows TRL's RepeatSampler: each epoch is a seeded permutation of the dataset (or the identity when
shuffle_dataset is False), cut into batches of prompts_per_generation prompts; an incomplete last batch is dropped.
The sampler's whole state is (epoch, position), so a checkpoint resumes the exact order.
"""
from __future__ import annotations

import os

import torch

FILE_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


def load_prompt_file(path: str):
    """A local jsonl/json/parquet/csv file with a `prompt` column -> datasets.Dataset."""
    import datasets

    ext = os.path.splitext(path)[1].lower()
    if ext not in FILE_FORMATS:
        raise ValueError(f"dataset: {path!r} has an unsupported extension; expected one of {sorted(FILE_FORMATS)}")
    if not os.path.isfile(path):
        raise ValueError(f"dataset: file {path!r} does not exist")
    ds = datasets.load_dataset(FILE_FORMATS[ext], data_files=path, split="train")
    check_dataset(ds)
    return ds


def check_dataset(ds) -> None:
    if ds is None:
        raise ValueError("train_dataset: a dataset with a 'prompt' column is required")
    columns = getattr(ds, "column_names", None)
    if columns is None or "prompt" not in columns:
        raise ValueError(f"train_dataset: expected a 'prompt' column, found columns {columns}")
    if len(ds) == 0:
        raise ValueError("train_dataset: the dataset is empty")


def is_conversational(prompt) -> bool:
    return isinstance(prompt, list) and len(prompt) > 0 and isinstance(prompt[0], dict) and "role" in prompt[0]


class PromptSampler:
    def __init__(self, dataset_size: int, batch_size: int, seed: int, shuffle: bool = True):
        if batch_size > dataset_size:
            raise ValueError(f"train_dataset: {dataset_size} prompts, fewer than the {batch_size} prompts one "
                             "generation batch needs (generation_batch_size / num_generations)")
        self.size, self.batch_size, self.seed, self.shuffle = dataset_size, batch_size, seed, shuffle
        self.epoch, self.position = 0, 0

    @property
    def batches_per_epoch(self) -> int:
        return self.size // self.batch_size

    def _order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.size))
        g = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(self.size, generator=g).tolist()

    def next_batch(self) -> list[int]:
        if self.position + self.batch_size > self.size:  # drop the incomplete tail, start the next epoch
            self.epoch, self.position = self.epoch + 1, 0
        indices = self._order(self.epoch)[self.position: self.position + self.batch_size]
        self.position += self.batch_size
        return indices

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = state["epoch"], state["position"]


def tokenize_prompts(tokenizer, prompts: list, max_prompt_length: int | None,
                     chat_template_kwargs: dict | None = None) -> list[list[int]]:
    """Plain text or chat messages (chat template applied, generation prompt added) -> token ids per prompt.

    With max_prompt_length set, prompts are cut from the left (the end of a prompt is what the model continues).
    """
    if is_conversational(prompts[0]):
        out = tokenizer.apply_chat_template(conversation=prompts, add_generation_prompt=True, tokenize=True,
                                            return_dict=True, **(chat_template_kwargs or {}))
        ids = out["input_ids"]
    else:
        ids = tokenizer(text=list(prompts))["input_ids"]
    ids = [list(map(int, x)) for x in ids]
    if max_prompt_length is not None:
        ids = [x[-max_prompt_length:] for x in ids]
    return ids


def completions_for_rewards(prompts: list, texts: list[str]) -> list:
    """Completion texts as reward functions see them: strings, or assistant messages for chat prompts (TRL)."""
    if not is_conversational(prompts[0]):
        return texts
    out = []
    for prompt, text in zip(prompts, texts):
        prefix = prompt[-1]["content"] if prompt[-1]["role"] == "assistant" else ""  # a pre-filled assistant turn
        out.append([{"role": "assistant", "content": prefix + text}])
    return out
