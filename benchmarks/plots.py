"""PNG plots (matplotlib, Agg backend, small files meant to be committed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

COLORS = {"collab": "#1f77b4", "collab-normal": "#17becf", "node": "#2ca02c", "pycrdt": "#d62728"}
DPI = 80


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def _timeline_axes(ax_rate, ax_lat, step: dict[str, Any], color: str | None = None, label: str = "") -> None:
    tl = step.get("timeline") or []
    t = [p["t"] for p in tl]
    ax_rate.plot(t, [p["in"] for p in tl], color=color or "#1f77b4", label=f"{label}updates in/s")
    ax_rate.plot(t, [p["out"] for p in tl], color=color or "#ff7f0e", linestyle="--", label=f"{label}frames out/s")
    ax_lat.plot(t, [p["p50_ms"] for p in tl], color=color or "#2ca02c", label=f"{label}p50")
    ax_lat.plot(t, [p["p99_ms"] for p in tl], color=color or "#d62728", linestyle="--", label=f"{label}p99")


def plot_load(step: dict[str, Any], path: Path, title: str = "") -> Path:
    """Throughput, latency, server CPU/RSS over one load step."""
    fig, (ax1, ax2, ax3) = plt.subplots(3, 1, figsize=(8, 7), sharex=True)
    _timeline_axes(ax1, ax2, step)
    ax1.set_ylabel("per second")
    ax1.legend(loc="lower right", fontsize=8)
    ax1.grid(alpha=0.3)
    ax2.set_ylabel("latency (ms)")
    ax2.set_yscale("log")
    ax2.axhline(50, color="grey", linewidth=0.8, linestyle=":")
    ax2.legend(loc="upper right", fontsize=8)
    ax2.grid(alpha=0.3, which="both")
    tl = step.get("timeline") or []
    t = [p["t"] for p in tl]
    cpu = [p.get("server_cpu_pct") for p in tl]
    rss = [p.get("server_rss_mb") for p in tl]
    if any(c is not None for c in cpu):
        ax3.plot(t, cpu, color="#9467bd", label="server CPU %")
        ax3.set_ylabel("CPU % of a core")
        ax3b = ax3.twinx()
        ax3b.plot(t, rss, color="#8c564b", linestyle="--", label="server RSS MiB")
        ax3b.set_ylabel("RSS (MiB)")
        ax3.legend(loc="upper left", fontsize=8)
        ax3b.legend(loc="upper right", fontsize=8)
    else:
        ax3.text(0.5, 0.5, "no server pid given: CPU/RSS not sampled", ha="center", va="center",
                 transform=ax3.transAxes)
    ax3.set_xlabel("seconds")
    ax3.grid(alpha=0.3)
    lat = step["latency_ms"]
    fig.suptitle(title or (f"{step.get('server') or step.get('url')}: {step['clients']} clients, "
                           f"{step['updates_in_per_s']:,.0f} updates/s in — p50 {lat['p50']} ms, p99 {lat['p99']} ms"),
                 fontsize=10)
    return _save(fig, path)


def plot_search(searches: dict[str, dict[str, Any]], path: Path, p99_limit: float = 50.0, title: str = "") -> Path:
    """p99 latency against achieved updates/s for each server's rate search."""
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for kind, search in searches.items():
        steps = [s for s in search["steps"]]
        steps.sort(key=lambda s: s["updates_in_per_s"])
        xs = [s["updates_in_per_s"] for s in steps]
        ys = [s["latency_ms"]["p99"] if s["latency_ms"]["p99"] is not None else 1e5 for s in steps]
        ax.plot(xs, ys, marker="o", color=COLORS.get(kind), label=search.get("label", kind))
        best = search.get("sustainable_updates_per_s")
        if best:
            ax.axvline(best, color=COLORS.get(kind), linewidth=0.8, linestyle=":")
    ax.axhline(p99_limit, color="grey", linestyle="--", linewidth=1, label=f"p99 = {p99_limit:g} ms")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("updates/s sent (all clients)")
    ax.set_ylabel("p99 sender→receiver latency (ms)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    ax.set_title(title or "throughput vs p99 latency (dotted: sustainable rate; 10⁵ ms: deliveries lost)", fontsize=10)
    return _save(fig, path)


def plot_compare(summary: dict[str, dict[str, Any]], searches: dict[str, dict[str, Any]], path: Path,
                 p99_limit: float = 50.0, title: str = "") -> Path:
    """The comparison figure: the rate search plus bars for the headline numbers."""
    fig = plt.figure(figsize=(11, 7))
    grid = fig.add_gridspec(2, 3)
    ax = fig.add_subplot(grid[0, :])
    for kind, search in searches.items():
        steps = sorted(search["steps"], key=lambda s: s["updates_in_per_s"])
        xs = [s["updates_in_per_s"] for s in steps]
        ys = [s["latency_ms"]["p99"] if s["latency_ms"]["p99"] is not None else 1e5 for s in steps]
        ax.plot(xs, ys, marker="o", color=COLORS.get(kind), label=summary[kind]["label"])
    ax.axhline(p99_limit, color="grey", linestyle="--", linewidth=1)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("updates/s sent")
    ax.set_ylabel("p99 latency (ms)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    ax.set_title("rate search (1 point per step; points at 10⁵ ms: deliveries lost)", fontsize=9)
    bars = [
        ("sustainable_updates_per_s", f"updates/s at p99 ≤ {p99_limit:g} ms"),
        ("idle_kb_per_connection", "KiB per idle connection"),
        ("cold_join_ms", "cold join (ms), automerge-paper"),
    ]
    kinds = list(summary)
    for i, (key, label) in enumerate(bars):
        axb = fig.add_subplot(grid[1, i])
        values = [summary[k].get(key) for k in kinds]
        xs = range(len(kinds))
        axb.bar(xs, [v or 0 for v in values], color=[COLORS.get(k) for k in kinds])
        for x, v in zip(xs, values):
            axb.text(x, (v or 0), "n/a" if v is None else f"{v:,.0f}" if v >= 10 else f"{v:.2g}",
                     ha="center", va="bottom", fontsize=8)
        axb.set_xticks(list(xs), [k for k in kinds], fontsize=8)
        axb.set_title(label, fontsize=9)
        axb.grid(alpha=0.3, axis="y")
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def plot_bench(load_step: dict[str, Any] | None, replays: list[dict[str, Any]], idle: dict[str, Any] | None,
               join: dict[str, Any] | None, path: Path, title: str = "") -> Path:
    """``make bench`` summary: the load run over time, replay rates against pycrdt, idle, join."""
    fig = plt.figure(figsize=(11, 7))
    grid = fig.add_gridspec(2, 3)
    if load_step is not None:
        ax1 = fig.add_subplot(grid[0, 0:2])
        ax2 = ax1.twinx()
        tl = load_step.get("timeline") or []
        t = [p["t"] for p in tl]
        ax1.plot(t, [p["in"] for p in tl], label="updates in/s", color="#1f77b4")
        ax1.plot(t, [p["out"] for p in tl], label="frames out/s", color="#ff7f0e")
        ax2.plot(t, [p["p99_ms"] for p in tl], label="p99 ms", color="#d62728", linestyle="--")
        ax2.plot(t, [p["p50_ms"] for p in tl], label="p50 ms", color="#2ca02c", linestyle="--")
        ax2.set_yscale("log")
        ax1.set_xlabel("seconds")
        ax1.set_ylabel("per second")
        ax2.set_ylabel("latency (ms)")
        ax1.legend(loc="lower left", fontsize=8)
        ax2.legend(loc="lower right", fontsize=8)
        ax1.set_title(f"load: {load_step['clients']} clients in {load_step['rooms']} rooms", fontsize=9)
        ax1.grid(alpha=0.3)
    ax3 = fig.add_subplot(grid[0, 2])
    if replays:
        labels, values = [], []
        ref = next((r.get("pycrdt_inprocess_txns_per_s") for r in replays if r.get("pycrdt_inprocess_txns_per_s")), None)
        if ref:
            labels.append("pycrdt\nin-process")
            values.append(ref)
        for r in replays:
            labels.append(f"{r['trace'][:10]}\n{r['writers']}w {r['pace']}")
            values.append(r.get("updates_per_s") or 0)
        ax3.bar(range(len(values)), values, color=["#7f7f7f"] + ["#1f77b4"] * (len(values) - 1))
        ax3.set_xticks(range(len(values)), labels, fontsize=7)
        if ref:
            ax3.axhline(0.7 * ref, color="grey", linestyle="--", linewidth=1, label="70% target")
            ax3.legend(fontsize=7)
        ax3.set_title("replay: updates/s", fontsize=9)
        ax3.grid(alpha=0.3, axis="y")
    ax4 = fig.add_subplot(grid[1, 0])
    if idle is not None:
        ax4.bar([0, 1], [idle["per_connection_kb"], idle["per_room_kb"]], color=["#1f77b4", "#9467bd"])
        ax4.set_xticks([0, 1], ["per idle\nconnection", f"per room\n(+{idle['doc_chars']} chars)"], fontsize=8)
        ax4.axhline(30, color="grey", linestyle="--", linewidth=1, label="30 KB target")
        ax4.legend(fontsize=7)
        ax4.set_title(f"memory (KiB), {idle['opened']:,} connections", fontsize=9)
        ax4.grid(alpha=0.3, axis="y")
    ax5 = fig.add_subplot(grid[1, 1])
    if join is not None:
        vals = [join["warm_ms"]["median"] or 0, join["cold_ms"]["median"] or 0]
        ax5.bar([0, 1], vals, color=["#2ca02c", "#d62728"])
        ax5.set_xticks([0, 1], ["warm", "cold"], fontsize=8)
        for x, v in enumerate(vals):
            ax5.text(x, v, f"{v:.0f}", ha="center", va="bottom", fontsize=8)
        ax5.set_title(f"join automerge-paper doc (ms), cold/warm {join.get('cold_over_warm')}", fontsize=9)
        ax5.grid(alpha=0.3, axis="y")
    ax6 = fig.add_subplot(grid[1, 2])
    lat = [(f"{r['trace'][:10]} {r['writers']}w {r['pace']}", r["latency_ms"]) for r in replays]
    if load_step is not None:
        lat.insert(0, ("load", load_step["latency_ms"]))
    for i, (label, p) in enumerate(lat):
        ax6.bar([i - 0.2, i + 0.2], [p.get("p50") or 0, p.get("p99") or 0], width=0.4,
                color=["#2ca02c", "#d62728"])
    ax6.set_xticks(range(len(lat)), [lbl for lbl, _ in lat], fontsize=6, rotation=15)
    ax6.set_yscale("log")
    ax6.set_title("latency p50 (green) / p99 (red), ms", fontsize=9)
    ax6.grid(alpha=0.3, axis="y", which="both")
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def plot_replay(result: dict[str, Any], path: Path) -> Path:
    """Updates delivered to the slowest reader over time, against pycrdt's in-process pace."""
    fig, ax = plt.subplots(figsize=(8, 4.5))
    tl = result.get("timeline") or []
    ax.plot([p["t"] for p in tl], [p["delivered"] for p in tl], color="#1f77b4", label="delivered to every reader")
    ref = result.get("pycrdt_inprocess_txns_per_s")
    if ref and tl:
        end = tl[-1]["t"]
        ax.plot([0, min(end, result["updates"] / ref)], [0, min(end * ref, result["updates"])], color="grey",
                linestyle="--", label=f"pycrdt alone in-process ({ref:,.0f}/s)")
    ax.set_xlabel("seconds")
    ax.set_ylabel("updates")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    p = result["latency_ms"]
    ax.set_title(f"replay {result['trace']}: {result['writers']} writer(s), {result['pace']} — "
                 f"{result.get('updates_per_s') or 0:,.0f} updates/s, p50 {p['p50']} ms, p99 {p['p99']} ms", fontsize=9)
    return _save(fig, path)


def plot_bars(values: dict[str, float | None], path: Path, title: str, ylabel: str,
              target: float | None = None) -> Path:
    fig, ax = plt.subplots(figsize=(6, 4))
    names = list(values)
    ax.bar(range(len(names)), [values[n] or 0 for n in names], color="#1f77b4")
    for i, n in enumerate(names):
        v = values[n]
        ax.text(i, v or 0, "n/a" if v is None else f"{v:,.1f}", ha="center", va="bottom", fontsize=8)
    if target is not None:
        ax.axhline(target, color="grey", linestyle="--", linewidth=1, label=f"target {target:g}")
        ax.legend(fontsize=8)
    ax.set_xticks(range(len(names)), names, fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3, axis="y")
    return _save(fig, path)
