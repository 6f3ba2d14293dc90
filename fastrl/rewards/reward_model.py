"""Reward models in `reward_funcs`, as TRL 1.16 uses them: a sequence classifier scores prompt + completion.

A reward model is a model id or folder (loaded with `AutoModelForSequenceClassification.from_pretrained(...,
num_labels=1)`) or a loaded `torch.nn.Module` with a `.config`. Its score for a completion is `logits[:, 0]` of
the text prompt + completion (chat prompts: the chat template of prompt messages + the completion message,
untokenized), tokenized by its own tokenizer (`reward_processing_classes`, else the tokenizer saved with it)
right-padded and without special tokens, as TRL's `_calculate_rewards` does. The model is frozen, in eval mode,
on the training device (in host memory between scoring calls with `ref_model_offload`), and scores the batch
per_device_train_batch_size texts at a time.
"""
from __future__ import annotations

import contextlib
import os

import torch

from fastrl.data import is_conversational


def load_reward_model(name_or_path: str, model_init_kwargs: dict | None = None) -> torch.nn.Module:
    from transformers import AutoModelForSequenceClassification

    from fastrl.rewards import REGISTRY

    unknown = (f"reward_funcs: unknown reward {name_or_path!r}: not 'module:function', not a built-in name "
               f"{sorted(REGISTRY)}, and not a reward model's folder or 'org/name' id")
    if not os.path.isdir(name_or_path) and "/" not in name_or_path:  # a mistyped name: no hub round trip
        raise ValueError(unknown)
    kwargs = {k: v for k, v in (model_init_kwargs or {}).items() if k != "device_map"}
    try:
        return AutoModelForSequenceClassification.from_pretrained(name_or_path, num_labels=1, **kwargs)
    except (OSError, ValueError) as e:
        raise ValueError(f"{unknown} ({e})") from None


def reward_model_name(model: torch.nn.Module) -> str:
    """TRL's name for a reward model: the last part of its model id."""
    return getattr(model.config, "_name_or_path", "").split("/")[-1] or type(model).__name__


class RewardModel:
    """A frozen sequence classifier called as a reward function: f(prompts, completions, **kwargs) -> [float]."""

    def __init__(self, model: torch.nn.Module, tokenizer, device: torch.device, batch_size: int,
                 chat_template_kwargs: dict | None = None, offload: bool = False, bf16: bool = False):
        self.model = model.eval().requires_grad_(False)
        self.tokenizer, self.device, self.batch_size = tokenizer, device, batch_size
        self.chat_template_kwargs, self.offload, self.bf16 = chat_template_kwargs or {}, offload, bf16
        self.__name__ = reward_model_name(model)
        if tokenizer.pad_token_id is None:  # TRL's rule: pad with eos, and tell the model which id is padding
            tokenizer.pad_token = tokenizer.eos_token
        # the classifier pools the last token that is not padding: it must know the padding id
        model.config.get_text_config().pad_token_id = tokenizer.pad_token_id
        self.model.to("cpu" if offload else device)

    def texts(self, prompts: list, completions: list) -> list[str]:
        if is_conversational(prompts[0]):
            return [self.tokenizer.apply_chat_template(p + c, tokenize=False, **self.chat_template_kwargs)
                    for p, c in zip(prompts, completions)]
        return [p + c for p, c in zip(prompts, completions)]

    def __call__(self, prompts: list, completions: list, **kwargs) -> list[float]:
        texts, scores = self.texts(prompts, completions), []
        with torch.inference_mode(), self._on_device(), self._autocast():
            for start in range(0, len(texts), self.batch_size):
                enc = self.tokenizer(text=texts[start:start + self.batch_size], return_tensors="pt", padding=True,
                                     padding_side="right", add_special_tokens=False).to(self.device)
                scores += self.model(**enc).logits[:, 0].float().tolist()  # [b]
        return scores

    @contextlib.contextmanager
    def _on_device(self):
        if not self.offload:
            yield
            return
        self.model.to(self.device)
        try:
            yield
        finally:
            self.model.to("cpu")

    def _autocast(self):
        if not self.bf16:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)


def wrap_reward_models(funcs: list, processing_classes, device: torch.device, args) -> list:
    """Every nn.Module in `funcs` -> a RewardModel with its tokenizer; `processing_classes` is TRL's
    reward_processing_classes (None, one, or one per reward function; ignored for plain functions)."""
    if processing_classes is None:
        processing_classes = [None] * len(funcs)
    elif not isinstance(processing_classes, list):
        processing_classes = [processing_classes]
    if len(processing_classes) != len(funcs):
        raise ValueError(f"The number of reward processing classes ({len(processing_classes)}) must match the number "
                         f"of reward functions ({len(funcs)}).")
    out = []
    for f, tokenizer in zip(funcs, processing_classes):
        if not isinstance(f, torch.nn.Module):
            out.append(f)
            continue
        if tokenizer is None:
            tokenizer = _saved_tokenizer(f)
        out.append(RewardModel(f, tokenizer, device, args.per_device_train_batch_size, args.chat_template_kwargs,
                               offload=args.ref_model_offload, bf16=bool(args.bf16)))
    return out


def _saved_tokenizer(model: torch.nn.Module):
    from transformers import AutoTokenizer

    path = getattr(model.config, "_name_or_path", "")
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ValueError(f"reward_processing_classes: none given for reward model {reward_model_name(model)!r} and "
                         f"no tokenizer could be loaded from {path!r} ({e})") from None
