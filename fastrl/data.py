"""Prompts: loading datasets, checking them, drawing prompt batches in a resumable order, tokenizing them.

Order follows TRL's RepeatSampler: each epoch is a seeded permutation of the dataset (or the identity when
shuffle_dataset is False), cut into batches of prompts_per_generation prompts; an incomplete last batch is dropped.
A `datasets.IterableDataset` (no length) is read as TRL streams it: a buffered shuffle seeded with `seed` (when
shuffle_dataset), reshuffled each epoch through `set_epoch`, restarted when it ends. Either sampler's whole state is
(epoch, position), so a checkpoint resumes the exact order (a stream by re-reading its epoch up to the position).
"""
from __future__ import annotations

import itertools
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
    if os.path.getsize(path) == 0:
        raise ValueError(f"dataset: file {path!r} is empty")
    try:
        ds = datasets.load_dataset(FILE_FORMATS[ext], data_files=path, split="train")
    except Exception as e:  # pyarrow and datasets raise many kinds; the file is what the user must fix
        raise ValueError(f"dataset: could not read {path!r} as {FILE_FORMATS[ext]} ({type(e).__name__}: {e})") \
            from None
    check_dataset(ds)
    return ds


def check_dataset(ds, prompt_optional: bool = False) -> None:
    """prompt_optional: an environment gives the prompt (TRL's rule: a row without one starts from an empty user
    message, which the environment's reset() fills)."""
    if ds is None:
        raise ValueError("train_dataset: a dataset with a 'prompt' column is required")
    columns = getattr(ds, "column_names", None)
    if columns is None and is_stream(ds):  # a generator's stream declares no columns: rows are checked as read
        return
    if columns is None or ("prompt" not in columns and not prompt_optional):
        raise ValueError(f"train_dataset: expected a 'prompt' column, found columns {columns}")
    if not is_stream(ds) and len(ds) == 0:
        raise ValueError("train_dataset: the dataset is empty")
    if "prompt" in columns:
        check_prompts(ds["prompt"])


def check_rows(batch: list[dict], name: str, prompt_optional: bool = False) -> None:
    """Rows read from a stream that declares no columns: each has a 'prompt', unless an environment gives it."""
    missing = [r for r in batch if "prompt" not in r]
    if missing and not prompt_optional:
        raise ValueError(f"{name}: expected a 'prompt' column, got a row {missing[0]}")


def check_prompts(prompts) -> None:
    """Every row's prompt, before training: a non-empty string, or a non-empty list of {"role": str, "content":
    str} messages; all rows of one kind (a batch is tokenized as text or with the chat template, not both)."""
    first_kind = None
    for i, prompt in enumerate(prompts):
        if isinstance(prompt, str):
            kind, ok = "text", bool(prompt)
        elif isinstance(prompt, list):
            kind = "chat"
            ok = bool(prompt) and all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                      and isinstance(m.get("content"), str) for m in prompt)
        else:
            kind, ok = type(prompt).__name__, False
        if not ok:
            raise ValueError(f"train_dataset: row {i}: 'prompt' must be a non-empty string or a list of "
                             f"{{'role': str, 'content': str}} messages, got {prompt!r:.200}")
        first_kind = first_kind or kind
        if kind != first_kind:
            raise ValueError(f"train_dataset: row {i}: a {kind} prompt among {first_kind} prompts (row 0); "
                             "all prompts must be plain text or all chat messages")


def is_stream(ds) -> bool:
    """An iterable dataset without a length (datasets.IterableDataset)."""
    return not hasattr(ds, "__len__") and hasattr(ds, "__iter__")


def make_sampler(ds, batch_size: int, seed: int, shuffle: bool = True, prompt_optional: bool = False):
    if is_stream(ds):
        return StreamSampler(ds, batch_size, seed, shuffle, prompt_optional)
    return PromptSampler(len(ds), batch_size, seed, shuffle)


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

    @property
    def draws(self) -> int:
        """Batches drawn so far, over all epochs: numbers each draw (random streams key on it)."""
        return self.epoch * self.batches_per_epoch + self.position // self.batch_size

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

    def next_rows(self, dataset) -> list[dict]:
        return [dataset[i] for i in self.next_batch()]

    @property
    def epochs_done(self) -> float:
        return self.epoch + self.position / max(1, self.size)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = state["epoch"], state["position"]


class StreamSampler:
    """PromptSampler's interface over an IterableDataset: batches of rows in stream order (see the module doc)."""

    SHUFFLE_BUFFER = 1000  # datasets' default buffer for IterableDataset.shuffle

    def __init__(self, dataset, batch_size: int, seed: int, shuffle: bool = True, prompt_optional: bool = False):
        self.dataset = dataset.shuffle(seed=seed, buffer_size=self.SHUFFLE_BUFFER) if shuffle else dataset
        self.prompt_optional = prompt_optional  # an environment gives the prompt
        self.batch_size, self.epoch, self.position = batch_size, 0, 0
        self._rows = None  # the live iterator, positioned at self.position

    def next_rows(self, dataset=None) -> list[dict]:
        if self._rows is None:
            self._rows = self._open(self.epoch, self.position)
        batch = list(itertools.islice(self._rows, self.batch_size))
        if len(batch) < self.batch_size:  # the stream ended: drop the tail, start the next epoch
            if self.position == 0:
                raise ValueError(f"train_dataset: the stream has {len(batch)} rows, fewer than the {self.batch_size} "
                                 "prompts one generation batch needs (generation_batch_size / num_generations)")
            self.epoch, self.position = self.epoch + 1, 0
            self._rows = self._open(self.epoch, 0)
            return self.next_rows()
        check_rows(batch, "train_dataset", self.prompt_optional)
        self.position += self.batch_size
        return batch

    def _open(self, epoch: int, skip: int):
        self.dataset.set_epoch(epoch)  # reshuffles an upstream buffered shuffle, as TRL's stream does
        return itertools.islice(iter(self.dataset), skip, None)

    @property
    def epochs_done(self) -> float:
        return float(self.epoch)  # a stream's length is unknown

    @property
    def draws(self) -> int:
        """Numbers each draw (random streams key on it): the epoch in the high 32 bits, the batch in the low."""
        return (self.epoch << 32) + self.position // self.batch_size

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position, self._rows = state["epoch"], state["position"], None


def tokenize_prompts(tokenizer, prompts: list, max_prompt_length: int | None, chat_template_kwargs: dict | None = None,
                     tools: list | None = None, chat_template: str | None = None) -> list[list[int]]:
    """Plain text or chat messages (chat template applied, generation prompt added) -> token ids per prompt.
    tools: their schemas rendered into chat prompts (tool calling); chat_template: one replacing the tokenizer's.

    With max_prompt_length set, prompts are cut from the left (the end of a prompt is what the model continues).
    """
    if is_conversational(prompts[0]):
        extra = {k: v for k, v in (("tools", tools), ("chat_template", chat_template)) if v is not None}
        out = tokenizer.apply_chat_template(conversation=prompts, add_generation_prompt=True, tokenize=True,
                                            return_dict=True, **extra, **(chat_template_kwargs or {}))
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
