"""Code-sandbox throughput (issue 13): how fast code_reward scores completions, and whether the trainer stays flat.

    python -m fastrl.bench.sandbox                 # -> bench/results/sandbox.csv (about 10 minutes on 2 cores)
    python -m fastrl.bench.sandbox --quick --out /tmp/sandbox.csv    # a few seconds (the test runs this)

Scenarios, each one CodeReward call on 64 completions x 10 stdin/stdout cases in the strong (bwrap) sandbox:
- trivial: read two integers, print the sum (what is left is the sandbox's own cost), at max_workers 1, 2, 4;
- near-limit: each case busy-loops 80% of its 0.25 s time limit before it answers, at max_workers 2.
Then flat: 1,000 calls of one completion x 2 cases; this process's RSS and open descriptors after call 10 and
after the last call, and the sandbox processes left at the end (must be none).
Rows: completions/s, cases/s and mean reward (must be 1.0: every program is right) per scenario; RSS and fds.
The config of every row records the commit and the load average around the run: on a shared machine the
numbers are lower bounds of what the sandbox can do.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

from fastrl.bench.results import command_line, row, run_facts, write_csv
from fastrl.rewards import CodeReward, SandboxLimits

DEFAULT_OUT = os.path.join("bench", "results", "sandbox.csv")
TRIVIAL = "a, b = map(int, input().split())\nprint(a + b)"
NEAR_LIMIT = ("import time\nend = time.perf_counter() + {busy}\nwhile time.perf_counter() < end:\n    pass\n"
              "a, b = map(int, input().split())\nprint(a + b)")


def completion(program: str) -> str:
    return f"```python\n{program}\n```"


def sum_cases(n: int) -> list[dict]:
    return [{"input": f"{i} {2 * i}\n", "output": f"{3 * i}\n"} for i in range(n)]


def score_batch(program: str, completions: int, cases: int, limits: SandboxLimits, workers: int) -> dict:
    """One code_reward call on `completions` copies of `program`; its time, rates and mean reward."""
    reward = CodeReward(limits, max_workers=workers)
    tests = [sum_cases(cases)] * completions
    start = time.perf_counter()
    values = reward([completion(program)] * completions, tests=tests)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "completions_per_s": completions / seconds,
            "cases_per_s": completions * cases / seconds, "mean_reward": sum(values) / len(values)}


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def flat_over_calls(calls: int, limits: SandboxLimits) -> dict:
    """RSS and fds after call 10 and after `calls` calls of one completion x 2 cases."""
    reward = CodeReward(limits, max_workers=1)
    tests = [sum_cases(2)]
    first = None
    for call in range(1, calls + 1):
        assert reward([completion(TRIVIAL)], tests=tests) == [1.0]
        if call == min(10, calls):
            first = rss_mib(), open_fds()
    return {"rss_mib_first": first[0], "rss_mib_last": rss_mib(), "fds_first": first[1], "fds_last": open_fds()}


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(os.path.abspath(__file__)), timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def run(quick: bool) -> list[tuple[str, int, dict, dict]]:
    """(scenario, max_workers, config, measured) per measurement."""
    completions, cases, calls = (4, 2, 20) if quick else (64, 10, 1000)
    trivial_limits, near_limits = SandboxLimits(timeout=2.0), SandboxLimits(timeout=0.25)
    near = NEAR_LIMIT.format(busy=0.8 * near_limits.timeout)
    measured = []
    for scenario, program, limits, workers_list in (("trivial", TRIVIAL, trivial_limits, (1, 2, 4)),
                                                    ("near-limit", near, near_limits, (2,))):
        for workers in workers_list:
            config = {"completions": completions, "cases": cases, "timeout_s": limits.timeout}
            measured.append((scenario, workers, config, score_batch(program, completions, cases, limits, workers)))
    measured.append(("flat", 1, {"calls": calls, "completions": 1, "cases": 2}, flat_over_calls(calls, trivial_limits)))
    return measured


UNITS = {"seconds": "s", "completions_per_s": "1/s", "cases_per_s": "1/s", "mean_reward": "", "rss_mib_first": "MiB",
         "rss_mib_last": "MiB", "fds_first": "count", "fds_last": "count"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastrl.bench.sandbox", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="4 completions x 2 cases, 20 calls")
    parser.add_argument("--out", default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    facts = run_facts(command_line(argv, "python -m fastrl.bench.sandbox"))
    load_before = os.getloadavg()[0]
    measured = run(args.quick)
    shared = {"commit": commit(), "isolation": "bwrap", "load_average_1min": [round(load_before, 2),
                                                                                round(os.getloadavg()[0], 2)],
              "cpus": os.cpu_count()}
    rows = [row(operation="code_reward", provider="bwrap", mode=scenario, metric=metric, unit=UNITS[metric],
                x_name="max_workers", x_value=workers, values=("", value, ""), config={**config, **shared},
                run=facts)
            for scenario, workers, config, values in measured for metric, value in values.items()]
    print(write_csv(rows, args.out))
    for scenario, workers, _, values in measured:
        print(scenario, f"workers={workers}", {k: round(v, 3) for k, v in values.items()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
