"""PNG plots next to a results CSV: for every (operation, mode, dtype, sweep), each metric against the sweep's
x (vocabulary size for the vocab sweep), one line per provider with its p20–p80 band; the GEMM floor dashed.
Groups with a single x (the headline case) get no plot: the table shows them."""
from __future__ import annotations

import os
from collections import OrderedDict

from .results import read_csv

PLOTTED = ("time", "memory", "steps_per_s", "tokens_per_s")
LABELS = {"time": "time", "memory": "peak memory above inputs", "steps_per_s": "steps per second",
          "tokens_per_s": "completion tokens per second"}


def write_plots(rows_or_path, out_dir: str, prefix: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_csv(rows_or_path) if isinstance(rows_or_path, str) else rows_or_path
    groups: "OrderedDict[tuple, list[dict]]" = OrderedDict()
    for r in rows:
        if r["metric"] in PLOTTED and r["p50"] is not None:
            key = (r["operation"], r["mode"], r["config"].get("dtype", ""), r["config"].get("sweep", ""), r["x_name"])
            groups.setdefault(key, []).append(r)
    paths = []
    for (operation, mode, dtype, sweep, x_name), group in groups.items():
        if len({r["x_value"] for r in group}) < 2:  # a single case (the headline) is a table, not a curve
            continue
        metrics = [m for m in PLOTTED if any(r["metric"] == m for r in group)]
        fig, axes = plt.subplots(1, len(metrics), figsize=(5.2 * len(metrics), 4), squeeze=False)
        for ax, metric in zip(axes[0], metrics):
            by_provider: "OrderedDict[str, list[dict]]" = OrderedDict()
            for r in group:
                if r["metric"] == metric:
                    by_provider.setdefault(r["provider"], []).append(r)
            for provider, pts in by_provider.items():
                pts.sort(key=lambda r: r["x_value"])
                xs = [r["x_value"] for r in pts]
                style = dict(linestyle="--", color="gray") if provider == "floor" else {}
                line, = ax.plot(xs, [r["p50"] for r in pts], marker="o", label=provider, **style)
                lo = [r["p20"] if r["p20"] is not None else r["p50"] for r in pts]
                hi = [r["p80"] if r["p80"] is not None else r["p50"] for r in pts]
                ax.fill_between(xs, lo, hi, alpha=0.15, color=line.get_color())
            unit = next(r["unit"] for r in group if r["metric"] == metric)
            ax.set_title(f"{LABELS.get(metric, metric)}")
            ax.set_xlabel(x_name)
            ax.set_ylabel(unit)
            ax.set_xscale("log", base=2)
            ax.set_ylim(bottom=0)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        device = group[0]["device"]
        fig.suptitle(f"{operation} · {mode} · {dtype} · {sweep} sweep — {device}", fontsize=9)
        fig.tight_layout()
        name = "_".join(s for s in (prefix, operation, mode, dtype, sweep) if s) + ".png"
        path = os.path.join(out_dir, name)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths
