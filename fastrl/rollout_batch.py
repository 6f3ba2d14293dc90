"""One generation batch as the loss sees it: B = prompts × num_generations completions, as padded tensors."""
from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch


@dataclass
class RolloutBatch:
    prompt_ids: torch.Tensor  # [B, P] left-padded
    prompt_mask: torch.Tensor  # [B, P] 1 = real token
    completion_ids: torch.Tensor  # [B, T] right-padded
    completion_attention: torch.Tensor  # [B, T] 1 = a sampled token (0 = padding)
    completion_mask: torch.Tensor  # [B, T] 1 = a trained token (also 0 for masked truncated completions)
    advantages: torch.Tensor  # [B] float32
    old_logprobs: torch.Tensor | None = None  # [B, T] policy at generation time, when the batch is reused
    ref_logprobs: torch.Tensor | None = None  # [B, T] reference model, when beta > 0
    is_ratio: torch.Tensor | None = None  # [B, T] or [B, 1], vLLM importance-sampling correction

    def __len__(self) -> int:
        return self.completion_ids.shape[0]

    def input_ids(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids [B, P+T], attention mask [B, P+T]): prompt followed by completion."""
        ids = torch.cat([self.prompt_ids, self.completion_ids], dim=1)
        attention = torch.cat([self.prompt_mask, self.completion_attention], dim=1)
        return ids, attention

    def select(self, index) -> "RolloutBatch":
        """Rows `index` (a slice or an index tensor) of every field."""
        return replace(self, **{f.name: getattr(self, f.name)[index] for f in fields(self)
                                if getattr(self, f.name) is not None})

    def split(self, n: int) -> list["RolloutBatch"]:
        """n equal consecutive slices (B must be divisible by n)."""
        size = len(self) // n
        return [self.select(slice(i * size, (i + 1) * size)) for i in range(n)]

    def state_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_state_dict(cls, state: dict) -> "RolloutBatch":
        return cls(**state)
