"""One generation batch as the loss sees it: B = prompts × num_generations completions, as padded tensors
(RolloutBatch, what the trainer keeps) and packed without padding (PackedBatch, what the padding-free decoder and
loss read)."""
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
    sampling_logprobs: torch.Tensor | None = None  # [B, T] vLLM's, for the off-policy mask (NaN = unscored)

    def __len__(self) -> int:
        return self.completion_ids.shape[0]

    def input_ids(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids [B, P+T], attention mask [B, P+T]): prompt followed by completion."""
        ids = torch.cat([self.prompt_ids, self.completion_ids], dim=1)
        attention = torch.cat([self.prompt_mask, self.completion_attention], dim=1)
        return ids, attention

    def loss_inputs(self) -> dict:
        """The loss's per-row arguments (fused_linear_grpo_loss), padded layout [B, T]."""
        return dict(targets=self.completion_ids, mask=self.completion_mask, advantages=self.advantages,
                    old_logprobs=self.old_logprobs, ref_logprobs=self.ref_logprobs, is_ratio=self.is_ratio,
                    sampling_logprobs=self.sampling_logprobs)

    def select(self, index) -> "RolloutBatch":
        """Rows `index` (a slice or an index tensor) of every field."""
        return replace(self, **{f.name: getattr(self, f.name)[index] for f in fields(self)
                                if getattr(self, f.name) is not None})

    @classmethod
    def cat(cls, batches: list["RolloutBatch"]) -> "RolloutBatch":
        """Batches of possibly different widths as one: prompts left-padded, completions right-padded to the
        widest (padding is 0 with mask 0; an optional field is kept only when every batch has it)."""
        p_width = max(b.prompt_ids.shape[1] for b in batches)
        t_width = max(b.completion_ids.shape[1] for b in batches)
        out = {}
        for f in fields(cls):
            parts = [getattr(b, f.name) for b in batches]
            if any(x is None for x in parts):
                out[f.name] = None
            elif f.name.startswith("prompt"):
                out[f.name] = torch.cat([torch.nn.functional.pad(x, (p_width - x.shape[1], 0)) for x in parts])
            elif parts[0].dim() == 2 and not (f.name == "is_ratio" and parts[0].shape[1] == 1):
                out[f.name] = torch.cat([torch.nn.functional.pad(x, (0, t_width - x.shape[1])) for x in parts])
            else:
                out[f.name] = torch.cat(parts)
        return cls(**out)

    def split(self, n: int) -> list["RolloutBatch"]:
        """n equal consecutive slices (B must be divisible by n)."""
        size = len(self) // n
        return [self.select(slice(i * size, (i + 1) * size)) for i in range(n)]

    def state_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_state_dict(cls, state: dict) -> "RolloutBatch":
        return cls(**state)


