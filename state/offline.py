"""Features for a file of history, with the worker's own code: for training and replay.

:func:`offline_features` drives :class:`fraudstream.state.engine.FeatureEngine` over a stream of
``("transaction", dict)`` and ``("label", dict)`` events, in the order given (the order
they arrived in), with an in-memory store and a single partition, in micro-batches like
the worker. Labels count from their availability time whatever batch they fall in (see
:mod:`fraudstream.state.features`), so the result does not depend on where batches split. A
transaction_id seen before is skipped, as the worker's dedupe would answer it with its
first decision.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from fraudstream.state.engine import (
    FeatureBatch,
    FeatureEngine,
    LabelEvent,
    MemoryStore,
    TxnEvent,
)
from fraudstream.state.features import FeatureConfig, Vector


@dataclass
class OfflineStats:
    transactions: int = 0
    labels: int = 0
    duplicates: int = 0
    late: int = 0
    too_late: int = 0
    entities: int = 0


def offline_features(
    events: Iterable[tuple[str, Mapping[str, Any]]],
    config: FeatureConfig,
    batch_size: int = 500,
    stats: OfflineStats | None = None,
) -> Iterator[tuple[Mapping[str, Any], Vector]]:
    """(transaction, features) for every new transaction of ``events``, in order."""
    for txns, batch in _batches(events, config, batch_size, stats):
        yield from zip(txns, batch.vectors, strict=True)


def offline_batches(
    events: Iterable[tuple[str, Mapping[str, Any]]],
    config: FeatureConfig,
    batch_size: int = 500,
    stats: OfflineStats | None = None,
) -> Iterator[tuple[list[Mapping[str, Any]], np.ndarray]]:
    """As :func:`offline_features`, a micro-batch at a time: (transactions, their feature
    matrix, transactions x :data:`~fraudstream.state.features.FEATURE_NAMES`)."""
    for txns, batch in _batches(events, config, batch_size, stats):
        yield txns, batch.matrix


def _batches(
    events: Iterable[tuple[str, Mapping[str, Any]]],
    config: FeatureConfig,
    batch_size: int,
    stats: OfflineStats | None,
) -> Iterator[tuple[list[Mapping[str, Any]], FeatureBatch]]:
    stats = stats if stats is not None else OfflineStats()
    store = MemoryStore(partitions=1)
    engine = FeatureEngine(config, store)
    seen: set[str] = set()
    txns: list[TxnEvent] = []
    labels: list[LabelEvent] = []

    def run() -> tuple[list[Mapping[str, Any]], FeatureBatch]:
        batch = engine.process(txns, labels)
        store.write(batch.writes)
        stats.late += batch.late
        stats.too_late += batch.too_late
        stats.entities = len(store.data)
        out = ([e.txn for e in txns], batch)
        txns.clear()
        labels.clear()
        return out

    for kind, record in events:
        if kind == "label":
            labels.append(LabelEvent(0, stats.labels, record))
            stats.labels += 1
        elif kind == "transaction":
            if record["transaction_id"] in seen:
                stats.duplicates += 1
                continue
            seen.add(record["transaction_id"])
            txns.append(TxnEvent(0, stats.transactions, record))
            stats.transactions += 1
            if len(txns) >= batch_size:
                yield run()
    if txns or labels:
        yield run()
