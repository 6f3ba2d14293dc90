"""One training run of tests/test_distributed.py: started by torchrun (N ranks) or plainly (one process).

    python tests/dist_worker.py MODEL_DIR OUT_DIR full|lora PER_DEVICE_BATCH [field=value ...]

Trains 3 optimizer steps of a fixed, TRL-shaped config whose global batch is the same at every world size (the
caller passes per_device_train_batch_size = global micro-batch / world size). Rank 0 writes OUT_DIR/metrics.jsonl
and completions.jsonl (the trainer's own logs, every step), OUT_DIR/trainable.pt (the trained parameters) and
OUT_DIR/model (trainer.save_model).

Faults for the tests, set by environment variable: FASTRL_TEST_KILL_RANK / FASTRL_TEST_KILL_AFTER_STEP kill a
rank while it scores a step (first_char_or_die); FASTRL_TEST_KILL_IN_SAVE=RANK:N kills a rank inside the N-th
sharded save (kill_in_save). Either writes the moment of the kill to OUT_DIR/killed_at.
"""
import json
import os
import signal
import sys
import time
from types import SimpleNamespace

import torch

sys.path.insert(0, os.path.dirname(__file__))
torch.set_num_threads(1)  # 2 cores shared by every rank and other jobs

import helpers_tiny as tiny  # noqa: E402
from datasets import Dataset  # noqa: E402

from fastrl import GRPOConfig, GRPOTrainer  # noqa: E402


def main(model_dir: str, out: str, mode: str, per_device: int, *overrides: str) -> None:
    kill_in_save(out)
    extra = {k: type_of(v) for k, v in (o.split("=", 1) for o in overrides)}
    fields = dict(output_dir=out, per_device_train_batch_size=per_device, per_device_eval_batch_size=per_device,
                  num_generations=4,
                  gradient_accumulation_steps=2, max_completion_length=6, max_steps=3, logging_steps=1,
                  learning_rate=1e-3, beta=0.04, bf16=False, save_strategy="no", disable_tqdm=True,
                  report_to="none", log_completions=True, num_completions_to_print=0, use_cpu=True, temperature=1.3)
    args = GRPOConfig(**{**fields, **extra})
    peft_config = None
    if mode == "lora":
        import peft

        peft_config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    trainer = GRPOTrainer(model=model_dir, reward_funcs=[first_char_or_die, tiny.short_reward], args=args,
                          train_dataset=Dataset.from_list(tiny.addition_rows(24)), peft_config=peft_config,
                          eval_dataset=Dataset.from_list(tiny.addition_rows(40)[30:35]))  # used with eval_strategy
    if args.use_vllm:
        record_logprob_diffs(os.path.join(out, f"logprob_abs_diff-rank{args.process_index}.json"))
    trainer.train()
    trainable = {n: full(p) for n, p in trainer.model.named_parameters() if p.requires_grad}  # collective
    if trainer.state.is_world_process_zero:
        torch.save(trainable, os.path.join(out, "trainable.pt"))
    trainer.save_model(os.path.join(out, "model"))


def record_logprob_diffs(path: str) -> None:
    """Each rank writes its own rollout/logprob_abs_diff of every generation batch (the trainer logs their mean)."""
    import fastrl.trainer

    measured = []

    def measure(*tensors):
        measured.append(logprob_abs_diff(*tensors))
        with open(path, "w") as f:
            json.dump(measured, f)
        return measured[-1]

    logprob_abs_diff = fastrl.trainer.logprob_abs_diff
    fastrl.trainer.logprob_abs_diff = measure


def full(p: torch.Tensor) -> torch.Tensor:
    """The whole parameter: an FSDP2 shard is gathered (every rank takes part)."""
    return (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()


def first_char_or_die(completions, answer, trainer_state=None, **kwargs):
    """tiny.first_char_reward; but the rank named by FASTRL_TEST_KILL_RANK kills itself (SIGKILL, no clean-up)
    while scoring the step after FASTRL_TEST_KILL_AFTER_STEP optimizer steps."""
    if os.environ.get("FASTRL_TEST_KILL_RANK") == os.environ.get("RANK", "0") and \
            trainer_state.global_step == int(os.environ.get("FASTRL_TEST_KILL_AFTER_STEP", -1)):
        die(os.environ["FASTRL_TEST_OUT"])
    return tiny.first_char_reward(completions, answer)


def kill_in_save(out: str) -> None:
    """FASTRL_TEST_KILL_IN_SAVE=RANK:N: that rank dies (SIGKILL) inside its N-th sharded save, once DCP has written
    its shards, while the other ranks go on into the save's collectives (gathering the whole model, barriers)."""
    os.environ["FASTRL_TEST_OUT"] = out
    if ":" not in os.environ.get("FASTRL_TEST_KILL_IN_SAVE", ""):
        return
    rank, nth = map(int, os.environ["FASTRL_TEST_KILL_IN_SAVE"].split(":"))
    if rank != int(os.environ.get("RANK", "0")):
        return
    import fastrl.sharded_checkpoint as sharded

    real_save, calls = sharded.dcp.save, []

    def save(*args, **kwargs):
        result = real_save(*args, **kwargs)
        calls.append(1)
        if len(calls) == nth:
            die(out)
        return result

    sharded.dcp = SimpleNamespace(**{**vars(sharded.dcp), "save": save})  # this module's view of DCP only


def die(out: str) -> None:
    """SIGKILL this process (no clean-up, no Python exit) after writing the moment to OUT/killed_at."""
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "killed_at"), "w") as f:
        f.write(repr(time.time()))
    os.kill(os.getpid(), signal.SIGKILL)


def type_of(value: str):
    if value in ("True", "False"):
        return value == "True"
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return value


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), *sys.argv[5:])
