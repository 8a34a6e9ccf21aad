"""Genuine transactions sampled out of a long training window.

A training set holds about 290 bytes per transaction, and the fits copy the training
window's rows again. Fraud is rare, so most of those rows are genuine and teach the models
little each. (What this does not shrink: the offline feature code's state, every card's
events of its longest window, and the validation and test windows; docs/performance.md.)
Sampling keeps every transaction that has a label (fraud or not) and a share of the
unlabelled ones, chosen by a hash of the transaction id (the same rows on every run), each
kept one weighing ``1 / share`` in the fit, so that the models learn the class balance of
the whole window.

Only the training window is sampled: rows before ``until_ms`` (event time), which the
caller places inside it. The validation window (ensemble weight, thresholds, the drift
reference's scores) and the test window (every measure) keep every transaction, so their
figures mean what they mean without sampling. The feature code still reads every
transaction: a card's velocity counts all of them.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Container, Mapping
from typing import Any

import numpy as np

#: A transaction's weight in the training set: 0 leaves it out.
Weigh = Callable[[Mapping[str, Any]], float]


class SamplingError(ValueError):
    """Settings that cannot sample; the message says why."""


def genuine_sampler(share: float, until_ms: int, labelled: Container[str]) -> Weigh:
    """Weights for rows before ``until_ms``: 1 for a transaction in ``labelled``, ``1 /
    share`` for ``share`` of the others (by the CRC-32 of the transaction id), 0 for the
    rest; every row from ``until_ms`` on weighs 1."""
    if not 0.0 < share <= 1.0:
        raise SamplingError(f"the genuine sample share must be in (0, 1], not {share}")
    cut = int(share * (1 << 32))
    kept = 1.0 / share

    def weigh(txn: Mapping[str, Any]) -> float:
        if txn["event_time"] >= until_ms:
            return 1.0
        tid = txn["transaction_id"]
        if tid in labelled:
            return 1.0
        return kept if zlib.crc32(tid.encode()) < cut else 0.0

    return weigh


def balanced(y: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """``weights`` scaled so that each class weighs half of the total: scikit-learn's
    ``class_weight="balanced"``, counted in weights rather than rows."""
    w = weights.astype(np.float64)
    total = w.sum()
    out = w.copy()
    for cls in (0, 1):
        mask = y == cls
        mass = w[mask].sum()
        if mass > 0:
            out[mask] *= total / (2.0 * mass)
    return out


def weighted_quantiles(values: np.ndarray, qs: np.ndarray,
                       weights: np.ndarray | None) -> np.ndarray:
    """``np.quantile`` of ``values``, each counted ``weights`` times (None: once)."""
    if weights is None or np.all(weights == 1.0):
        return np.quantile(values, qs)
    return np.quantile(values, qs, weights=weights, method="inverted_cdf")
