"""Issue 5's goals checked against a results CSV, as README-ready lines that give the measured ratio either way
and, for a miss, by how much. `python -m fastrl.bench.table CSV --goals`.

Kernel goals (CPU, fp32, forward+backward, headline case B=8 T=256 H=256 V=32768, beta 0.04, dapo):
time ≤ the fastest peer (aim 0.9×), within 1.3× of the GEMM floor, peak memory ≤ 10% of the materializing path's
and flat in V. End to end at vocabulary 32768: ≥ 1.5× TRL's steps/s, ≤ 50% of its peak memory.
"""
from __future__ import annotations

PEERS = ("torch-materialize", "liger", "liger-compiled", "trl-chunked", "cce")
FASTRL = ("fastrl-triton", "fastrl-torch")


def _p50(rows, provider, metric, **where):
    for r in rows:
        if r["provider"] == provider and r["metric"] == metric and r["p50"] is not None and all(
                (r["config"].get(k) if k not in r else r[k]) == v for k, v in where.items()):
            return r["p50"]
    return None


def _verdict(value: float, limit: float, lower_is_better: bool = True) -> str:
    ok = value <= limit if lower_is_better else value >= limit
    if ok:
        return "met"
    return f"missed by {value / limit:.2f}×" if lower_is_better else f"missed by {limit / value:.2f}×"


def goal_lines(rows: list[dict]) -> list[str]:
    lines = []
    head = dict(sweep="headline", mode="full", dtype="float32")
    ours = next((p for p in FASTRL if _p50(rows, p, "time", **head) is not None), None)
    if ours:
        t = _p50(rows, ours, "time", **head)
        peers = {p: _p50(rows, p, "time", **head) for p in PEERS}
        peers = {p: v for p, v in peers.items() if v is not None}
        if peers:
            best = min(peers, key=peers.get)
            ratio = t / peers[best]
            lines.append(f"- time vs the fastest peer ({best}, {peers[best]:.4g} ms): {ratio:.2f}× "
                         f"(goal ≤ 1.00, aim 0.90): {_verdict(ratio, 1.0)}")
        fr = _p50(rows, ours, "floor_ratio", **head)
        if fr is not None:
            lines.append(f"- time vs the GEMM floor: {fr:.2f}× (goal ≤ 1.30): {_verdict(fr, 1.3)}")
        m, mm = _p50(rows, ours, "memory", **head), _p50(rows, "torch-materialize", "memory", **head)
        if m is not None and mm:
            lines.append(f"- peak memory above inputs: {m:.1f} MiB vs materializing {mm:.1f} MiB = {m / mm:.1%} "
                         f"(goal ≤ 10%): {_verdict(m / mm, 0.10)}")
        flat = sorted((r["x_value"], r["p50"]) for r in rows if r["provider"] == ours
                      and r["metric"] == "memory_beyond_grads" and r["config"].get("sweep") == "vocab"
                      and r["mode"] == "full" and r["operation"] == "grpo_loss"
                      and r["config"].get("dtype") == "float32")
        if len(flat) > 1:
            pts = ", ".join(f"V={v}: {mib:.1f} MiB" for v, mib in flat)
            growth = flat[-1][1] - flat[0][1]
            lines.append(f"- memory beyond the returned gradients (dh, dW) against V (grpo_loss, full, fp32): {pts}; "
                         f"+{growth:.1f} MiB from V={flat[0][0]} to V={flat[-1][0]} (goal: flat)")
        lines[0:0] = [f"Kernel goals ({ours}, headline case):"] if lines else []
    e2e = [r for r in rows if r["operation"] == "grpo_train_step" and r["x_value"] == 32768]
    if e2e:
        size = e2e[0]["config"].get("size")
        sel = dict(size=size)
        s_f, s_t = _p50(e2e, "fastrl", "steps_per_s", **sel), _p50(e2e, "trl", "steps_per_s", **sel)
        m_f, m_t = _p50(e2e, "fastrl", "memory", **sel), _p50(e2e, "trl", "memory", **sel)
        lines.append(f"End-to-end goals ({size}, vocabulary 32768):")
        if s_f and s_t:
            lines.append(f"- steps/s vs TRL: {s_f / s_t:.2f}× (goal ≥ 1.50): {_verdict(s_f / s_t, 1.5, False)}")
        if m_f is not None and m_t:
            lines.append(f"- peak memory vs TRL: {m_f / m_t:.0%} (goal ≤ 50%): {_verdict(m_f / m_t, 0.5)}")
    return lines
