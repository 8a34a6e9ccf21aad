"""A labelled history as a training set: every transaction's features computed by the
worker's own code (:mod:`fraudstream.state.offline`), kept in columns with no Python object
per row, and its target the label the history ends with."""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fraudstream.scorers.sampling import Weigh
from fraudstream.scorers.windows import Windows
from fraudstream.state.features import FeatureConfig
from fraudstream.state.offline import OfflineStats, offline_features


class TrainingError(RuntimeError):
    """The data or a model cannot give a usable artifact; the message says why."""


#: Rows gathered before they are stacked into one block of the feature matrix.
BLOCK = 16_384


def token(text: str) -> int:
    """A 64-bit token of an identifier: the dataset keeps no string per row."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


@dataclass
class Dataset:
    """Every kept transaction in columns, no Python object per row (about 290 bytes a
    transaction with 62 features): months of history fit where its records would not.
    Transactions and cards are 64-bit tokens (:func:`token`), never card numbers."""

    X: np.ndarray
    y: np.ndarray
    times: np.ndarray
    #: Card tokens (uint64).
    cards: np.ndarray
    #: Transaction tokens (uint64).
    txn_keys: np.ndarray
    #: The rules' score of each transaction (nan when no rules scorer was given).
    rules: np.ndarray
    stats: OfflineStats
    #: (label_time, transaction token, is_fraud) of every label, as they arrived.
    labels: list[tuple[int, int, bool]] = field(default_factory=list)
    #: card token -> when a fraud label first made it known compromised (label_time).
    compromised: dict[int, int] = field(default_factory=dict)
    #: Median time from a transaction to its label, over the history's labels.
    label_delay_ms: int = 0
    #: The transactions and their feature vectors, for tools that want them
    #: (``build_dataset(..., records=True)``); empty otherwise.
    txns: list[Mapping[str, Any]] = field(default_factory=list)
    vectors: list[Any] = field(default_factory=list)
    #: Each row's weight in the fit (1, or 1 / share for a sampled genuine row).
    weights: np.ndarray | None = None
    #: Transactions sampled out (their features were computed, their rows not kept), and
    #: the first and last event time among them (the windows span every transaction).
    sampled_out: int = 0
    sampled_span: tuple[int, int] | None = None

    def __len__(self) -> int:
        return len(self.times)

    @property
    def w(self) -> np.ndarray:
        return self.weights if self.weights is not None else np.ones(len(self), np.float32)


class _Columns:
    """Rows appended one at a time, stacked a block at a time."""

    def __init__(self, rules_scorer: Any) -> None:
        self.rules_scorer = rules_scorer
        self.rows: list[list[float]] = []
        self.pending: list[tuple[Mapping[str, Any], Any]] = []
        self.blocks: list[np.ndarray] = []
        self.times, self.cards, self.keys = array("q"), array("Q"), array("Q")
        self.rules, self.weights = array("f"), array("f")

    def add(self, txn: Mapping[str, Any], vector: Any, weight: float = 1.0) -> None:
        self.rows.append(vector.row)
        self.weights.append(weight)
        self.times.append(int(txn["event_time"]))
        self.cards.append(token(txn["card_id"]))
        self.keys.append(token(txn["transaction_id"]))
        if self.rules_scorer is not None:
            self.pending.append((txn, vector))
            if len(self.pending) >= 500:
                self._score()
        if len(self.rows) >= BLOCK:
            self._stack()

    def _score(self) -> None:
        if self.pending:
            txns, vectors = zip(*self.pending, strict=True)
            self.rules.extend(s.score for s in self.rules_scorer.score_batch(
                list(txns), list(vectors)))
            self.pending = []

    def _stack(self) -> None:
        if self.rows:
            self.blocks.append(np.array(self.rows, dtype=np.float32))
            self.rows = []

    def finish(self) -> tuple[np.ndarray, ...]:
        self._score()
        self._stack()
        X = np.concatenate(self.blocks) if self.blocks else np.empty((0, 0), np.float32)
        self.blocks = []
        n = len(self.times)
        rules = np.frombuffer(self.rules, dtype=np.float32) if self.rules_scorer is not None \
            else np.full(n, np.nan, dtype=np.float32)
        return (X, np.frombuffer(self.times, dtype=np.int64),
                np.frombuffer(self.cards, dtype=np.uint64),
                np.frombuffer(self.keys, dtype=np.uint64), rules,
                np.frombuffer(self.weights, dtype=np.float32))


def build_dataset(events: Iterable[tuple[str, Mapping[str, Any]]], config: FeatureConfig,
                  progress: Any = None, windows: Windows | None = None,
                  rules_scorer: Any = None, records: bool = False,
                  weigh: Weigh | None = None) -> Dataset:
    """Features for every transaction; its target is the label the history ends with.
    With ``windows``, events before the warm-up are not read, and only transactions of
    the three windows are kept (the others feed the features only). ``rules_scorer``
    scores the kept transactions as they go; ``records`` keeps the transactions and their
    vectors too (for tools; a long history should not). ``weigh`` gives each kept
    transaction its weight (0: sampled out, :mod:`fraudstream.scorers.sampling`)."""
    final: dict[int, bool] = {}
    arrived: list[tuple[int, int, bool]] = []
    compromised: dict[int, int] = {}
    delays: list[int] = []

    def watch() -> Iterable[tuple[str, Mapping[str, Any]]]:
        for kind, record in events:
            if windows is not None and not windows.reads(int(record["event_time"])):
                continue
            if kind == "label":
                fraud = bool(record["is_fraud"])
                key = token(record["transaction_id"])
                final[key] = fraud
                arrived.append((int(record["label_time"]), key, fraud))
                delays.append(int(record["label_time"]) - int(record["event_time"]))
                card = record.get("card_id")
                if fraud and card is not None:
                    c = token(card)
                    known = compromised.get(c)
                    if known is None or record["label_time"] < known:
                        compromised[c] = int(record["label_time"])
            yield kind, record

    stats = OfflineStats()
    columns = _Columns(rules_scorer)
    txns, vectors = [], []
    sampled_out = 0
    span: tuple[int, int] | None = None
    for txn, vector in offline_features(watch(), config, stats=stats):
        if progress is not None:
            progress.update(1)
        if windows is not None and not windows.keeps(int(txn["event_time"])):
            continue
        weight = 1.0 if weigh is None else weigh(txn)
        if not weight:
            sampled_out += 1
            at = int(txn["event_time"])
            span = (at, at) if span is None else (min(span[0], at), max(span[1], at))
            continue
        columns.add(txn, vector, weight)
        if records:
            txns.append(txn)
            vectors.append(vector)
    X, times, cards, keys, rules, weights = columns.finish()
    if not len(times):
        raise TrainingError("no transactions in the history")
    y = np.fromiter((final.get(k, False) for k in keys.tolist()), dtype=np.int8,
                    count=len(keys))
    return Dataset(X, y, times, cards, keys, rules, stats, arrived, compromised,
                   int(np.median(delays)) if delays else 0, txns, vectors,
                   weights if weigh is not None else None, sampled_out, span)


def known_targets(ds: Dataset, before_ms: int) -> np.ndarray:
    """The targets as known at ``before_ms``: a transaction is fraud only if a fraud label
    for it had arrived by then (the last label before then counts)."""
    known: dict[int, bool] = {}
    for t, key, fraud in ds.labels:
        if t < before_ms:
            known[key] = fraud
    return np.fromiter((known.get(k, False) for k in ds.txn_keys.tolist()), dtype=np.int8,
                       count=len(ds.txn_keys))