@dataclass
class PackedBatch:
    """A RolloutBatch without padding: every sequence's prompt and completion tokens back to back, as the decoder
    reads them (position ids restarting at 0 per sequence), and the completion rows the loss sweeps.

    S = Σ (prompt + completion length) tokens; N = Σ completion lengths (the rows of the loss); B sequences.
    """
    input_ids: torch.Tensor  # [S] prompt then completion tokens of each sequence, the sequences concatenated
    position_ids: torch.Tensor  # [S] 0 .. len-1 within each sequence
    cu_seqlens: torch.Tensor  # [B + 1] int32: sequence b is input_ids[cu_seqlens[b]:cu_seqlens[b+1]]
    predict_index: torch.Tensor  # [N] the positions in input_ids whose hidden state predicts each completion row
    cu_rows: torch.Tensor  # [B + 1] int32: completion b's rows are cu_rows[b]:cu_rows[b+1]
    targets: torch.Tensor  # [N] completion token ids
    mask: torch.Tensor  # [N] 1 = a trained row (0 for masked truncated completions)
    advantages: torch.Tensor  # [B] float32
    old_logprobs: torch.Tensor | None  # [N]
    ref_logprobs: torch.Tensor | None  # [N]
    is_ratio: torch.Tensor | None  # [N] or [B, 1]
    sampling_logprobs: torch.Tensor | None  # [N]
    padded_index: torch.Tensor  # [N] where each row sits in the flattened [B, T] completion layout

    @classmethod
    def from_rollout(cls, rb: RolloutBatch) -> "PackedBatch":
        """Pack a RolloutBatch's valid tokens (left-padded prompts, right-padded completions)."""
        ids, attention = rb.input_ids()  # [B, P+T]
        valid = attention.bool()
        width = rb.prompt_ids.shape[1]
        packed_pos = valid.reshape(-1).cumsum(0).reshape(valid.shape) - 1  # [B, P+T] position in input_ids
        rows = rb.completion_attention.bool()  # [B, T] a sampled completion token
        lengths, seq_lengths = rows.sum(1), valid.sum(1)
        prefix = lambda n: torch.cat([n.new_zeros(1), n.cumsum(0)]).to(torch.int32)  # noqa: E731
        isr = rb.is_ratio
        return cls(
            input_ids=ids[valid], position_ids=(attention.cumsum(-1) - 1)[valid], cu_seqlens=prefix(seq_lengths),
            # completion token t of a sequence is predicted by the state at padded column P-1+t
            predict_index=packed_pos[:, width - 1: width - 1 + rows.shape[1]][rows], cu_rows=prefix(lengths),
            targets=rb.completion_ids[rows], mask=rb.completion_mask[rows], advantages=rb.advantages,
            old_logprobs=None if rb.old_logprobs is None else rb.old_logprobs[rows],
            ref_logprobs=None if rb.ref_logprobs is None else rb.ref_logprobs[rows],
            is_ratio=None if isr is None else (isr if isr.shape[1] == 1 else isr[rows]),  # [B, 1] stays
            sampling_logprobs=None if rb.sampling_logprobs is None else rb.sampling_logprobs[rows],
            padded_index=rows.reshape(-1).nonzero().squeeze(1))

    def loss_inputs(self) -> dict:
        """The loss's per-row arguments (fused_linear_grpo_loss), packed layout [N] with cu_seqlens."""
        return dict(targets=self.targets, mask=self.mask, advantages=self.advantages, old_logprobs=self.old_logprobs,
                    ref_logprobs=self.ref_logprobs, is_ratio=self.is_ratio, sampling_logprobs=self.sampling_logprobs,
                    cu_seqlens=self.cu_rows)

    def to_padded(self, rows: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
        """[N] per-row values (e.g. logprobs) -> [B, T] in the RolloutBatch's completion layout, zeros elsewhere."""
        out = rows.new_zeros(shape[0] * shape[1])
        return out.index_copy_(0, self.padded_index, rows).view(shape)


def token_budget_bins(lengths: list[int], budget: int) -> list[list[int]]:
    """Indices of sequences grouped into micro-batches of at most `budget` tokens each: first-fit over the
    sequences sorted longest first (a sequence longer than the budget gets a micro-batch of its own)."""
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        k = next((k for k, r in enumerate(room) if lengths[i] <= r), None)
        if k is None:
            bins.append([i])
            room.append(budget - lengths[i])
        else:
            bins[k].append(i)
            room[k] -= lengths[i]
    return [sorted(b) for b in bins]


def split_bins(bins: list[list[int]], count: int) -> list[list[int]]:
    """`bins` with the one holding most sequences split in halves until there are `count` of them (count at most
    the number of sequences). Ranks run as many token-budget micro-batches as the rank with most (an FSDP forward
    needs every rank); LossSpec.token_budget_scale makes the step's loss independent of the split."""
    bins = [list(b) for b in bins]
    while len(bins) < count:
        k = max(range(len(bins)), key=lambda i: len(bins[i]))
        half = len(bins[k]) // 2
        bins[k:k + 1] = [bins[k][:half], bins[k][half:]]
    return bins
