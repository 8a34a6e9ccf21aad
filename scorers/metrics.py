"""Quality measures of a fraud score, as analysts read them.

- AUC ROC and average precision over transactions (scikit-learn);
- card precision at k per day: each day, the k cards with the highest score that day
  are the ones an analyst team can check; the share of them that had a fraud that day,
  averaged over the days (the usual measure of a fraud team's daily workload). Given the
  times cards became known compromised, a card already known before a day is left out of
  that day: it is blocked, and finding it again is no work saved.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence

import numpy as np

DAY_MS = 86_400_000


def auc_ap(y: np.ndarray, score: np.ndarray) -> tuple[float, float]:
    """(AUC ROC, average precision); NaN when only one class is present."""
    from sklearn.metrics import average_precision_score, roc_auc_score

    if len(set(y.tolist())) < 2:
        return float("nan"), float("nan")
    return float(roc_auc_score(y, score)), float(average_precision_score(y, score))


def card_precision_at_k(cards: Sequence[str], times_ms: np.ndarray, y: np.ndarray,
                        score: np.ndarray, k: int = 100,
                        known: Mapping[str, int] | None = None) -> float:
    """Mean over days of the share of the day's top-``k`` cards (by their highest score
    that day) that had at least one fraudulent transaction that day. ``known``: card ->
    when it became known compromised; such a card is left out of the days after."""
    best: dict[int, dict[str, float]] = defaultdict(dict)
    fraud: dict[int, set[str]] = defaultdict(set)
    known = known or {}
    for card, t, label, s in zip(cards, times_ms.tolist(), y.tolist(), score.tolist(),
                                 strict=True):
        day = int(t // DAY_MS)
        since = known.get(card)
        if since is not None and since < day * DAY_MS:
            continue
        day_best = best[day]
        if s > day_best.get(card, -np.inf):
            day_best[card] = s
        if label:
            fraud[day].add(card)
    precisions = []
    for day, day_best in best.items():
        top = sorted(day_best, key=day_best.__getitem__, reverse=True)[:k]
        precisions.append(sum(1 for c in top if c in fraud[day]) / k)
    return float(np.mean(precisions)) if precisions else float("nan")


def summary(cards: Sequence[str], times_ms: np.ndarray, y: np.ndarray, score: np.ndarray,
            k: int = 100, known: Mapping[str, int] | None = None) -> dict[str, float]:
    auc, ap = auc_ap(y, score)
    return {"auc_roc": auc, "average_precision": ap,
            f"card_precision_at_{k}": card_precision_at_k(cards, times_ms, y, score, k, known)}
