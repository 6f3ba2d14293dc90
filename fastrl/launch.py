"""This process's place in a launched run, from the environment torchrun and `accelerate launch` set.

Both launchers set RANK, WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE (plus MASTER_ADDR and MASTER_PORT) in every
process they start; without a launcher none is set and the run is one process. No torch here: GRPOConfig reads
the world size at construction and stays torch-free.
"""
from __future__ import annotations

import os
from typing import NamedTuple

LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


class Launch(NamedTuple):
    """This process's place in the run, as the launcher set it (one process: 0, 1, 0, 1)."""
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int


def launch_from_env(env=None) -> Launch:
    """The launcher's variables, checked: each an integer, rank < world size, local rank < local world size."""
    env = os.environ if env is None else env
    if "WORLD_SIZE" not in env:
        return Launch(0, 1, 0, 1)
    values = {}
    for name in LAUNCH_VARIABLES:
        raw = env.get(name, "0" if name in ("RANK", "LOCAL_RANK") else env["WORLD_SIZE"])
        try:
            values[name] = int(raw)
        except ValueError:
            raise ValueError(f"{name}: expected an integer from the launcher, got {raw!r}") from None
    launch = Launch(values["RANK"], values["WORLD_SIZE"], values["LOCAL_RANK"], values["LOCAL_WORLD_SIZE"])
    if launch.world_size < 1 or not 0 <= launch.rank < launch.world_size:
        raise ValueError(f"RANK/WORLD_SIZE: expected 0 <= RANK < WORLD_SIZE, got {launch.rank}/{launch.world_size}")
    if not 0 <= launch.local_rank < launch.local_world_size:
        raise ValueError(f"LOCAL_RANK/LOCAL_WORLD_SIZE: expected 0 <= LOCAL_RANK < LOCAL_WORLD_SIZE, got "
                         f"{launch.local_rank}/{launch.local_world_size}")
    return launch
