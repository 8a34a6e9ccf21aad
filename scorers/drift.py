"""Drift of the features and of the score against the active model's reference histograms.

:class:`DriftMonitor` counts each micro-batch into the reference bins (one vectorized
``searchsorted`` per feature), and every ``window`` events closes a tumbling window: PSI
and Jensen-Shannon distance per feature and for the score. A statistic over its threshold
gives a drift event (``warning``, or ``critical`` at twice the threshold). The batch mean
score also feeds a Page-Hinkley detector (River), for a sudden shift in the score stream.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from fraudstream.scorers.river_import import drift
from fraudstream.state.features import FEATURE_NAMES

_EPS = 1e-4


@dataclass(frozen=True)
class DriftConfig:
    window: int = 5000
    psi_threshold: float = 0.2
    js_threshold: float = 0.1


def psi(expected: np.ndarray, actual: np.ndarray) -> float:
    e = np.clip(expected, _EPS, None)
    a = np.clip(actual, _EPS, None)
    return float(np.sum((a - e) * np.log(a / e)))


def js_distance(p: np.ndarray, q: np.ndarray) -> float:
    p = np.clip(p, _EPS, None)
    q = np.clip(q, _EPS, None)
    p, q = p / p.sum(), q / q.sum()
    m = (p + q) / 2
    return float(np.sqrt(0.5 * np.sum(p * np.log(p / m)) + 0.5 * np.sum(q * np.log(q / m))))


class DriftMonitor:
    def __init__(self, version: str, reference: dict[str, Any], config: DriftConfig) -> None:
        self.version = version
        self.config = config
        self.names = [*FEATURE_NAMES, "score"]
        refs = [reference["features"][n] for n in FEATURE_NAMES] + [reference["score"]]
        self.edges = [np.asarray(r["edges"], dtype=np.float64) for r in refs]
        self.expected = [np.asarray(r["proportions"], dtype=np.float64) for r in refs]
        self.counts = [np.zeros(len(e) - 1) for e in self.edges]
        self.n = 0
        self.window_start: int | None = None
        self.page_hinkley = drift.PageHinkley()
        #: (feature, statistic) -> value of the last closed window.
        self.last: dict[tuple[str, str], float] = {}

    def observe(self, X: np.ndarray, scores: np.ndarray | None,
                now_ms: int) -> list[dict[str, Any]]:
        """Count a batch (``scores`` None: the model did not score it, features only);
        returns the drift events of a window it closed (if any)."""
        if not len(X):
            return []
        if self.window_start is None:
            self.window_start = now_ms
        columns = [X[:, i].astype(np.float64) for i in range(X.shape[1])]
        if scores is not None:
            columns.append(scores)
        for k, values in enumerate(columns):
            edges = self.edges[k]
            bins = np.clip(np.searchsorted(edges, values, side="right") - 1, 0,
                           len(edges) - 2)
            self.counts[k] += np.bincount(bins, minlength=len(edges) - 1)
        self.n += len(X)
        events = []
        if scores is not None:
            self.page_hinkley.update(float(np.mean(scores)))
            if self.page_hinkley.drift_detected:
                events.append(self._event("score", "page_hinkley", 1.0, 1.0, now_ms))
        if self.n >= self.config.window:
            events += self._close(now_ms)
        return events

    def _close(self, now_ms: int) -> list[dict[str, Any]]:
        events = []
        for name, expected, counts in zip(self.names, self.expected, self.counts, strict=True):
            if not counts.sum():  # the score, when the model scored nothing this window
                continue
            actual = counts / counts.sum()
            for stat, value, threshold in (
                    ("psi", psi(expected, actual), self.config.psi_threshold),
                    ("js", js_distance(expected, actual), self.config.js_threshold)):
                self.last[(name, stat)] = value
                if value > threshold:
                    events.append(self._event(name, stat, value, threshold, now_ms))
        self.counts = [np.zeros_like(c) for c in self.counts]
        self.n, self.window_start = 0, None
        return events

    def _event(self, feature: str, stat: str, value: float, threshold: float,
               now_ms: int) -> dict[str, Any]:
        return drift_event(feature, stat, value, threshold, self.window_start or now_ms,
                           now_ms, self.n, self.version,
                           "critical" if value > 2 * threshold else "warning")


def drift_event(feature: str, statistic: str, value: float, threshold: float,
                window_start: int, window_end: int, window_count: int, model_version: str,
                severity: str) -> dict[str, Any]:
    """A DriftEvent record (schemas/drift_event.avsc), detected now."""
    return {"feature": feature, "statistic": statistic, "value": float(value),
            "threshold": float(threshold), "window_start": window_start,
            "window_end": window_end, "window_count": int(window_count),
            "model_version": model_version, "severity": severity,
            "detected_at": int(time.time() * 1000)}
