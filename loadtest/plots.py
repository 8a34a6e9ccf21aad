"""PNG plots of one ``python -m fraudstream.loadtest`` run (matplotlib, Agg backend: no display
needed).

Each function takes plain data from the run (see ``loadtest/report.py``) and writes one
file; :func:`write_all` writes them all into the run's results folder.

- ``latency.png``: end-to-end p50/p90/p99 per 1 s bucket (by receive time) over the live
  runs, the budget as a horizontal line, each run's start (solid) and end of sending
  (dotted) marked and labelled with its rate;
- ``throughput.png``: sent/s and decided/s per 1 s bucket, the backlog (sent - received) on
  a second axis;
- ``latency_cdf.png``: the end-to-end latency CDF of each run;
- ``rss.png``: each worker's RSS (its process and children) over its whole life; with a
  worker per run, the workers one after the other.

With a fresh broker per run the buckets' times are re-based: each run's counted from its
own start and placed after the one before (``xlabel`` says so).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)

#: at most this many points per CDF line (the sorted latencies are thinned evenly)
CDF_POINTS = 2000


def _mark_runs(ax: Any, runs: Sequence[dict], label: bool = True) -> None:
    """Vertical lines at each run's start (solid) and end of sending (dotted)."""
    for run in runs:
        ax.axvline(run["start_s"], color="0.55", linewidth=0.8)
        ax.axvline(run["end_s"], color="0.55", linewidth=0.8, linestyle=":")
        if label:
            ax.text(run["start_s"], 1.0, f" {run['short']}", transform=ax.get_xaxis_transform(),
                    rotation=90, va="top", ha="left", fontsize=7, color="0.3")


XLABEL = "seconds since the first live run started"


