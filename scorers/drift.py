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
        self._binner = Binner(self.edges)
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
        values = X.astype(np.float64)
        if scores is not None:
            values = np.column_stack([values, scores])
        for k, counts in enumerate(self._binner.counts(values)):
            self.counts[k] += counts
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


class Binner:
    """Histogram counts of every column of a batch at once, against each column's own
    edges: what ``np.searchsorted(edges, column, side="right") - 1``, clipped to the
    column's bins, then ``np.bincount`` give column by column, with one bincount for the
    whole batch instead of one per column (a batch of 32 events paid ~15 us an event for
    the 63 columns)."""

    #: Up to this many rows, one comparison of every value with every edge; above it,
    #: a searchsorted per column (measured: 2.3 against 15 us an event at 32 rows, 1.3
    #: against 2.0 at 500).
    BROADCAST_ROWS = 128

    def __init__(self, edges: list[np.ndarray]) -> None:
        self.sorted_edges = edges
        width = max(len(e) for e in edges)
        #: Edges padded with +inf: no value is at or past a padding edge.
        self.edges = np.full((len(edges), width), np.inf)
        for k, e in enumerate(edges):
            self.edges[k, :len(e)] = e
        self.last_bin = np.array([len(e) - 2 for e in edges])
        self.offsets = np.concatenate([[0], np.cumsum([len(e) - 1 for e in edges])])

    def counts(self, values: np.ndarray) -> list[np.ndarray]:
        """Per column of ``values``, its counts. ``values`` has the first columns of the
        edges' (the features without the score when the model did not score)."""
        m = values.shape[1]
        edges, last_bin, offsets = self.edges[:m], self.last_bin[:m], self.offsets[:m + 1]
        # edges at or below each value (searchsorted side="right"); NaN sorts last there
        if len(values) <= self.BROADCAST_ROWS:
            at_or_below = np.count_nonzero(values[:, :, None] >= edges[None, :, :], axis=2)
            at_or_below = np.where(np.isnan(values), edges.shape[1], at_or_below)
        else:
            at_or_below = np.empty(values.shape, dtype=np.int64)
            for k, e in enumerate(self.sorted_edges[:m]):
                at_or_below[:, k] = np.searchsorted(e, values[:, k], side="right")
        bins = np.clip(at_or_below - 1, 0, last_bin) + offsets[:-1]
        flat = np.bincount(bins.ravel(), minlength=int(offsets[-1])).astype(np.float64)
        return [flat[a:b] for a, b in zip(offsets[:-1], offsets[1:], strict=True)]


def drift_event(feature: str, statistic: str, value: float, threshold: float,
                window_start: int, window_end: int, window_count: int, model_version: str,
                severity: str) -> dict[str, Any]:
    """A DriftEvent record (schemas/drift_event.avsc), detected now."""
    return {"feature": feature, "statistic": statistic, "value": float(value),
            "threshold": float(threshold), "window_start": window_start,
            "window_end": window_end, "window_count": int(window_count),
            "model_version": model_version, "severity": severity,
            "detected_at": int(time.time() * 1000)}
