"""`fastrl bench [--suite kernels|e2e|all] [--quick] [--out bench/results]`.

Writes <out>/<suite>.csv (<suite>-quick.csv for --quick, so a quick look never overwrites a full record), PNG
plots beside it, and prints the README tables. For the `fastrl` command: COMMANDS entry
`Command("fastrl.bench.cli", "add_arguments", "run", ...)`; standalone: `python -m fastrl.bench.cli ...`.
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import replace

SUITES = ("kernels", "e2e", "all")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--suite", choices=SUITES, default="all", help="which suite to run (default: all)")
    parser.add_argument("--quick", action="store_true",
                        help="a few representative cases (< 5 minutes on a quiet 2-core CPU); writes *-quick.csv")
    parser.add_argument("--out", default=os.path.join("bench", "results"), help="folder for CSV and PNG files")
    parser.add_argument("--providers", default=None,
                        help="comma-separated kernel providers (default: all; see fastrl.bench.providers)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--no-memory", action="store_true", help="time only, no memory processes (kernels and e2e)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--match", default=None,
                        help="only cases whose id (kernels: grpo_loss-full-fp32-B4-T256-H256-V65536) or size (e2e: "
                             "tiny-v32k, qwen2.5-0.5b-full, ...) contains one of these comma-separated strings")
    parser.add_argument("--trainers", default=None, help="e2e: comma-separated trainers (default: all of "
                                                         "fastrl, fastrl-vllm, trl)")
    parser.add_argument("--one-process", action="store_true",
                        help="e2e: time and memory from one process per trainer, timed with the memory setting on "
                             "(which slows allocation): for runs where a process costs minutes")
    parser.add_argument("--max-steps", type=int, default=None,
                        help="e2e: steps per run instead of each case's own (1: one step, timed whole, warm-up in it)")
    parser.add_argument("--tag", default=None, help="write <suite>-<tag>.csv (and its plots) instead of <suite>.csv")


def run(args: argparse.Namespace, argv: list[str] | None = None) -> int:
    import torch

    from .goals import goal_lines
    from .plots import write_plots
    from .results import command_line, run_facts, write_csv
    from .table import render_table

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if argv is not None:
        command = command_line(argv)
    else:  # called by the `fastrl` command: record what the user typed
        command = command_line(sys.argv[1:], prog="fastrl")
    suites = ("kernels", "e2e") if args.suite == "all" else (args.suite,)
    suffix = ("-quick" if args.quick else "") + (f"-{args.tag}" if args.tag else "")
    for suite in suites:
        run_info = run_facts(command, device)
        if suite == "kernels":
            from .cases import suite_cases
            from .kernels import Settings, run_kernel_suite

            settings = Settings.for_quick_run(device) if args.quick else Settings(device=device)
            settings.providers = args.providers.split(",") if args.providers else None
            settings.memory = not args.no_memory
            cases = matching_cases(suite_cases(args.quick), args.match) if args.match else None  # None: all
            rows = run_kernel_suite(run_info, settings=settings, quick=args.quick, cases=cases,
                                    progress=not args.no_progress)
        else:
            from .e2e import TRAINERS, e2e_cases, run_e2e_suite

            cases = matching_cases(e2e_cases(args.quick), args.match, key=lambda c: c.size)
            if args.max_steps is not None:
                if args.max_steps < 1:
                    raise ValueError(f"--max-steps: expected a positive number of steps, got {args.max_steps}")
                cases = [replace(c, max_steps=args.max_steps) for c in cases]
            trainers = tuple(args.trainers.split(",")) if args.trainers else TRAINERS
            rows = run_e2e_suite(run_info, quick=args.quick, device=device, progress=not args.no_progress,
                                 cases=cases, trainers=trainers, one_process=args.one_process,
                                 memory=not args.no_memory)
        path = write_csv(rows, os.path.join(args.out, f"{suite}{suffix}.csv"))
        plots = write_plots(rows_from(path), args.out, f"{suite}{suffix}")
        if suite == "e2e":
            from .phases import write_phase_chart

            chart = write_phase_chart(rows_from(path), os.path.join(args.out, f"{suite}{suffix}_phases.png"))
            plots += [chart] if chart else []
        print(render_table(path))
        print("\n".join(goal_lines(rows_from(path))))
        print(f"wrote {path}" + "".join(f"\nwrote {p}" for p in plots))
    return 0


def matching_cases(cases: list, match: str | None, key=lambda c: c.case_id) -> list:
    """The cases whose key (a kernel case's case_id, an e2e case's size) contains one of the comma-separated
    strings in `match` (all when None)."""
    if match is None:
        return cases
    wanted = [m for m in match.split(",") if m]
    kept = [c for c in cases if any(m in key(c) for m in wanted)]
    if not kept:
        raise ValueError(f"--match: no case contains any of {wanted}; they look like {key(cases[0])}")
    return kept


def rows_from(path: str):
    from .results import read_csv

    return read_csv(path)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="fastrl bench", description="Benchmark fastrl against its peers.")
    add_arguments(parser)
    args = parser.parse_args(argv)
    return run(args, argv)


if __name__ == "__main__":
    sys.exit(main())
