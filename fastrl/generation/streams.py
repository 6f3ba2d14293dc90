"""Counter-based random streams: a completion's uniforms depend on (seed, draw, row, position) only.

Sampling the same generation batch in one process or split over N ranks must give the same completions, so a
completion's randomness can not come from a generator shared by the rows a process happens to hold. Here each
uniform is a hash of its coordinates instead, as counter-based generators (Philox, Salmon et al. SC'11) do:
key = mix(mix(mix(mix(seed) ^ draw_lo) ^ draw_hi) ^ row), draw_lo/hi the draw number's two 32-bit words, and
u = mix(key ^ mix(position)) / 2³², with mix the murmur3 32-bit finaliser (a bijection of 32-bit integers with
full avalanche). All arithmetic stays below 2⁶³ in int64.
"""
from __future__ import annotations

import torch

MASK32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x · c) mod 2³² for x, c < 2³², in int64 without overflow: the high and low 16-bit halves of x apart."""
    hi, lo = x >> 16, x & 0xFFFF
    return ((((hi * c) & 0xFFFF) << 16) + lo * c) & MASK32


def mix(x: torch.Tensor) -> torch.Tensor:
    """murmur3's fmix32 on int64 tensors holding 32-bit values."""
    x = x & MASK32
    x = _mul32(x ^ (x >> 16), 0x85EBCA6B)
    x = _mul32(x ^ (x >> 13), 0xC2B2AE35)
    return x ^ (x >> 16)


def stream_keys(seed: int, draw: int, rows: torch.Tensor) -> torch.Tensor:
    """rows [B] (global row indices of one generation draw) -> their stream keys [B] (int64, 32-bit values)."""
    base = mix(torch.tensor(seed & MASK32, dtype=torch.int64))
    base = mix(mix(base ^ (draw & MASK32)) ^ ((draw >> 32) & MASK32))
    return mix(base ^ (rows.to(torch.int64) & MASK32))


def uniforms(keys: torch.Tensor, position: int) -> torch.Tensor:
    """keys [B] -> one uniform in [0, 1) per row [B] float32, for token `position` of each completion."""
    bits = mix(keys ^ mix(torch.tensor(position, dtype=torch.int64, device=keys.device)))
    return (bits >> 8).float() / 2.0**24  # 24 bits: exact in float32


def turn_keys(keys: torch.Tensor, turn: int) -> torch.Tensor:
    """keys [B] -> the keys of each row's turn-th continuation in a multi-turn rollout (turn 0: the keys
    themselves), so a later turn does not reuse the first turn's uniforms."""
    return keys if turn == 0 else mix(keys ^ mix(torch.tensor(turn, dtype=torch.int64, device=keys.device)))
