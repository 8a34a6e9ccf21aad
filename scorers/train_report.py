"""The training report: ``report.md`` with the windows, the protocol, the test-window
metrics, a precision-recall curve and a score histogram (written by
:func:`fraudstream.scorers.train.train`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def write_report(target: Path, meta: dict[str, Any], y: np.ndarray,
            scores: dict[str, np.ndarray]) -> None:
    """report.md with the test-window metrics, a PR curve and a score histogram."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import precision_recall_curve

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for name, s in scores.items():
        p, r, _ = precision_recall_curve(y, s)
        ax.plot(r, p, label=name)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_title("Precision-recall, test window")
    ax.legend()
    fig.tight_layout()
    fig.savefig(target / "pr_curve.png", dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4.5))
    s = scores["ensemble"]
    bins = np.linspace(0, 1, 41)
    ax.hist(s[y == 0], bins=bins, alpha=0.6, label="genuine", density=True)
    ax.hist(s[y == 1], bins=bins, alpha=0.6, label="fraud", density=True)
    for name, t in meta["thresholds"].items():
        ax.axvline(t, linestyle="--", color="k")
        ax.text(t, ax.get_ylim()[1] * 0.9, f" {name}", fontsize=8)
    ax.set_yscale("log")
    ax.set_xlabel("ensemble score")
    ax.set_title("Score distribution, test window")
    ax.legend()
    fig.tight_layout()
    fig.savefig(target / "score_hist.png", dpi=100)
    plt.close(fig)

    rows = [f"| {name} | {m['auc_roc']:.4f} | {m['average_precision']:.4f} | "
            f"{m['card_precision_at_100']:.4f} |" for name, m in meta["metrics"]["test"].items()]
    w = meta["windows"]
    text = "\n".join([
        f"# Model {meta['version']}",
        "",
        f"Features {meta['feature_version']} ({len(meta['feature_names'])}); data sha256 "
        f"{meta['data']['sha256'][:16]}..., {meta['data']['transactions']} transactions, "
        f"fraud rate {meta['data']['fraud_rate']:.3%}.",
        "",
        "| window | from | to | transactions | fraud |",
        "|---|---|---|---|---|",
        *(f"| {n} | {v['from']} | {v['to']} | {v['transactions']} | {v['fraud']} |"
          for n, v in w.items()),
        "",
        _protocol_text(meta["protocol"]),
        "",
        "## Test window",
        "",
        "| scorer | AUC ROC | average precision | card precision @100/day |",
        "|---|---|---|---|",
        *rows,
        "",
        "Ensemble weights: " + ", ".join(
            f"{m['name']} {m['weight']:.2f}" for m in meta["models"]) + ".",
        f"Thresholds: review at {meta['thresholds']['review']:.4f}, decline at "
        f"{meta['thresholds']['decline']:.4f}.",
        "",
        "![precision-recall](pr_curve.png)",
        "",
        "![score histogram](score_hist.png)",
        "",
    ])
    (target / "report.md").write_text(text)


def _protocol_text(p: dict[str, Any]) -> str:
    if p["windows"] == "fractions":
        text = "Windows: consecutive fractions of the span; targets are the history's last labels."
    else:
        text = (f"Windows: explicit; the models learned only from labels known before "
                f"{p['labels_learned_before']} (the test window's start).")
    text += (f" Median label delay {p['label_delay_median_days']:.1f} days. Card precision"
             " leaves out, each day, the cards already known compromised before it.")
    return " ".join([text, *(f"**Warning:** {w}." for w in p["warnings"])])