def latency_timeline(path: Path, buckets: Sequence[dict], runs: Sequence[dict],
                     budget_ms: float, xlabel: str = XLABEL) -> Path:
    fig, ax = plt.subplots(figsize=(12, 5))
    for key, color in (("p50_ms", "tab:blue"), ("p90_ms", "tab:orange"), ("p99_ms", "tab:red")):
        pts = [(b["t"] + 0.5, b[key]) for b in buckets if b.get(key) is not None]
        if pts:
            ax.plot(*zip(*pts, strict=True), marker=".", markersize=3, linewidth=1,
                    color=color, label=key.removesuffix("_ms"))
    ax.axhline(budget_ms, color="black", linestyle="--", linewidth=1,
               label=f"budget {budget_ms:g} ms")
    _mark_runs(ax, runs)
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("end-to-end latency, ms (log)")
    ax.set_title("End-to-end latency per 1 s bucket (by receive time)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=4, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def throughput_timeline(path: Path, buckets: Sequence[dict], runs: Sequence[dict],
                        xlabel: str = XLABEL) -> Path:
    fig, ax = plt.subplots(figsize=(12, 5))
    ts = [b["t"] + 0.5 for b in buckets]
    ax.plot(ts, [b["sent"] for b in buckets], linewidth=1, color="tab:blue", label="sent/s")
    ax.plot(ts, [b["decided"] for b in buckets], linewidth=1, color="tab:green",
            label="decided/s (by decided_at)")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("events per second")
    backlog = [(b["t"] + 1.0, b["backlog"]) for b in buckets if b.get("backlog") is not None]
    ax2 = ax.twinx()
    if backlog:
        ax2.plot(*zip(*backlog, strict=True), linewidth=1, color="tab:red", alpha=0.6,
                 label="backlog (sent - received)")
    ax2.set_ylabel("backlog, events")
    ax2.set_ylim(bottom=0)
    _mark_runs(ax, runs)
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], loc="upper center",
              bbox_to_anchor=(0.5, -0.12), ncol=3, fontsize=8)
    ax.set_title("Throughput: sent vs decided per 1 s bucket, and backlog")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def latency_cdfs(path: Path, series: Sequence[tuple[str, Sequence[float]]],
                 budget_ms: float) -> Path:
    fig, ax = plt.subplots(figsize=(9, 6))
    cmap = plt.get_cmap("viridis")
    for i, (label, values) in enumerate(series):
        if not values:
            continue
        ordered = sorted(values)
        n = len(ordered)
        step = max(1, n // CDF_POINTS)
        idx = list(range(0, n, step))
        if idx[-1] != n - 1:
            idx.append(n - 1)
        color = cmap(i / max(1, len(series) - 1)) if not label.startswith("70%") else "red"
        ax.plot([max(ordered[j], 0.1) for j in idx], [(j + 1) / n for j in idx],
                linewidth=1.2, color=color, label=f"{label} ({n:,})")
    ax.axvline(budget_ms, color="black", linestyle="--", linewidth=1,
               label=f"budget {budget_ms:g} ms")
    for q in (0.5, 0.9, 0.99):
        ax.axhline(q, color="0.8", linewidth=0.6)
    ax.set_xscale("log")
    ax.set_xlabel("end-to-end latency, ms (log)")
    ax.set_ylabel("fraction of decisions")
    ax.set_ylim(0, 1.0)
    ax.set_title("End-to-end latency CDF per run")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


#: gap between two workers' lives in rss.png, seconds
RSS_GAP_S = 2.0

#: one worker's RSS: its label, (seconds since it started, MB), marks (seconds, label)
Worker = tuple[str, Sequence[Sequence[float]], Sequence[Sequence[Any]]]


def rss_timeline(path: Path, workers: Sequence[Worker]) -> Path:
    """One worker: its RSS since it started, with its marks. Several: one after the other,
    each from its own start (``RSS_GAP_S`` apart), a dashed line and its label at each
    worker's start."""
    fig, ax = plt.subplots(figsize=(12 if len(workers) > 1 else 10, 4))
    offset = 0.0
    for label, samples, marks in workers:
        if len(workers) > 1:
            ax.axvline(offset, color="black", linewidth=0.8, linestyle="--")
            ax.text(offset, 0.02, f" worker: {label}", transform=ax.get_xaxis_transform(),
                    rotation=90, va="bottom", ha="left", fontsize=7)
        if samples:
            ax.plot([offset + t for t, _mb in samples], [mb for _t, mb in samples],
                    linewidth=1, color="tab:purple")
        for t, mark in marks:
            ax.axvline(offset + t, color="0.55", linewidth=0.8)
            ax.text(offset + t, 1.0, f" {mark}", transform=ax.get_xaxis_transform(),
                    rotation=90, va="top", ha="left", fontsize=7, color="0.3")
        offset += max([t for t, _mb in samples], default=0.0) + RSS_GAP_S
    ax.set_ylim(bottom=0)
    ax.set_xlabel("seconds since the worker started" if len(workers) <= 1 else
                  "seconds since each worker started, workers one after the other")
    ax.set_ylabel("RSS, MB (worker and children)")
    ax.set_title("Worker RSS" if len(workers) <= 1 else f"RSS of {len(workers)} workers")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_all(folder: Path, *, buckets: Sequence[dict], runs: Sequence[dict],
              cdfs: Sequence[tuple[str, Sequence[float]]], budget_ms: float,
              rss: Sequence[Worker], xlabel: str = XLABEL) -> list[str]:
    """Every plot that has data; returns the file names written."""
    out: list[Path] = []
    if buckets:
        out.append(latency_timeline(folder / "latency.png", buckets, runs, budget_ms, xlabel))
        out.append(throughput_timeline(folder / "throughput.png", buckets, runs, xlabel))
    if any(values for _label, values in cdfs):
        out.append(latency_cdfs(folder / "latency_cdf.png", cdfs, budget_ms))
    if any(samples for _label, samples, _marks in rss):
        out.append(rss_timeline(folder / "rss.png", rss))
    return [p.name for p in out]
