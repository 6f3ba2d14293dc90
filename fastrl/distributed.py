"""Several processes: the device and process group of a launched run, the model's placement across ranks, and
the few collectives the trainer needs. One process without a launcher needs none of it and runs as before.

The launch (rank, world size) is read by fastrl.launch. The process group uses nccl on CUDA and gloo on CPU,
with `ddp_timeout` seconds (TrainingArguments' field) as its timeout, so a collective that a dead rank never
joins fails with an error instead of waiting forever. Within GRPOTrainer.train such a failure is re-raised by
`peer_failures` as an error naming the dead rank (when this host can see it) and the checkpoint to resume from.

Two ways to hold the model, both training on each rank's slice of the global batch:
- replication (the default, DDP's): every rank holds the whole model and optimizer; the gradients are averaged
  across ranks (all-reduced in DDP's 25 MiB buckets, or ddp_bucket_cap_mb, once per optimizer step) before
  clipping. Replicas stay equal because they start
  equal (rank 0's weights are broadcast) and take the same averaged steps.
- `fsdp="full_shard"`: FSDP2 (`fully_shard`) on each decoder layer and on the root (embeddings, final norm,
  lm_head), so parameters, gradients and AdamW states are split across ranks; FSDP2 gathers a layer for its
  forward and backward and averages gradients by reduce-scatter. The root's parameters stay gathered from its
  forward until its backward (FSDP2's default for the root), which is when the fused loss reads the whole
  lm_head: the trainer runs the root's forward for its hidden states (policy.completion_hidden).
"""
from __future__ import annotations

import contextlib
import datetime
import os
import socket
import time
import warnings
from typing import Callable

import torch
import torch.distributed as dist

from fastrl.launch import Launch


def device_for(launch: Launch, use_cpu: bool) -> torch.device:
    """cuda:<local rank> when CUDA is there (and use_cpu is off), else the CPU. Fewer devices than local ranks is
    a bad launch, refused before any work."""
    if launch.world_size == 1 or use_cpu or not torch.cuda.is_available():
        from fastrl.policy import training_device  # one rule for one process (policy imports transformers)

        return training_device(use_cpu)
    if torch.cuda.device_count() < launch.local_world_size:
        raise ValueError(f"LOCAL_WORLD_SIZE={launch.local_world_size}: only {torch.cuda.device_count()} CUDA "
                         "devices on this node; launch at most one process per device")
    torch.cuda.set_device(launch.local_rank)
    return torch.device("cuda", launch.local_rank)


# every rank's (host name, process id), rank order: which peer died when a collective fails (peer_failures)
_PEERS: list[tuple[str, int]] = []


def init_process_group(launch: Launch, device: torch.device, timeout_s: float) -> None:
    """The default process group (nccl on CUDA, gloo on CPU) for a multi-process launch, unless the caller already
    made one; then every rank's host and process id are exchanged. Nothing for one process."""
    if launch.world_size == 1:
        return
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=launch.rank,
                                world_size=launch.world_size, timeout=datetime.timedelta(seconds=timeout_s))
    if not _PEERS:
        _PEERS.extend(gather((socket.gethostname(), os.getpid())))


@contextlib.contextmanager
def peer_failures(last_checkpoint: Callable[[], str | None]):
    """Re-raise a failure caused by a dead peer (a collective it never joined, or one that timed out after
    ddp_timeout) as a RuntimeError that names the dead rank when it ran on this host, else says a peer died or
    hung, and names the checkpoint to resume from. Other errors pass unchanged; one process needs none of it."""
    try:
        yield
    except Exception as error:  # a collective's failure: nccl raises DistError, gloo a RuntimeError naming itself
        if not active() or not (isinstance(error, dist.DistError) or "gloo" in str(error)):
            raise  # this rank's own error (every rank may raise it and exit: no peer is blamed for it)
        dead = dead_peers()
        here = f"rank {dist.get_rank()} of {dist.get_world_size()}"
        if dead:
            who = ", ".join(f"rank {r} (pid {_PEERS[r][1]} on {_PEERS[r][0]})" for r in dead)
            cause = f"{here}: a collective failed because {who} died"
        else:
            cause = (f"{here}: a collective failed: a peer process died or did not answer within ddp_timeout "
                     f"({type(error).__name__})")
        checkpoint = last_checkpoint()
        resume = (f"resume with resume_from_checkpoint={checkpoint!r}" if checkpoint else
                  "no checkpoint was written yet: start the run again")
        raise RuntimeError(f"{cause}; see the launcher's report for its error; {resume}") from error


