"""Difficulty filtering: keep the prompts the starting policy sometimes, but not always, solves.

    fastrl filter CONFIG.yaml --k 8 [--min-pass 0.0 --max-pass 1.0 --solved-at 1.0 --reward NAME --out PATH]

The config is the one `fastrl train` reads (same model, data, rewards, sampling settings; `--field value`
overrides work the same way). For every prompt, k completions are sampled from the starting policy with the
trainer's own generator (vLLM when use_vllm is set and vLLM is installed, transformers otherwise) and scored by
the configured reward functions, resolved and weighted exactly as in training. A completion is *solved* when its
reward (the weighted sum, or the single function named by --reward) is >= --solved-at; a prompt's `pass_rate` is
the fraction of its scorable completions that are solved (completions every function scored None do not count).

The output (jsonl, default `<dataset>.filtered.jsonl`) holds every column of the kept rows plus `pass_rate`.
A row is kept when min_pass < pass_rate < max_pass (both bounds exclusive: the defaults drop the prompts solved
never and those solved always); rows with no scorable completion are dropped.

Resumable: scores are appended, one batch at a time, to `<out>.partial` (one JSON line per row, keyed by its
row index, each batch written by a single write and fsynced). A rerun skips the rows already there, after
dropping a torn last line left by a crash. Each batch is sampled under a seed derived from its first row, so an
interrupted and resumed run writes the same output as an uninterrupted one. The partial file starts with the
settings it was made with; a rerun with other settings is refused (the thresholds are not among them: rerunning
with other --min-pass/--max-pass/--solved-at only re-reads the scores, no sampling).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import sys

PARTIAL_SUFFIX = ".partial"
FORMAT_VERSION = 1


# ------------------------------------------------------------------ the command line
def add_filter_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="the YAML config `fastrl train` reads (model, data, rewards, sampling)")
    parser.add_argument("--k", type=int, default=8, help="completions sampled per prompt (default 8)")
    parser.add_argument("--min-pass", type=float, default=0.0,
                        help="keep rows with pass_rate above this (default 0.0: drop never-solved prompts)")
    parser.add_argument("--max-pass", type=float, default=1.0,
                        help="keep rows with pass_rate below this (default 1.0: drop always-solved prompts)")
    parser.add_argument("--solved-at", type=float, default=1.0,
                        help="a completion counts as solved when its reward is >= this (default 1.0)")
    parser.add_argument("--reward", default=None,
                        help="judge solved by this one reward function (its name) instead of the weighted sum")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="prompts per generation call (default: generation_batch_size / k, at least 1)")
    parser.add_argument("--out", default=None, help="output jsonl (default: <dataset>.filtered.jsonl)")
    parser.epilog = "Any other --field value overrides that key of the config, as for `fastrl train`."
    parser.set_defaults(accepts_overrides=True)


def filter_main(argv: list[str]) -> int:
    """`fastrl filter ...` from Python: filter_main(["config.yaml", "--k", "8"]) -> exit code."""
    from fastrl import cli

    return cli.main(["filter", *argv])


def run_filter(args: argparse.Namespace) -> int:
    from fastrl.run_config import load_run_config, parse_overrides, split_run_config

    check_options(args)
    raw = load_run_config(args.config, parse_overrides(args.overrides))
    raw.update(beta=0.0, sync_ref_model=False)  # sampling needs no reference model: do not load one
    run, config = split_run_config(raw)
    raw["use_vllm"] = _vllm_usable(config.use_vllm)
    out = args.out or default_output(run, config.output_dir)
    if run["dataset"] is not None and os.path.abspath(out) == os.path.abspath(run["dataset"]):
        raise ValueError(f"--out: {out!r} is the input dataset itself; write the filtered rows elsewhere")
    summary = filter_dataset(raw, args, out)
    print(f"fastrl filter: {summary['kept']} of {summary['rows']} rows kept -> {out} "
          f"(never solved {summary['never']}, always solved {summary['always']}, "
          f"unscorable {summary['unscorable']}, outside the bounds otherwise {summary['other']})")
    return 0


def check_options(args) -> None:
    if args.k < 1:
        raise ValueError(f"--k: expected an integer >= 1, got {args.k}")
    if not 0.0 <= args.min_pass < args.max_pass <= 1.0:
        raise ValueError(f"--min-pass/--max-pass: expected 0 <= min_pass < max_pass <= 1, "
                         f"got {args.min_pass} and {args.max_pass}")
    if args.batch_size is not None and args.batch_size < 1:
        raise ValueError(f"--batch-size: expected an integer >= 1, got {args.batch_size}")
    if not math.isfinite(args.solved_at):
        raise ValueError(f"--solved-at: expected a finite number, got {args.solved_at}")


def default_output(run: dict, output_dir: str) -> str:
    if run["dataset"] is not None:
        return os.path.splitext(run["dataset"])[0] + ".filtered.jsonl"
    return os.path.join(output_dir, f"{run['task']}.filtered.jsonl")


def _vllm_usable(use_vllm: bool) -> bool:
    if not use_vllm:
        return False
    if importlib.util.find_spec("vllm") is None or importlib.util.find_spec("fastrl.generation.vllm") is None:
        print("fastrl filter: use_vllm is set but vLLM is not available here; sampling with transformers",
              file=sys.stderr)
        return False
    return True


# ------------------------------------------------------------------ the work
def filter_dataset(raw: dict, args, out: str) -> dict:
    """Score every row (resuming from <out>.partial), then write the kept rows to `out`. Returns counts."""
    from fastrl.run_config import build_trainer

    trainer = build_trainer(raw)
    if args.reward is not None and args.reward not in trainer.reward_func_names:
        raise ValueError(f"--reward: {args.reward!r} is not one of the configured reward functions "
                         f"{trainer.reward_func_names}")
    config, dataset = trainer.args, trainer.train_dataset
    batch_size = args.batch_size or max(1, config.generation_batch_size // args.k)
    partial = out + PARTIAL_SUFFIX
    settings = _settings(raw, args, batch_size, len(dataset))
    done = read_partial(partial, settings)
    score_missing_rows(trainer, args, batch_size, partial, done)
    return write_filtered(dataset, done, args, out)


def _settings(raw: dict, args, batch_size: int, num_rows: int) -> dict:
    """What the scores depend on: a partial file made with other settings is not reused."""
    sampling = ("model", "tiny_model", "task", "task_args", "dataset", "rewards", "reward_weights", "seed",
                "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "max_completion_length",
                "max_prompt_length", "chat_template_kwargs", "bf16")
    settings = {"version": FORMAT_VERSION, "k": args.k, "batch_size": batch_size, "reward": args.reward,
                "rows": num_rows, **{key: raw.get(key) for key in sampling}}
    return json.loads(json.dumps(settings))  # as it reads back from the file (tuples -> lists)


def score_missing_rows(trainer, args, batch_size: int, partial: str, done: dict[int, list]) -> None:
    """Sample and score every row not in `done`, batch by batch, appending each batch to the partial file."""
    from tqdm.auto import tqdm

    n = len(trainer.train_dataset)
    # fixed batches [start, start + batch_size): a resumed run samples each under the same seed as a fresh one
    pending = [(start, [i for i in range(start, min(start + batch_size, n)) if i not in done])
               for start in range(0, n, batch_size)]
    pending = [(start, rows) for start, rows in pending if rows]
    if not pending:
        return
    trainer.generator.push_weights(trainer.model)
    with tqdm(total=n, initial=n - sum(len(rows) for _, rows in pending), desc="filter", unit="prompt",
              disable=bool(trainer.args.disable_tqdm), dynamic_ncols=True) as progress:
        for start, rows in pending:
            rewards = score_rows(trainer, rows, args.k, args.reward, seed=trainer.args.seed + start)
            records = {i: rewards[j * args.k:(j + 1) * args.k] for j, i in enumerate(rows)}
            append_records(partial, records)
            done.update(records)
            progress.update(len(rows))


def score_rows(trainer, row_indices: list[int], k: int, reward_name: str | None, seed: int) -> list[float]:
    """k completions for each row, sampled under `seed` -> [len(rows) × k] rewards (NaN = unscorable),
    grouped by row."""
    from fastrl.checkpoint import set_seed
    from fastrl.data import completions_for_rewards, tokenize_prompts
    from fastrl.scoring import combine, score

    args = trainer.args
    set_seed(seed)
    rows = [trainer.train_dataset[i] for i in row_indices]
    prompt_ids = tokenize_prompts(trainer.processing_class, [r["prompt"] for r in rows], args.max_prompt_length,
                                  args.chat_template_kwargs)
    sampling = trainer._sampling()  # the trainer's own settings: the filter samples as training will
    sampling.seed = seed
    with trainer._autocast():
        rollout = trainer.generator.generate(prompt_ids, k, sampling)
    prompts = [r["prompt"] for r in rows for _ in range(k)]
    texts = trainer.tokenizer.batch_decode(rollout.completion_ids, skip_special_tokens=True)
    columns = {c: [r[c] for r in rows for _ in range(k)] for c in rows[0] if c not in ("prompt", "completion",
                                                                                       "completion_ids")}
    extras = {"trainer_state": trainer.state, "log_metric": lambda *a, **kw: None,
              "log_extra": lambda *a, **kw: None}
    per_func = score(trainer.reward_funcs, trainer.reward_func_names, prompts,
                     completions_for_rewards(prompts, texts), rollout.completion_ids, columns, extras)  # [B, F]
    if reward_name is not None:
        return per_func[:, trainer.reward_func_names.index(reward_name)].tolist()
    return combine(per_func, trainer.reward_weights).tolist()


# ------------------------------------------------------------------ pass rates and the output
def pass_rate(rewards: list[float | None], solved_at: float) -> float | None:
    """Fraction of the scorable rewards that are >= solved_at; None when none is scorable."""
    scorable = [r for r in rewards if r is not None and not math.isnan(r)]
    if not scorable:
        return None
    return sum(r >= solved_at for r in scorable) / len(scorable)


def write_filtered(dataset, scores: dict[int, list], args, out: str) -> dict:
    """The kept rows, each with its pass_rate, written atomically to `out`. Returns the counts."""
    counts = {"rows": len(dataset), "kept": 0, "never": 0, "always": 0, "unscorable": 0, "other": 0}
    lines = []
    for i in range(len(dataset)):
        rate = pass_rate(scores[i], args.solved_at)
        if rate is None:
            counts["unscorable"] += 1
        elif args.min_pass < rate < args.max_pass:
            counts["kept"] += 1
            lines.append(json.dumps({**dataset[i], "pass_rate": rate}, ensure_ascii=False) + "\n")
        else:
            counts["never" if rate == 0 else "always" if rate == 1 else "other"] += 1
    _write_atomically(out, "".join(lines))
    return counts


# ------------------------------------------------------------------ the partial file
def read_partial(path: str, settings: dict) -> dict[int, list]:
    """Row index -> its k rewards, from a previous (possibly interrupted) run; {} when there is none.

    A new file is started with the settings as its first line. A torn last line (a crash mid-write) is dropped.
    """
    if not os.path.exists(path):
        _write_atomically(path, json.dumps({"settings": settings}) + "\n")
        return {}
    with open(path) as f:
        text = f.read()
    lines = text.split("\n")
    complete, torn = lines[:-1], lines[-1]  # text written by whole lines ends with "\n": the tail must be empty
    header = _parse(complete[0]) if complete else None
    if header is None or "settings" not in header:
        raise ValueError(f"--out: {path!r} is not a fastrl filter partial file; move it away or pick another --out")
    _check_same_settings(path, header["settings"], settings)
    done = {}
    for line in complete[1:]:
        record = _parse(line)
        if not _is_record(record):  # only the last line can be torn, and it has no "\n"; anything else is corruption
            raise ValueError(f"--out: {path!r} holds an unreadable line {line[:80]!r} (expected {{\"row\": int, "
                             "\"rewards\": [...]}); move it away to start over")
        done.setdefault(record["row"], [math.nan if r is None else r for r in record["rewards"]])
    if torn:
        _write_atomically(path, "\n".join(complete) + "\n")
    return done


def _check_same_settings(path: str, saved: dict, settings: dict) -> None:
    changed = {k: (saved.get(k), v) for k, v in settings.items() if saved.get(k) != v}
    if changed:
        said = ", ".join(f"{k}: {old!r} then, {new!r} now" for k, (old, new) in changed.items())
        raise ValueError(f"--out: the partial results in {path!r} were made with other settings ({said}); "
                         "rerun with the same settings, or move the file away to start over")


def append_records(path: str, records: dict[int, list[float]]) -> None:
    """One batch of rows as one write, flushed to disk before the next batch starts."""
    text = "".join(json.dumps({"row": i, "rewards": [None if math.isnan(r) else r for r in rewards]}) + "\n"
                   for i, rewards in records.items())
    with open(path, "a") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _is_record(record) -> bool:
    return (isinstance(record, dict) and isinstance(record.get("row"), int) and isinstance(record.get("rewards"), list)
            and all(r is None or isinstance(r, (int, float)) for r in record["rewards"]))


def _parse(line: str) -> dict | None:
    try:
        value = json.loads(line)
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


def _write_atomically(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
