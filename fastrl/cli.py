"""The `fastrl` command.

    fastrl train CONFIG.yaml [--field value ...]
    fastrl filter CONFIG.yaml --k 8
    fastrl plan CONFIG.yaml --memory 24GB [--device cuda|cpu] [--predict-time]
    fastrl bench [--suite kernels|e2e|all] [--quick]

Each subcommand is one entry of COMMANDS: the module holding it and the names of two functions there,
`add(parser)` to declare its arguments and `run(args) -> int` to execute it. Keep a command module's top level
light (import torch, transformers, vLLM inside `run`), since building the parser imports every command module.
To add one, add an entry; nothing else changes. A ValueError from `run` is printed
as `fastrl <command>: error: ...` with exit code 2; a run stopped by a reward function that raised or by a
non-finite loss, gradient or weight prints the same line with exit code 1.
"""
from __future__ import annotations

import argparse
import importlib
import sys
import traceback
from typing import NamedTuple


class Command(NamedTuple):
    module: str
    add: str  # function(parser) declaring the arguments
    run: str  # function(args: argparse.Namespace) -> int exit code
    help: str


COMMANDS: dict[str, Command] = {
    "train": Command("fastrl.cli", "add_train_arguments", "run_train",
                     "train with GRPO from a YAML config; --field value overrides any key"),
    "filter": Command("fastrl.filtering", "add_filter_arguments", "run_filter",
                      "difficulty filtering: keep the prompts the starting policy solves sometimes, not always"),
    "plan": Command("fastrl.plan.cli", "add_plan_arguments", "run_plan",
                    "predict a run's peak memory from its config and say whether it fits (exit 0 fits, 1 not)"),
    "bench": Command("fastrl.bench.cli", "add_arguments", "run",
                     "benchmark kernels and whole training steps against their peers; writes CSV + PNG"),
}


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML file: model, task/task_args or dataset, rewards, GRPOConfig fields")
    parser.epilog = "Any other --field value (or --field=value) overrides that key of the config (YAML value)."
    parser.set_defaults(accepts_overrides=True)


def run_train(args: argparse.Namespace) -> int:
    from fastrl.output_dir import check_earlier_run
    from fastrl.run_config import build_trainer, load_run_config, parse_overrides, split_run_config

    raw = load_run_config(args.config, parse_overrides(args.overrides))
    _, config = split_run_config(raw)  # every value checked before anything loads
    if not config.overwrite_output_dir:  # an earlier run is refused before the tiny model is written over it
        check_earlier_run(config.output_dir, config.resume_from_checkpoint not in (None, False), False)
    from fastrl import distributed

    trainer = build_trainer(raw)
    try:
        trainer.train()
        trainer.save_model()
    finally:
        if hasattr(trainer.generator, "close"):  # vLLM: its shutdown destroys the process groups it used
            trainer.generator.close()
        distributed.shutdown()  # a launched run's process group (nothing for one process)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastrl", description="A fast, lean GRPO trainer.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, cmd in COMMANDS.items():
        p = sub.add_parser(name, help=cmd.help, description=cmd.help)
        _function(cmd, "add")(p)
    return parser


def _function(cmd: Command, which: str):
    return getattr(importlib.import_module(cmd.module), getattr(cmd, which))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "accepts_overrides", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.overrides = extra
    from fastrl.scoring import RewardFunctionError

    try:
        return _function(COMMANDS[args.command], "run")(args)
    except ValueError as e:
        print(f"fastrl {args.command}: error: {e}", file=sys.stderr)
        return 2
    except (RewardFunctionError, FloatingPointError) as e:  # the run stopped: say why, with the user code's trace
        if e.__cause__ is not None:
            traceback.print_exception(e.__cause__, file=sys.stderr)
        print(f"fastrl {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
