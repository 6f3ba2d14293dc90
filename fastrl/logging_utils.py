"""Where per-step metrics go: OUTPUT_DIR/metrics.jsonl, a progress bar, tensorboard/wandb, and curves.png.

metrics.jsonl has one JSON object per optimizer step (always every step, whatever logging_steps says), each with
"step" and "reward", and one per evaluation (its eval_* metrics and "step"). The progress bar and tensorboard/wandb get the averages over each logging_steps window, the
same dicts that go into state.log_history (TRL's behaviour).

With log_completions=True, each logging step also appends the latest generation batch to
OUTPUT_DIR/completions.jsonl, one JSON object per completion with TRL's completions-table columns (step, prompt,
completion, one column per reward function, advantage, then any log_extra columns; an unscorable reward is
null), and prints it as a rich table (num_completions_to_print rows, drawn at random as TRL does; all when None).
TRL writes the same table as a parquet file per step under OUTPUT_DIR/completions/.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import random

from tqdm.auto import tqdm

CURVES = (("reward", "reward"), ("kl", "KL to reference"), ("completions/mean_length", "completion length"))


def _finite(v):
    return v if not (isinstance(v, float) and (math.isnan(v) or math.isinf(v))) else None


class MetricsLogger:
    def __init__(self, output_dir: str, report_to: list[str], run_name: str | None, total_steps: int,
                 initial_step: int, disable_tqdm: bool = False, config: dict | None = None,
                 log_completions: bool = False, logging_dir: str | None = None):
        os.makedirs(output_dir, exist_ok=True)
        self.output_dir = output_dir
        self.jsonl_path = os.path.join(output_dir, "metrics.jsonl")
        self.completions_path = os.path.join(output_dir, "completions.jsonl")
        _truncate_jsonl(self.jsonl_path, keep_through_step=initial_step)  # a resumed run rewrites later steps
        if log_completions:
            _truncate_jsonl(self.completions_path, keep_through_step=initial_step)
        self.progress = tqdm(total=total_steps, initial=initial_step, desc="GRPO", disable=disable_tqdm,
                             dynamic_ncols=True)
        tensorboard_dir = logging_dir or os.path.join(output_dir, "runs", run_name or "fastrl")
        self.backends = self._open_backends(report_to, run_name, config, tensorboard_dir)

    def _open_backends(self, report_to, run_name, config, tensorboard_dir: str) -> list:
        if "all" in report_to:  # transformers' meaning: every supported integration that is installed
            wanted = {name for name in ("tensorboard", "wandb") if importlib.util.find_spec(name) is not None}
        else:
            wanted = set(report_to)
        unknown = wanted - {"tensorboard", "wandb"}
        if unknown:
            raise ValueError(f"report_to: {sorted(unknown)} not supported; use 'tensorboard', 'wandb' or 'none'")
        backends = []
        if "tensorboard" in wanted:
            if importlib.util.find_spec("tensorboard") is None and importlib.util.find_spec("tensorboardX") is None:
                raise ValueError("report_to: 'tensorboard' is named but tensorboard is not installed")
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(log_dir=tensorboard_dir)
            backends.append(("tensorboard", writer))
        if "wandb" in wanted:
            if importlib.util.find_spec("wandb") is None:
                raise ValueError("report_to: 'wandb' is named but wandb is not installed")
            import wandb

            backends.append(("wandb", wandb.init(name=run_name, config=config, reinit=True)))
        return backends

    def step(self, step: int, metrics: dict) -> None:
        """Every optimizer step: one line of metrics.jsonl and a progress-bar tick."""
        append_jsonl(self.jsonl_path, {"step": step, **metrics})
        self.progress.update(1)

    def evaluation(self, step: int, metrics: dict) -> None:
        """After each evaluation: its eval_* metrics as one more line of metrics.jsonl, and to the dashboards."""
        append_jsonl(self.jsonl_path, {"step": step, **metrics})
        self._to_backends(step, metrics)

    def window(self, step: int, averaged: dict) -> None:
        """Every logging_steps: the averaged metrics to the bar and the dashboards."""
        shown = {k: averaged[k] for k in ("loss", "reward", "kl") if averaged.get(k) is not None}
        self.progress.set_postfix({k: f"{v:.4g}" for k, v in shown.items()}, refresh=False)
        self._to_backends(step, {f"train/{k}": v for k, v in averaged.items()})

    def _to_backends(self, step: int, metrics: dict) -> None:
        """Numbers to tensorboard/wandb; eval_x is logged as eval/x (transformers' rewrite)."""
        numbers = {k.replace("eval_", "eval/", 1) if k.startswith("eval_") else k: v for k, v in metrics.items()
                   if isinstance(v, (int, float)) and _finite(v) is not None}
        for kind, backend in self.backends:
            if kind == "tensorboard":
                for k, v in numbers.items():
                    backend.add_scalar(k, v, step)
            else:
                backend.log(numbers, step=step)

    def completions(self, step: int, records: list[dict], num_to_print: int | None = None,
                    unique_prompts: bool = False) -> None:
        """Every logging step (log_completions): the records to completions.jsonl, and a sample of them printed."""
        with open(self.completions_path, "a") as f:
            for r in records:
                row = {"step": step, **{k: _finite(v) for k, v in r.items()}}
                f.write(json.dumps(row, default=str) + "\n")
        print_completions(records, step, num_to_print, unique_prompts)

    def close(self) -> None:
        self.progress.close()
        for kind, backend in self.backends:
            backend.close() if kind == "tensorboard" else backend.finish()
        plot_curves(self.jsonl_path, os.path.join(self.output_dir, "curves.png"))


class NullLogger:
    """MetricsLogger's interface, doing nothing: what ranks other than 0 log through."""

    def step(self, step: int, metrics: dict) -> None:
        pass

    def evaluation(self, step: int, metrics: dict) -> None:
        pass

    def window(self, step: int, averaged: dict) -> None:
        pass

    def completions(self, *args, **kwargs) -> None:
        pass

    def close(self) -> None:
        pass


def print_completions(records: list[dict], step: int, num_to_print: int | None = None,
                      unique_prompts: bool = False) -> None:
    """A rich table of prompt, completion, rewards, advantage and log_extra columns, laid out as TRL's
    print_prompt_completions_sample lays it out; nothing without rich. The sample is drawn with its own generator:
    training's random state stays untouched."""
    if not records or (num_to_print is not None and num_to_print <= 0):
        return
    if importlib.util.find_spec("rich") is None:
        return
    from rich.console import Console
    from rich.panel import Panel
    from rich.table import Table

    if unique_prompts:  # the first completion of each prompt
        first = {}
        for r in records:
            first.setdefault(str(r["prompt"]), r)
        records = list(first.values())
    if num_to_print is not None and num_to_print < len(records):
        records = [records[i] for i in sorted(random.Random(step).sample(range(len(records)), num_to_print))]
    keys = [k for k in records[0] if k not in ("prompt", "completion")]  # rewards, advantage, then log_extra's
    scores = keys[:keys.index("advantage") + 1] if "advantage" in keys else keys
    table = Table(show_header=True, header_style="bold white", expand=True)
    table.add_column("Prompt", style="bright_yellow")
    table.add_column("Completion", style="bright_green")
    for k in keys:
        if k in scores:
            table.add_column(k.capitalize() if k == "advantage" else k, style="bold cyan", justify="right")
        else:
            table.add_column(k, style="bright_white")
    for r in records:
        table.add_row(_as_text(r["prompt"]), _as_text(r["completion"]),
                      *(_score(r[k]) if k in scores else _as_text(r[k]) for k in keys))
        table.add_section()
    Console().print(Panel(table, expand=False, title=f"Step {step}", border_style="bold white"))


def _score(value) -> str:
    """A reward or advantage cell: two decimals, None (an unscored completion) as '-'."""
    return "-" if value is None else f"{value:.2f}"


def _as_text(entry) -> str:
    """A prompt, completion or log_extra cell as TRL writes it: text as is; chat messages as ROLE lines, then each
    message's reasoning, content and tool calls (name(arg=value, ...)), messages a blank line apart."""
    if not (isinstance(entry, list) and all(isinstance(m, dict) for m in entry)):
        return str(entry)
    return "\n\n".join(_message_text(m) for m in entry)


def _message_text(message: dict) -> str:
    reasoning = message.get("reasoning_content") or message.get("thinking")
    content = message.get("content")
    if isinstance(content, list):  # typed blocks: text, images as [IMAGE]
        content = "".join(b.get("text", "") if b.get("type") == "text" else "[IMAGE]" if b.get("type") == "image"
                          else "" for b in content)
    calls = []
    for call in message.get("tool_calls", []):
        function = call.get("function", {})
        arguments = function.get("arguments", {})
        arguments = arguments if isinstance(arguments, dict) else json.loads(arguments)
        calls.append(f"{function.get('name', '?')}({', '.join(f'{k}={v!r}' for k, v in arguments.items())})")
    return (f"{message.get('role', '').upper()}\n" + (f"{reasoning}\n" if reasoning else "")
            + (content if isinstance(content, str) else "") + "\n".join(calls))


def append_jsonl(path: str, record: dict) -> None:
    """One JSON line; NaN and inf become null (JSON has neither)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps({k: _finite(v) for k, v in record.items()}) + "\n")


def read_jsonl(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _truncate_jsonl(path: str, keep_through_step: int) -> None:
    rows = [r for r in read_jsonl(path) if r["step"] <= keep_through_step]
    if keep_through_step == 0 or not rows:
        if os.path.exists(path):
            os.remove(path)
        return
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    os.replace(tmp, path)


def plot_curves(jsonl_path: str, png_path: str) -> str | None:
    """reward, KL and completion length against step (matplotlib Agg, no display needed); each eval set's values
    (eval_reward, eval_<set>_reward, ...) as points on the same axes."""
    rows = read_jsonl(jsonl_path)
    if not rows:
        return None
    # The Figure API renders with Agg and skips importing pyplot (seconds on a busy machine) and its global state.
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.2 * len(CURVES), 3.2))
    axes = fig.subplots(1, len(CURVES))
    for ax, (key, title) in zip(axes, CURVES):
        points = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
        if points:
            ax.plot(*zip(*points), lw=1.2, label="train")
        for name in sorted({k[:-len(key) - 1] for r in rows for k in r if k.startswith("eval") and
                            k.endswith("_" + key) and "/" not in k[:-len(key)]}):  # eval, eval_<set>
            ax.plot(*zip(*[(r["step"], r[f"{name}_{key}"]) for r in rows if r.get(f"{name}_{key}") is not None]),
                    "o-", ms=3, lw=1, label=name)
        if len(ax.get_lines()) > 1:
            ax.legend(fontsize=7)
        if not ax.get_lines():
            ax.text(0.5, 0.5, "not logged (beta = 0)" if key == "kl" else "not logged", ha="center",
                    va="center", transform=ax.transAxes)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    return png_path