def dead_peers(wait_s: float = 1.0) -> list[int]:
    """The ranks on this host whose process has exited (gone, or a zombie its launcher has not reaped yet); none
    where /proc does not exist. Another host's processes cannot be seen from here. A peer whose death broke the
    collective has closed its sockets but may still be exiting: polled for up to wait_s."""
    if not os.path.isdir("/proc/self"):
        return []
    host, deadline = socket.gethostname(), time.monotonic() + wait_s
    while True:
        dead = [rank for rank, (h, pid) in enumerate(_PEERS) if h == host and _exited(pid)]
        if dead or time.monotonic() >= deadline:
            return dead
        time.sleep(0.05)


def _exited(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")  # the state follows the command's ")"
    except FileNotFoundError:
        return True


def shard(model: torch.nn.Module, device: torch.device, args, offload: bool = False) -> torch.nn.Module:
    """FSDP2 on each decoder layer, then on the root (a PEFT wrapper or the causal LM): the module, sharded in
    place. Frozen parameters (a LoRA base, a reference model) are sharded the same way.

    args: the GRPOConfig (fsdp_config's reshard_after_forward; bf16). With bf16 the shards stay fp32 (the
    optimizer's master weights) and FSDP2's MixedPrecisionPolicy gathers each layer in bf16 for its forward and
    backward and reduces gradients in fp32; with cast_lm_head_to_fp32 too, the root (embeddings, final norm,
    lm_head) is gathered in fp32, so the fused loss reads the fp32 head as one process does. `offload` (a
    reference with ref_model_offload) keeps the shards in host memory and copies each layer to the device for its
    forward (CPUOffloadPolicy); on a CPU run there is nothing to offload to."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    from fastrl.policy import base_model

    # the root's forward returns logits_to_keep's view; the trainer only reads its hidden_states, never writes
    # into it, which is what this FSDP2 warning is about
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    offload_policy = CPUOffloadPolicy(pin_memory=True) if offload and device.type == "cuda" else OffloadPolicy()
    layers_dtype = torch.bfloat16 if args.bf16 else None  # None: the parameters' own dtype
    root_dtype = None if args.cast_lm_head_to_fp32 else layers_dtype
    reshard = (args.fsdp_config or {}).get("reshard_after_forward", True)
    for layer in base_model(model).get_decoder().layers:
        fully_shard(layer, mesh=mesh, reshard_after_forward=reshard, offload_policy=offload_policy,
                    mp_policy=MixedPrecisionPolicy(param_dtype=layers_dtype, reduce_dtype=torch.float32))
    fully_shard(model, mesh=mesh, offload_policy=offload_policy,
                mp_policy=MixedPrecisionPolicy(param_dtype=root_dtype, reduce_dtype=torch.float32))
    return model


def is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def reshard(model: torch.nn.Module) -> None:
    """Free an FSDP2 root's gathered parameters after a forward with no backward to follow (the reference,
    logprob and evaluation passes): FSDP2 keeps the root gathered until its backward, and a pass without one would
    leave the whole embedding and lm_head gathered on every rank (a reference's until the end of the run)."""
    if is_sharded(model):
        model.reshard()


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's state dict on the CPU of rank 0 (empty on the others); every rank must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def all_ranks(flag: bool) -> bool:
    """True when `flag` is true on every rank (loops that run collectives must stop together)."""
    if not active():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def active() -> bool:
    return dist.is_initialized() and dist.get_world_size() > 1


def _comm_device() -> torch.device:
    """Where a tensor must be for a collective: nccl takes CUDA tensors only, gloo CPU ones."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def broadcast_parameters(model: torch.nn.Module) -> None:
    """Rank 0's parameters and buffers to every rank (replicas start equal whatever each rank loaded)."""
    if not active():
        return
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            dist.broadcast(t.data, src=0)


def average_gradients(model: torch.nn.Module, params: list[torch.nn.Parameter], bucket_size: int) -> None:
    """Replication: each gradient becomes its mean over ranks, all-reduced in fp32 buckets of about bucket_size
    bytes (as DDP buckets them), so the extra memory is one bucket, not a copy of every gradient. A parameter
    without a gradient counts as zero, as DDP counts it. A sharded model's gradients are averaged by FSDP2."""
    if not active() or is_sharded(model):
        return
    for bucket in gradient_buckets(params, bucket_size):
        sizes = [p.numel() for p in bucket]
        flat = torch.empty(sum(sizes), dtype=torch.float32, device=bucket[0].device)  # [bucket's numel]
        for p, part in zip(bucket, flat.split(sizes)):  # cast while copying: no temporary per gradient
            if p.grad is None:
                part.zero_()
            else:
                part.copy_(p.grad.reshape(-1))
        dist.all_reduce(flat)
        flat /= dist.get_world_size()
        for p, mean in zip(bucket, flat.split(sizes)):
            p.grad = mean.view_as(p).to(p.dtype)  # fp32: a view of the bucket; 16-bit: cast back


def gradient_buckets(params: list[torch.nn.Parameter], bucket_size: int) -> list[list[torch.nn.Parameter]]:
    """Consecutive parameters grouped while their fp32 size stays within bucket_size bytes (a larger parameter is
    a bucket of its own); every rank groups its identical list the same way."""
    buckets, size = [[]], 0
    for p in params:
        if buckets[-1] and size + 4 * p.numel() > bucket_size:
            buckets.append([])
            size = 0
        buckets[-1].append(p)
        size += 4 * p.numel()
    return [b for b in buckets if b]


def mean_over_ranks(values: dict[str, float | None], weight: float = 1.0) -> dict[str, float | None]:
    """Each value's `weight`-weighted mean over the ranks that have it (None and NaN are absent). Weighting a
    per-rank token mean by the rank's token count gives the token mean of the whole batch, as one process
    computes it. Every rank passes the same keys."""
    if not active():
        return values
    keys = sorted(values)
    x = torch.tensor([float("nan") if values[k] is None else float(values[k]) for k in keys], dtype=torch.float64)
    present = ~torch.isnan(x)
    sums = torch.stack([torch.where(present, x * weight, 0.0), present.double() * weight])  # [2, K]
    sums = sums.to(_comm_device())
    dist.all_reduce(sums)
    return {k: (s / n).item() if n > 0 else None for k, s, n in zip(keys, sums[0], sums[1])}


def sum_over_ranks(value: float) -> float:
    if not active():
        return value
    t = torch.tensor([float(value)], dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t)
    return t.item()


def gather(obj) -> list:
    """Every rank's `obj`, in rank order (picklable Python objects)."""
    if not active():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if active():
        dist.barrier()


def shutdown() -> None:
    """Destroy the default process group, if any (the end of a launched run)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def rank_slice(n: int, rank: int, world_size: int) -> slice:
    """Rows [⌊rank·n/W⌋, ⌊(rank+1)·n/W⌋) of n: equal shares when W divides n, else shares one row apart
    (a rank may get none). Rank r of a group of g consecutive ranks gets a part of the group's
    rank_slice(n, r // g, W / g)."""
    return slice(rank * n // world_size, (rank + 1) * n // world_size)


def micro_batch_rows(order: torch.Tensor, micro_batches: int, world_size: int, rank: int) -> torch.Tensor:
    """This rank's rows of a shuffled generation batch, micro-batch after micro-batch.

    order [B]: the global shuffled row order. It is cut into `micro_batches` global micro-batches, and each of
    those into world_size equal slices, one per rank: so micro-batch k over all ranks holds exactly the rows a
    single process would train on in its micro-batch k. Returns [B / world_size] row indices."""
    return order.view(micro_batches, world_size, -1)[:, rank].reshape(-1)
