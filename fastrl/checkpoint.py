"""Atomic, resumable checkpoints.

OUTPUT_DIR/checkpoint-<step>/ holds:
  config.json, model.safetensors, tokenizer files   the policy, loadable with transformers (save_pretrained)
  trainable_state.pt                                 every trainable parameter, exactly as trained (resume reads this)
  optimizer.pt, scheduler.pt                         torch state dicts
  rng_state.pt                                       python, numpy, torch (and CUDA) generator states
  rollout_buffer.pt                                  the generation batch still being trained on, if any
  trainer_state.json                                 global step, log history, data position, micro-step counter
  <name> for each of extra_files                     other torch-saved state (e.g. a synced reference model)
  checksums.json                                     SHA-256 of every other file, verified before a resume reads
                                                     anything: a missing, truncated or edited file is a
                                                     ValueError naming it, never a silently different run

Atomicity: everything is written into a hidden temporary folder next to the target, files fsynced, then the
folder is renamed into place (a rename within one file system is atomic). A crash mid-save leaves only the
temporary folder, which is ignored and cleaned up by the next save; the previous checkpoint is never touched
until the new one is complete.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import warnings

import numpy as np
import torch

PREFIX = "checkpoint-"
TMP_PREFIX = ".tmp-checkpoint-"
CHECKSUMS = "checksums.json"


def set_seed(seed: int) -> None:
    """Seed python, numpy and torch (all devices), as transformers.set_seed does."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def capture_rng() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def list_checkpoints(output_dir: str) -> list[str]:
    """Complete checkpoints in output_dir, oldest step first."""
    if not os.path.isdir(output_dir):
        return []
    steps = [int(m.group(1)) for name in os.listdir(output_dir) if (m := re.fullmatch(PREFIX + r"(\d+)", name))]
    return [os.path.join(output_dir, f"{PREFIX}{s}") for s in sorted(steps)]


def latest_checkpoint(output_dir: str) -> str | None:
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def fsync_tree(path: str) -> None:
    for root, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(output_dir: str, step: int, *, model, tokenizer, optimizer, scheduler, trainer_state: dict,
                    rollout_buffer: dict | None, save_total_limit: int | None,
                    extra_files: dict[str, object] | None = None) -> str:
    """Write checkpoint-<step> atomically and prune old ones beyond save_total_limit. Returns its path."""
    os.makedirs(output_dir, exist_ok=True)
    final = os.path.join(output_dir, f"{PREFIX}{step}")
    tmp = os.path.join(output_dir, f"{TMP_PREFIX}{step}-{os.getpid()}")
    remove_stale_temporaries(output_dir)
    os.makedirs(tmp)
    model.save_pretrained(tmp)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    torch.save(trainable_state(model), os.path.join(tmp, "trainable_state.pt"))
    torch.save(optimizer.state_dict(), os.path.join(tmp, "optimizer.pt"))
    torch.save(scheduler.state_dict(), os.path.join(tmp, "scheduler.pt"))
    torch.save(capture_rng(), os.path.join(tmp, "rng_state.pt"))
    if rollout_buffer is not None:
        torch.save(rollout_buffer, os.path.join(tmp, "rollout_buffer.pt"))
    for name, obj in (extra_files or {}).items():
        torch.save(obj, os.path.join(tmp, name))
    with open(os.path.join(tmp, "trainer_state.json"), "w") as f:
        json.dump(trainer_state, f, indent=1)
    write_checksums(tmp)
    fsync_tree(tmp)
    publish(tmp, final)
    prune(output_dir, save_total_limit)
    return final


def publish(tmp: str, final: str) -> None:
    """Rename the complete folder `tmp` to `final` (atomic within one file system)."""
    if os.path.exists(final):  # re-saving the same step (e.g. after a resume): keep the old one until the swap
        old = final + f".old-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _files(folder: str) -> list[str]:
    """Every file under `folder` but the checksum list, as paths relative to it."""
    out = []
    for root, _, names in os.walk(folder):
        out += [os.path.relpath(os.path.join(root, n), folder) for n in names]
    return sorted(f for f in out if f != CHECKSUMS)


def write_checksums(folder: str) -> None:
    with open(os.path.join(folder, CHECKSUMS), "w") as f:
        json.dump({name: _sha256(os.path.join(folder, name)) for name in _files(folder)}, f, indent=1)


