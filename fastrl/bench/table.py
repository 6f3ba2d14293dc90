"""README tables from a results CSV: `python -m fastrl.bench.table bench/results/kernels.csv [--operation ...]`.

One table per measured case (operation, mode, dtype, shape), one line per provider, a column per metric; ratios
against fastrl (its Triton path when present, else its PyTorch path) and, for time, against the GEMM floor.
Providers that could not run are listed under the table with the reason.
"""
from __future__ import annotations

import argparse
import sys
from collections import OrderedDict

from .results import read_csv

METRIC_ORDER = ("time", "floor_ratio", "steps_per_s", "step_time", "tokens_per_s", "memory", "memory_beyond_grads")
HIDDEN_METRICS = ("gemm_rate",)
REFERENCES = ("fastrl-triton", "fastrl-torch", "fastrl")  # the first present is the "× fastrl" reference
HIGHER_IS_BETTER = ("steps_per_s", "tokens_per_s", "gemm_rate")


def _case_key(r: dict) -> tuple:
    c = r["config"]
    shape = tuple((k, c[k]) for k in ("B", "T", "H", "V", "N", "dtype", "size") if k in c)
    return (r["operation"], r["mode"], c.get("sweep", ""), shape)


def _num(x: float | None, digits: int = 3) -> str:
    if x is None:
        return "–"
    if abs(x) >= 100:
        return f"{x:,.0f}"
    return f"{x:.{digits}g}"


def _heading(r: dict) -> str:
    c = r["config"]
    parts = [r["operation"], r["mode"]]
    if "dtype" in c:
        parts.append(c["dtype"])
    shape = " ".join(f"{k}={c[k]}" for k in ("size", "B", "T", "H", "V", "vocab_size", "hidden_size", "num_layers",
                                              "per_device_train_batch_size", "num_generations",
                                              "max_completion_length") if k in c)
    if "N" in c:
        shape += f" (N={c['N']})"
    for k in ("loss_type", "beta"):
        if k in c:
            shape += f" {k}={c[k]}"
    return " · ".join(parts + [shape.strip(), c.get("sweep", "")]).strip(" ·")


def render_table(rows_or_path, *, operation: str | None = None, mode: str | None = None,
                 dtype: str | None = None, sweep: str | None = None) -> str:
    """Markdown for the rows of a results CSV (a path or rows from results.read_csv), optionally filtered."""
    rows = read_csv(rows_or_path) if isinstance(rows_or_path, str) else rows_or_path
    keep = [r for r in rows
            if (operation is None or r["operation"] == operation) and (mode is None or r["mode"] == mode)
            and (dtype is None or r["config"].get("dtype") == dtype)
            and (sweep is None or r["config"].get("sweep") == sweep)]
    groups: "OrderedDict[tuple, list[dict]]" = OrderedDict()
    for r in keep:
        groups.setdefault(_case_key(r), []).append(r)
    out = []
    for group in groups.values():
        out.append(_render_group(group))
    if keep:
        r0 = keep[0]
        out.append(f"Device: {r0['device']}. Measured {r0['timestamp']} by `{r0['command']}`. "
                   "Values: p50 [p20–p80]. Memory: peak RSS (CUDA: allocated) above the inputs for kernels, "
                   "above the built trainer for training steps.")
    return "\n\n".join(out) + "\n"


def _render_group(group: list[dict]) -> str:
    metrics = [m for m in METRIC_ORDER if any(r["metric"] == m for r in group)]
    metrics += sorted({r["metric"] for r in group} - set(metrics) - set(HIDDEN_METRICS)
                      - {"skipped", "memory_skipped"})
    providers = list(OrderedDict.fromkeys(r["provider"] for r in group if r["metric"] not in HIDDEN_METRICS))
    value = {(r["provider"], r["metric"]): r for r in group}
    unit = {r["metric"]: r["unit"] for r in group}
    ref = next((p for p in REFERENCES if (p, "time") in value or (p, "steps_per_s") in value), None)

    header = ["provider"]
    for m in metrics:
        header.append(f"{m} ({unit[m]})" if unit.get(m) else m)
        if ref and m in ("time", "memory", "steps_per_s", "tokens_per_s"):
            header.append(f"{m} × {ref}")
    lines = [f"**{_heading(group[0])}**", "", "| " + " | ".join(header) + " |",
             "|" + "---|" * len(header)]
    skipped = []
    for p in providers:
        if (p, "skipped") in value:
            skipped.append(f"- {p}: skipped, {value[(p, 'skipped')]['config'].get('reason', '')}")
            continue
        cells = [p]
        for m in metrics:
            r = value.get((p, m))
            if r is None or r["p50"] is None:
                cells.append("–")
            elif m in ("time", "step_time", "memory", "memory_beyond_grads") and r["p20"] is not None and r["p80"] is not None and r["p20"] != r["p80"]:
                cells.append(f"{_num(r['p50'])} [{_num(r['p20'])}–{_num(r['p80'])}]")
            else:
                cells.append(_num(r["p50"]))
            if ref and m in ("time", "memory", "steps_per_s", "tokens_per_s"):
                rr = value.get((ref, m))
                if r is None or rr is None or r["p50"] is None or not rr["p50"]:
                    cells.append("–")
                else:
                    cells.append(f"{r['p50'] / rr['p50']:.2f}")
        if (p, "memory_skipped") in value:
            cells[-1] += f" (memory not measured: {value[(p, 'memory_skipped')]['config'].get('reason', '')})"
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines + ([""] + skipped if skipped else []))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fastrl.bench.table", description=__doc__.splitlines()[0])
    ap.add_argument("csv", help="a results CSV written by `fastrl bench`")
    ap.add_argument("--operation")
    ap.add_argument("--mode")
    ap.add_argument("--dtype")
    ap.add_argument("--sweep")
    ap.add_argument("--goals", action="store_true", help="only the issue's goals: measured ratios, met or missed")
    args = ap.parse_args(argv)
    if args.goals:
        from .goals import goal_lines

        sys.stdout.write("\n".join(goal_lines(read_csv(args.csv))) + "\n")
        return 0
    sys.stdout.write(render_table(args.csv, operation=args.operation, mode=args.mode, dtype=args.dtype,
                                  sweep=args.sweep))
    return 0


if __name__ == "__main__":
    sys.exit(main())
