"""Run by tests/test_distributed.py under torchrun (2 CPU ranks, gloo): FSDP2's bf16 mixed precision.

    python -m torch.distributed.run --nproc_per_node 2 tests/dist_bf16_worker.py SEED

A tiny Llama with tied embeddings, prepared as the trainer prepares it (gradient checkpointing with its offload),
sharded by fastrl.distributed.shard with bf16=True, computes the fused GRPO loss of one random batch (the same on
both ranks, so FSDP's gradient average is that batch's gradient) from its hidden states and its gathered head.
Its unsharded twin computes the same in fp32 (the truth) and under bf16 autocast (what one process with bf16=True
runs). Checked on every rank, as CCE checks its kernels: the mixed-precision gradients are no further from the
truth than autocast's, times 2 plus a small slack (the two round in different places: FSDP2 casts the weights
once per gather, autocast per matmul, and the norms run on bf16 weights; seen 0.7-1% relative error against
autocast's 0.4-0.8%). Gradients, not the loss: the on-policy loss's value is -mean(A) whatever the logits.
Also: the forward ran on bf16 weights, the shards and their gradients stay fp32, the tied matrix's rows that no
input looks up (their gradient comes from the head alone) are as close to the truth, and with
cast_lm_head_to_fp32 the root (so the head the loss reads) is gathered in fp32.
Exit code 0 when every check holds.
"""
import contextlib
import copy
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(__file__))
torch.set_num_threads(1)

import helpers_tiny as tiny  # noqa: E402

from fastrl import GRPOConfig, distributed  # noqa: E402
from fastrl.kernels import fused_linear_grpo_loss  # noqa: E402
from fastrl.launch import launch_from_env  # noqa: E402
from fastrl.policy import activations_offloaded, completion_hidden, lm_head, prepare_for_training  # noqa: E402

B, P, T = 6, 5, 7  # completions, prompt width, completion width (ragged by the masks below)


def main(seed: int) -> None:
    launch = launch_from_env()
    device = torch.device("cpu")
    distributed.init_process_group(launch, device, 300)
    fields = dict(output_dir=tempfile.mkdtemp(), bf16=True, fsdp="full_shard", use_cpu=True,
                  gradient_checkpointing=True, gradient_checkpointing_offload=True)
    args = GRPOConfig(**fields)
    tok = tiny.build_tokenizer()
    model = prepare_for_training(tiny.build_model(tok, seed=seed, tie=True), args, device)
    twin = copy.deepcopy(model)
    batch = random_batch(len(tok), seed)

    truth = loss_and_grads(twin, batch, autocast=False)
    twin.zero_grad()
    autocast = loss_and_grads(twin, batch, autocast=True)
    sharded = distributed.shard(model, device, args)
    dtypes = []
    hook = sharded.model.layers[0].self_attn.q_proj.register_forward_pre_hook(
        lambda m, _: dtypes.append(m.weight.dtype))
    mixed = loss_and_grads(sharded, batch, autocast=True)
    hook.remove()

    assert dtypes and set(dtypes) == {torch.bfloat16}, dtypes  # gathered in bf16 for the forward (and recompute)
    for name, p in sharded.named_parameters():
        assert p.dtype == p.grad.dtype == torch.float32, (name, p.dtype, p.grad.dtype)  # fp32 master weights
    for name in truth:
        scale = truth[name].norm()
        err_mixed = (mixed[name] - truth[name]).norm() / scale
        err_autocast = (autocast[name] - truth[name]).norm() / scale
        assert err_mixed <= 2 * err_autocast + 2e-3, (name, float(err_mixed), float(err_autocast))
    # cast_lm_head_to_fp32: the root (head, embeddings, final norm) is gathered in fp32, the layers in bf16
    fp32_head = distributed.shard(copy.deepcopy(twin), device, GRPOConfig(**fields, cast_lm_head_to_fp32=True))
    completion_hidden(fp32_head, batch["ids"], batch["attention"], P)
    assert lm_head(fp32_head).weight.dtype == torch.float32, lm_head(fp32_head).weight.dtype
    assert fp32_head.model.layers[0].mlp.up_proj.weight.dtype == torch.float32  # sharded: the fp32 master
    distributed.reshard(fp32_head)
    # tied: rows of the shared matrix that no input looks up get their gradient from the head alone
    tied = "model.embed_tokens.weight"
    assert "lm_head.weight" not in truth  # one parameter: named_parameters yields a tied matrix once
    unseen = torch.ones(len(tok), dtype=torch.bool)
    unseen[batch["ids"].unique()] = False
    head_only = truth[tied][unseen]
    assert unseen.any() and head_only.norm() > 0
    assert (mixed[tied][unseen] - head_only).norm() <= \
        2 * (autocast[tied][unseen] - head_only).norm() + 2e-3 * head_only.norm()
    print(f"rank {launch.rank}: bf16 mixed precision ok", flush=True)
    distributed.shutdown()


def random_batch(vocab: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, vocab // 2, (B, P + T), generator=g)  # the upper half of the vocabulary never an input
    attention = torch.ones(B, P + T, dtype=torch.long)
    for i in range(B):  # left-padded prompts, right-padded completions of ragged lengths
        attention[i, : int(torch.randint(0, P - 1, (1,), generator=g))] = 0
        attention[i, P + int(torch.randint(1, T + 1, (1,), generator=g)):] = 0
    return {"ids": ids, "attention": attention, "mask": attention[:, P:].clone(),
            "advantages": torch.randn(B, generator=g)}


def loss_and_grads(model, batch: dict, autocast: bool) -> dict[str, torch.Tensor]:
    """Every parameter's whole gradient (FSDP2: gathered) of the fused loss, computed as the trainer computes it."""
    cast = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    with cast, activations_offloaded(True, torch.device("cpu")):
        hidden = completion_hidden(model, batch["ids"], batch["attention"], P)  # [B, T, H]
    weight, _ = lm_head(model)  # FSDP2: the root's gathered matrix, until its backward
    loss, _ = fused_linear_grpo_loss(hidden, weight.to(hidden.dtype), batch["ids"][:, P:], batch["mask"],
                                     batch["advantages"])
    loss.backward()
    grads = {n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).float().clone()
             for n, p in model.named_parameters()}
    return grads


if __name__ == "__main__":
    main(int(sys.argv[1]))