def verify_checksums(folder: str, part: tuple[int, int] = (0, 1)) -> None:
    """Every file listed in checksums.json is present with its recorded SHA-256 (ValueError naming it if not).
    part=(i, n): only every n-th listed file from the i-th, so that n processes share the reading."""
    listed = os.path.join(folder, CHECKSUMS)
    if not os.path.isfile(listed):
        warnings.warn(f"resume_from_checkpoint: {folder!r} has no {CHECKSUMS} (written before fastrl recorded "
                      "checksums): its files are loaded unverified")
        return
    try:
        with open(listed) as f:
            expected = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"resume_from_checkpoint: {listed!r} is unreadable ({e})") from None
    for name, digest in list(expected.items())[part[0]::part[1]]:
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            raise ValueError(f"resume_from_checkpoint: {path!r} is missing from the checkpoint")
        if _sha256(path) != digest:
            raise ValueError(f"resume_from_checkpoint: {path!r} does not match its checksum (truncated, "
                             "corrupted or edited since it was saved)")


def remove_stale_temporaries(output_dir: str) -> None:
    for name in os.listdir(output_dir):
        if name.startswith(TMP_PREFIX) or ".old-" in name:
            shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)


def prune(output_dir: str, save_total_limit: int | None) -> None:
    if save_total_limit is None:
        return
    found = list_checkpoints(output_dir)
    for path in found[: max(0, len(found) - save_total_limit)]:
        shutil.rmtree(path)


def copy_into(model, optimizer, weights: dict[str, torch.Tensor], optimizer_state: dict) -> None:
    """One process or a replica: the parameters copied in place, the optimizer state loaded as saved."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value)
    optimizer.load_state_dict(optimizer_state)


def load_checkpoint(path: str, *, model, optimizer, scheduler, restore=copy_into) -> tuple[dict, dict | None]:
    """Restore weights, optimizer, scheduler and RNG from `path`. Returns (trainer_state, rollout_buffer).
    restore(model, optimizer, weights, optimizer_state) puts the saved whole tensors in place (a sharded model
    passes its own: fastrl.sharded_checkpoint.restore_into_shards)."""
    if not os.path.isfile(os.path.join(path, "trainer_state.json")):
        raise ValueError(f"resume_from_checkpoint: {path!r} is not a fastrl checkpoint (no trainer_state.json)")
    verify_checksums(path)
    for name in ("trainable_state.pt", "optimizer.pt", "scheduler.pt", "rng_state.pt"):
        if not os.path.isfile(os.path.join(path, name)):
            raise ValueError(f"resume_from_checkpoint: {os.path.join(path, name)!r} is missing from the checkpoint")
    weights = torch.load(os.path.join(path, "trainable_state.pt"), map_location="cpu")
    params = dict(model.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in weights]
    if missing:
        raise ValueError(f"resume_from_checkpoint: checkpoint {path!r} lacks parameters {missing[:5]} "
                         "(was it written for another model?)")
    restore(model, optimizer, weights, torch.load(os.path.join(path, "optimizer.pt"), map_location="cpu"))
    scheduler.load_state_dict(torch.load(os.path.join(path, "scheduler.pt")))
    restore_rng(torch.load(os.path.join(path, "rng_state.pt"), weights_only=False))
    with open(os.path.join(path, "trainer_state.json")) as f:
        state = json.load(f)
    buffer_path = os.path.join(path, "rollout_buffer.pt")
    buffer = torch.load(buffer_path, map_location="cpu") if os.path.exists(buffer_path) else None
    return state, buffer


def resolve_resume(resume_from_checkpoint, output_dir: str) -> str | None:
    """True -> the latest checkpoint in output_dir; a path -> that path; else None.

    True with no complete checkpoint in output_dir is an error, as in transformers' Trainer.train: a run meant to
    continue must not silently start over (half-written temporaries do not count)."""
    if resume_from_checkpoint in (None, False):
        return None
    if resume_from_checkpoint is True:
        latest = latest_checkpoint(output_dir)
        if latest is None:
            raise ValueError(f"resume_from_checkpoint=True: no valid checkpoint found in output directory "
                             f"({output_dir})")
        return latest
    if not os.path.isdir(resume_from_checkpoint):
        raise ValueError(f"resume_from_checkpoint: {resume_from_checkpoint!r} does not exist")
    return resume_from_checkpoint
