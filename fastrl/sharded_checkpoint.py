"""Checkpoints of an FSDP2-sharded run, with torch.distributed.checkpoint (DCP); every rank takes part.

OUTPUT_DIR/checkpoint-<step>/ holds, beside what a one-process checkpoint holds for people (config.json,
model.safetensors gathered whole, tokenizer files, scheduler.pt, trainer_state.json):
  dcp/                          the model and AdamW states, each rank writing its own shards (DCP's format)
  rng_state-rank<r>.pt          every rank's generator states

Atomic as one-process checkpoints are: all ranks write into one temporary folder, wait for each other, and
rank 0 alone renames it into place, so a crash of any rank at any moment leaves the last complete checkpoint.
DCP reshards on load: a checkpoint written by N ranks resumes with M ranks, or in one unsharded process.
"""
from __future__ import annotations

import json
import os

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from fastrl import distributed
from fastrl.checkpoint import PREFIX, TMP_PREFIX, capture_rng, fsync_tree, prune, publish, remove_stale_temporaries, \
    restore_rng

DCP_FOLDER = "dcp"


def is_sharded_checkpoint(path: str) -> bool:
    return os.path.isdir(os.path.join(path, DCP_FOLDER))


def save_sharded_checkpoint(output_dir: str, step: int, *, model, tokenizer, optimizer, scheduler,
                            trainer_state: dict, save_total_limit: int | None, rank: int) -> str:
    """Write checkpoint-<step> from every rank, atomically; prune old ones beyond save_total_limit."""
    final = os.path.join(output_dir, f"{PREFIX}{step}")
    tmp = os.path.join(output_dir, f"{TMP_PREFIX}{step}-sharded")  # one name every rank knows
    if rank == 0:
        os.makedirs(output_dir, exist_ok=True)
        remove_stale_temporaries(output_dir)
        os.makedirs(tmp)
    distributed.barrier()
    model_state, optimizer_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=os.path.join(tmp, DCP_FOLDER))
    torch.save(capture_rng(), os.path.join(tmp, f"rng_state-rank{rank}.pt"))
    whole = distributed.full_state_dict(model)  # collective: rank 0 gets the whole model for from_pretrained
    if rank == 0:
        model.save_pretrained(tmp, state_dict=whole)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        torch.save(scheduler.state_dict(), os.path.join(tmp, "scheduler.pt"))
        with open(os.path.join(tmp, "trainer_state.json"), "w") as f:
            json.dump(trainer_state, f, indent=1)
    distributed.barrier()  # every rank's files are written
    if rank == 0:
        fsync_tree(tmp)
        publish(tmp, final)
        prune(output_dir, save_total_limit)
    distributed.barrier()
    return final


def load_sharded_checkpoint(path: str, *, model, optimizer, scheduler, rank: int) -> dict:
    """Restore model, optimizer, scheduler and this rank's RNG (rank 0's for a rank the checkpoint did not have)
    from `path`, resharded to this run's placement. Returns the trainer state."""
    model_state, optimizer_state = get_state_dict(model, optimizer)
    dcp.load({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=os.path.join(path, DCP_FOLDER))
    set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optimizer_state)
    scheduler.load_state_dict(torch.load(os.path.join(path, "scheduler.pt")))
    rng = os.path.join(path, f"rng_state-rank{rank}.pt")
    restore_rng(torch.load(rng if os.path.exists(rng) else os.path.join(path, "rng_state-rank0.pt"),
                           weights_only=False))
    with open(os.path.join(path, "trainer_state.json")) as f:
        return json.load(f)
