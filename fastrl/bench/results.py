"""The long-format results CSV (Liger's benchmark layout) and the facts recorded with every row.

One row per (operation, provider, mode, metric, x): p20/p50/p80 of the metric, the full case as JSON in
`config`, the device, the package versions, when, the command that produced it and the git commit of the code it
measured (`git_commit`: "-dirty" when tracked files differ from that commit). Rows whose provider could
not run carry metric "skipped", no values, and the reason in config["reason"].
"""
from __future__ import annotations

import csv
import datetime as _dt
import json
import os
import platform
import shlex
import subprocess
from importlib import metadata

COLUMNS = ["operation", "provider", "mode", "metric", "unit", "x_name", "x_value", "p20", "p50", "p80",
           "config", "device", "versions", "timestamp", "command", "commit"]
VERSIONED = ("fastrl", "torch", "triton", "transformers", "trl", "liger-kernel", "cut-cross-entropy")


def versions() -> str:
    out = {}
    for dist in VERSIONED:
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    out["python"] = platform.python_version()
    return json.dumps(out, sort_keys=True)


def device_name(device: str = "cpu") -> str:
    import torch

    if device.startswith("cuda"):
        return f"cuda: {torch.cuda.get_device_name(torch.device(device))}"
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"cpu: {model}, {torch.get_num_threads()} threads"


def git_commit() -> str:
    """The commit of the fastrl checkout being measured ("<hash>-dirty" with uncommitted changes to tracked files),
    or "unknown" outside a git checkout (an installed wheel)."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        head = subprocess.run(["git", "-C", root, "rev-parse", "--short=12", "HEAD"], capture_output=True,
                              text=True, timeout=30, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=30, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + ("-dirty" if dirty else "")


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def command_line(argv: list[str] | None, prog: str = "fastrl bench") -> str:
    return " ".join([prog] + [shlex.quote(a) for a in (argv or [])])


def row(*, operation, provider, mode, metric, unit, x_name, x_value, values=None, config: dict, run: dict) -> dict:
    """One CSV row; `run` holds device, versions, timestamp, command, commit (the same for a whole run)."""
    p20, p50, p80 = values if values is not None else ("", "", "")
    return {"operation": operation, "provider": provider, "mode": mode, "metric": metric, "unit": unit,
            "x_name": x_name, "x_value": x_value, "p20": p20, "p50": p50, "p80": p80,
            "config": json.dumps(config, sort_keys=True), "device": run["device"], "versions": run["versions"],
            "timestamp": run["timestamp"], "command": run["command"], "commit": run["commit"]}


def run_facts(command: str, device: str = "cpu") -> dict:
    return {"device": device_name(device), "versions": versions(), "timestamp": now(), "command": command,
            "commit": git_commit()}


def write_csv(rows: list[dict], path: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({k: _fmt(r.get(k, "")) for k in COLUMNS})
    os.replace(tmp, path)
    return path


def _fmt(v):
    return f"{v:.6g}" if isinstance(v, float) else v


def read_csv(path: str) -> list[dict]:
    """Rows with p20/p50/p80 and x_value as numbers (None when empty) and config parsed."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        missing = [c for c in COLUMNS if c not in r]
        if missing:
            raise ValueError(f"{path}: not a fastrl results CSV (missing columns {missing})")
        for k in ("p20", "p50", "p80"):
            r[k] = float(r[k]) if r[k] not in ("", None) else None
        r["x_value"] = int(float(r["x_value"])) if r["x_value"] not in ("", None) else None
        r["config"] = json.loads(r["config"]) if r["config"] else {}
    return rows
