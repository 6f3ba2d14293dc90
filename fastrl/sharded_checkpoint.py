"""Checkpoints of an FSDP2-sharded run, with torch.distributed.checkpoint (DCP); every rank takes part.

OUTPUT_DIR/checkpoint-<step>/ holds, beside what a one-process checkpoint holds for people (config.json,
model.safetensors gathered whole, tokenizer files, scheduler.pt, trainer_state.json):
  dcp/                          the model and AdamW states, each rank writing its own shards (DCP's format)
  rng_state-rank<r>.pt          every rank's generator states
  checksums.json                SHA-256 of every file (written by rank 0 once all ranks wrote theirs), verified
                                before a resume reads anything, the files shared out among the resuming ranks

Atomic as one-process checkpoints are: all ranks write into one temporary folder, wait for each other, and
rank 0 alone renames it into place, so a crash of any rank at any moment leaves the last complete checkpoint.
DCP reshards on load: a checkpoint written by N ranks resumes with M ranks, or in one unsharded process; a
one-process checkpoint resumes sharded through DCP's state-dict API (restore_into_shards).
"""
from __future__ import annotations

import json
import os

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from fastrl import distributed
from fastrl.checkpoint import PREFIX, TMP_PREFIX, capture_rng, fsync_tree, prune, publish, remove_stale_temporaries, \
    restore_rng, verify_checksums, write_checksums

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
        write_checksums(tmp)
        fsync_tree(tmp)
        publish(tmp, final)
        prune(output_dir, save_total_limit)
    distributed.barrier()
    return final


def load_sharded_checkpoint(path: str, *, model, optimizer, scheduler, rank: int) -> dict:
    """Restore model, optimizer, scheduler and this rank's RNG (rank 0's for a rank the checkpoint did not have)
    from `path`, resharded to this run's placement. Returns the trainer state."""
    verify_shared_out(path, rank)
    model_state, optimizer_state = get_state_dict(model, optimizer)
    dcp.load({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=os.path.join(path, DCP_FOLDER))
    set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optimizer_state)
    scheduler.load_state_dict(torch.load(os.path.join(path, "scheduler.pt")))
    rng = os.path.join(path, f"rng_state-rank{rank}.pt")
    restore_rng(torch.load(rng if os.path.exists(rng) else os.path.join(path, "rng_state-rank0.pt"),
                           weights_only=False))
    with open(os.path.join(path, "trainer_state.json")) as f:
        return json.load(f)


def verify_shared_out(path: str, rank: int) -> None:
    """verify_checksums with the files shared out among the ranks; every rank raises the first rank's error."""
    try:
        verify_checksums(path, part=(rank, dist.get_world_size() if distributed.active() else 1))
        error = None
    except ValueError as e:
        error = str(e)
    errors = [e for e in distributed.gather(error) if e is not None]
    if errors:
        raise ValueError(errors[0])


def restore_into_shards(model, optimizer, weights: dict[str, torch.Tensor], optimizer_state: dict) -> None:
    """A one-process checkpoint's whole tensors into an FSDP2-sharded model and its optimizer: DCP's state-dict
    API (full_state_dict=True) keeps each rank's shard. torch numbers an optimizer's parameters in the order its
    groups hold them; the trainer builds its groups the same way sharded or not, so number i is the name of the
    i-th parameter of this optimizer."""
    names = {id(p): n for n, p in model.named_parameters()}
    order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    named = {"state": {order[i]: s for i, s in optimizer_state["state"].items()},
             "param_groups": [{**g, "params": [order[i] for i in g["params"]]}
                              for g in optimizer_state["param_groups"]]}
    set_state_dict(model, optimizer, model_state_dict=weights, optim_state_dict=named,
                   options=StateDictOptions(full_state_dict=True, strict=False))
