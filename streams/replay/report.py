"""The diff report of a replay: what would change if the challenger decided.

Writes into one folder: ``report.md`` (with ``scores.png``), ``result.json`` (every number
of the report), ``flips.csv`` (every transaction whose decision would change) and
``decisions.csv`` (both sides' decision and score for every transaction). Transactions are
named by transaction_id, never by card.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from fraudstream.scorers.metrics import summary
from fraudstream.streams.replay.engine import OUTCOMES, ReplayResult

TOP_FLIPS = 20
HEADER = ["transaction_id", "event_time", "partition", "champion", "champion_score",
          "challenger", "challenger_score"]


def _columns(result: ReplayResult) -> dict[str, np.ndarray]:
    d = result.decided
    return {"a": np.frombuffer(bytes(d.champion), dtype=np.uint8),
            "b": np.frombuffer(bytes(d.challenger), dtype=np.uint8),
            "sa": np.frombuffer(d.champion_score, dtype=np.float64),
            "sb": np.frombuffer(d.challenger_score, dtype=np.float64)}


def analyse(result: ReplayResult) -> dict[str, Any]:
    d = result.decided
    col = _columns(result)
    a, b, sa, sb = col["a"], col["b"], col["sa"], col["sb"]
    k = len(OUTCOMES)
    counts = np.bincount(a.astype(np.int64) * k + b, minlength=k * k).reshape(k, k)
    shown = [i for i, o in enumerate(OUTCOMES)
             if o != "none" or counts[i].sum() or counts[:, i].sum()]
    matrix = {OUTCOMES[i]: {OUTCOMES[j]: int(counts[i, j]) for j in shown} for i in shown}
    n = max(len(d), 1)
    quantiles = (0.5, 0.9, 0.99, 0.999)
    out: dict[str, Any] = {
        "replay_id": result.config.replay_id,
        "champion": result.champion, "challenger": result.challenger,
        "ranges": {str(p): {"first_offset": f, "end_offset": e}
                   for p, (f, e) in result.ranges.items()},
        "counts": {"read": result.read, "decided": len(d),
                   "duplicates": result.duplicates, "bad": sum(result.bad.values()),
                   "bad_reasons": dict(result.bad), "warmup": result.warmup,
                   "labels_fed": result.labels_fed, "bad_labels": result.bad_labels,
                   "published": result.published},
        "flip_matrix": matrix,
        "flipped": int((a != b).sum()),
        "rates": {side: {OUTCOMES[i]: float((x == i).sum() / n) for i in shown}
                  for side, x in (("champion", a), ("challenger", b))},
        "score_quantiles": {
            side: {str(q): float(np.nanquantile(x, q)) if len(x) else math.nan
                   for q in quantiles}
            for side, x in (("champion", sa), ("challenger", sb))},
        "fallbacks": dict(result.fallbacks),
        "seconds": result.seconds,
        "processes": result.config.processes,
        "peak_rss_mb": {"reading": result.reading_peak_rss_mb,
                        "deciding": result.peak_rss_mb},
        "stage_us_per_record": {k: 1000.0 * v / max(result.read, 1)
                                for k, v in result.stage_ms.items()},
        "records_per_s": (result.read + result.warmup) / result.seconds
        if result.seconds else math.nan,
        "by_tenth": by_tenth(result.marks),
    }
    labels = result.labels
    y = np.fromiter((labels.get(t, False) for t in d.transaction_ids), dtype=bool,
                    count=len(d))
    if y.any():
        times = np.frombuffer(d.event_times, dtype=np.int64)
        cards = d.cards.tolist()
        out["quality"] = {
            "labelled": sum(1 for t in d.transaction_ids if t in labels),
            "frauds": int(y.sum()),
            "champion": summary(cards, times, y, np.nan_to_num(sa, nan=0.0)),
            "challenger": summary(cards, times, y, np.nan_to_num(sb, nan=0.0)),
        }
    return out


def _plot(result: ReplayResult, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    col = _columns(result)
    fig, ax = plt.subplots(figsize=(8, 4))
    bins = np.linspace(0.0, 1.0, 51)
    for key, label in (("sa", f"champion {result.champion}"),
                       ("sb", f"challenger {result.challenger}")):
        s = col[key]
        ax.hist(s[np.isfinite(s)], bins=bins, histtype="step", linewidth=1.5, label=label)
    ax.set_yscale("log")
    ax.set_xlabel("score")
    ax.set_ylabel("transactions")
    ax.set_title(f"Score distributions, replay {result.config.replay_id}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _end(offset: int | None) -> str:
    return "end of the partition" if offset is None else str(offset)


def _pct(x: float) -> str:
    return f"{100 * x:.2f}%"


def write_report(result: ReplayResult, folder: Path) -> dict[str, Any]:
    folder.mkdir(parents=True, exist_ok=True)
    data = analyse(result)
    (folder / "result.json").write_text(json.dumps(data, indent=2, default=float))
    d = result.decided
    col = _columns(result)
    flipped = np.flatnonzero(col["a"] != col["b"])
    change = np.nan_to_num(np.abs(col["sb"][flipped] - col["sa"][flipped]), nan=0.0)
    flips = flipped[np.argsort(-change, kind="stable")].tolist()

    def row(i: int) -> list[Any]:
        return [d.transaction_ids[i], d.event_times[i], d.partitions[i],
                OUTCOMES[d.champion[i]], f"{d.champion_score[i]:.6f}",
                OUTCOMES[d.challenger[i]], f"{d.challenger_score[i]:.6f}"]

    with (folder / "flips.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(HEADER + ["label"])
        for i in flips:
            label = result.labels.get(d.transaction_ids[i])
            w.writerow(row(i) + ["" if label is None else int(label)])
    with (folder / "decisions.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(HEADER)
        w.writerows(row(i) for i in range(len(d)))
    if len(d):
        _plot(result, folder / "scores.png")

    c = data["counts"]
    lines = [
        f"# Replay {data['replay_id']}: champion {data['champion']}, "
        f"challenger {data['challenger']}",
        "",
        "## Range",
        "",
        "| partition | first offset read | end offset |",
        "|---|---|---|",
        *(f"| {p} | {r['first_offset']} | {_end(r['end_offset'])} |"
          for p, r in data["ranges"].items()),
        "",
        f"{c['read']:,} transaction records in the range: {c['decided']:,} decided, "
        f"{c['duplicates']:,} repeats of a transaction already decided, {c['bad']:,} bad "
        f"records skipped. Warm-up records (features only): {c['warmup']:,}. Labels fed to "
        f"the features and learners: {c['labels_fed']:,} ({c['bad_labels']:,} unreadable). "
        f"Challenger decisions published: {c['published']:,}.",
        "",
    ]
    if c["bad_reasons"]:
        lines += ["| bad record reason | records |", "|---|---|",
                  *(f"| {k} | {v} |" for k, v in sorted(c["bad_reasons"].items())), ""]
    outcomes = list(data["flip_matrix"])
    lines += [
        "## Decision flips",
        "",
        f"{data['flipped']:,} of {c['decided']:,} decisions change "
        f"({_pct(data['flipped'] / max(c['decided'], 1))}). Rows: champion; columns: "
        "challenger.",
        "",
        "| champion \\ challenger | " + " | ".join(outcomes) + " | total |",
        "|---" * (len(outcomes) + 2) + "|",
        *(f"| {x} | " + " | ".join(f"{data['flip_matrix'][x][y]:,}" for y in outcomes)
          + f" | {sum(data['flip_matrix'][x].values()):,} |" for x in outcomes),
        "",
        "| rate | " + " | ".join(outcomes) + " |",
        "|---" * (len(outcomes) + 1) + "|",
        *(f"| {side} | " + " | ".join(_pct(data["rates"][side].get(o, 0.0)) for o in outcomes)
          + " |" for side in ("champion", "challenger")),
        "",
        "## Scores",
        "",
        "![score distributions](scores.png)",
        "",
        "| quantile | champion | challenger |",
        "|---|---|---|",
        *(f"| {q} | {data['score_quantiles']['champion'][q]:.4f} | "
          f"{data['score_quantiles']['challenger'][q]:.4f} |"
          for q in data["score_quantiles"]["champion"]),
        "",
    ]
    q = data.get("quality")
    lines += ["## Quality on the labels", ""]
    if q is None:
        lines += ["No fraud label joined a transaction of the range: no quality measure.", ""]
    else:
        lines += [
            f"{q['labelled']:,} transactions labelled, {q['frauds']:,} frauds; unlabelled "
            "transactions count as genuine.",
            "",
            "| | AUC ROC | average precision | card precision at 100 per day |",
            "|---|---|---|---|",
            *(f"| {side} {data[side]} | {q[side]['auc_roc']:.4f} | "
              f"{q[side]['average_precision']:.4f} | {q[side]['card_precision_at_100']:.4f} |"
              for side in ("champion", "challenger")),
            "",
        ]
    fb = data["fallbacks"]
    lines += ["## Fallbacks", "",
              ("No event fell back to the rules." if not fb else
               "Events decided by the rules in place of a model (``shadow_`` = the "
               "challenger): " + ", ".join(f"{k} {v:,}" for k, v in sorted(fb.items())) + "."),
              "", f"## Most changed decisions (top {TOP_FLIPS} by score change; all in "
              "flips.csv)", "",
              "| transaction_id | champion | challenger | label |", "|---|---|---|---|"]
    for i in flips[:TOP_FLIPS]:
        label = result.labels.get(d.transaction_ids[i])
        lines.append(f"| {d.transaction_ids[i]} | {OUTCOMES[d.champion[i]]} "
                     f"({d.champion_score[i]:.3f}) | {OUTCOMES[d.challenger[i]]} "
                     f"({d.challenger_score[i]:.3f}) | "
                     f"{'' if label is None else ('fraud' if label else 'genuine')} |")
    lines += ["", f"Replayed in {data['seconds']:.1f} s ({data['records_per_s']:,.0f} "
              "transaction records/s, warm-up included)."]
    if data["by_tenth"]:
        lines += ["By tenth of the records read, records/s (labels fed): "
                  + ", ".join(f"{t['records_per_s']:,.0f} ({t['labels']:,})"
                              for t in data["by_tenth"]) + "."]
    lines.append("")
    (folder / "report.md").write_text("\n".join(lines))
    return data


def by_tenth(marks: list[tuple[int, int, float]]) -> list[dict[str, float]]:
    """Records per second and labels fed in each tenth of the records read, from the
    (records, labels, seconds) marks taken after each batch: whether the rate holds over
    the run, and how the labels (learned on the deciding side) grow as it goes."""
    if not marks:
        return []
    total = marks[-1][0]
    out, start = [], (0, 0, 0.0)
    for k in range(1, 11):
        end = next(m for m in marks if m[0] >= total * k / 10)
        if end[0] > start[0]:
            seconds = end[2] - start[2]
            out.append({"records": end[0] - start[0], "labels": end[1] - start[1],
                        "records_per_s": (end[0] - start[0]) / seconds if seconds > 0
                        else math.nan})
            start = end
    return out
