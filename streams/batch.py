"""What the worker's batch step takes and gives: one fetched record
(:class:`RawRecord`), and everything a batch decided (:class:`BatchResult`), which
:mod:`fraudstream.streams.worker.delivery` writes out and the metrics and status read."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fraudstream.state.engine import FeatureBatch


# Not frozen: a frozen dataclass is built through object.__setattr__ (1.0 µs against
# 0.23 µs, one per record on the hot path). Treat it as read-only.
@dataclass(slots=True)
class RawRecord:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp_ms: int


@dataclass(slots=True)
class BatchResult:
    #: (key, value) for the decisions topic, one per valid input record.
    decisions: list[tuple[bytes, bytes]] = field(default_factory=list)
    #: (partition, dedupe key, decision bytes): first decisions, for the dedupe state.
    new_entries: list[tuple[int, bytes, bytes]] = field(default_factory=list)
    #: (key, value) for the dead-letter topic, one per record that could not be decided.
    dead_letters: list[tuple[bytes | None, bytes]] = field(default_factory=list)
    outcomes: Counter[str] = field(default_factory=Counter)
    dlq_reasons: Counter[str] = field(default_factory=Counter)
    duplicates: int = 0
    timings_ms: dict[str, float] = field(default_factory=dict)
    #: (partition, key, record): changed feature state, for the state store.
    feature_writes: list[tuple[int, bytes, bytes]] = field(default_factory=list)
    #: (transaction_id, FeatureVector record) for the features topic, when logging.
    feature_log: list[tuple[bytes, bytes]] = field(default_factory=list)
    features: FeatureBatch | None = None
    #: (card_id, original value) to re-key through the by-card topic (repartition mode).
    forwards: list[tuple[bytes, bytes]] = field(default_factory=list)
    #: Valid transactions whose Kafka key is not their card_id.
    miskeyed: int = 0
    #: (transaction_id, Decision record) of the shadow model, for decisions.shadow.
    shadow: list[tuple[bytes, bytes]] = field(default_factory=list)
    #: During a rollout: decisions by (variant, outcome, fallback), and each variant's
    #: model-stage ms for the batch (``model_champion``, ``model_canary``).
    variants: Counter[tuple[str, str, bool]] = field(default_factory=Counter)
    variant_ms: dict[str, float] = field(default_factory=dict)
    #: Events decided by the rules because the model stage could not, by cause.
    fallbacks: Counter[str] = field(default_factory=Counter)
    #: New decisions by (deciding stage, outcome), and their records' Kafka timestamps.
    stage_outcomes: Counter[tuple[str, str]] = field(default_factory=Counter)
    source_timestamps: list[int] = field(default_factory=list)
    #: Decisions made past their budget (counted from the batch's arrival), and by how
    #: much at most: stale but decided by the model, when it is healthy.
    past_budget: int = 0
    past_budget_max_ms: float = 0.0
    #: Drift events of a window this batch closed, as dicts (schemas/drift_event.avsc).
    drift_events: list[dict[str, Any]] = field(default_factory=list)
    #: The new transactions (record, transaction) and their decision fields, aligned; the
    #: shadow's too when it scored (a replay reads them without decoding the records).
    fresh: list[tuple[RawRecord, dict[str, Any]]] = field(default_factory=list)
    verdicts: list[dict[str, Any]] = field(default_factory=list)
    shadow_verdicts: list[dict[str, Any]] | None = None
    #: The active model's scores of ``fresh`` before any online blend (None: it did not
    #: score); the feature log keeps them, as evidence for the learner's weight.
    model_scores: np.ndarray | None = None
    #: Labels the state store could not take in this batch (it was unavailable): their
    #: records are to be delivered again, not acknowledged. Taking a label twice is
    #: harmless (the learners and the merchant states skip offsets they already took).
    labels_again: int = 0


@dataclass(slots=True)
class Staged:
    """A batch read, deduplicated and given its features (``Pipeline.prepare``), not yet
    decided (``Pipeline.decide``). It pickles: a replay prepares batches in one process and
    decides them in another."""

    out: BatchResult
    #: Valid transactions in input order; ``fresh``: those to decide (first of their id,
    #: not decided before); ``earlier``: earlier decisions by id; ``repeats``: (index in
    #: ``valid``, id) of repeats inside the batch; ``first_in_batch``: id -> index in fresh.
    valid: list[tuple[RawRecord, dict[str, Any]]]
    fresh: list[tuple[RawRecord, dict[str, Any]]]
    earlier: dict[str, bytes]
    repeats: list[tuple[int, str]]
    first_in_batch: dict[str, int]
    label_events: list[Any]
    #: ``perf_counter`` when the batch's preparation began, and when it ended (a
    #: system-wide clock on Linux: comparable in another process).
    started: float
    prepared: float
    #: Milliseconds of decode, dedupe and features so far.
    timings_ms: dict[str, float]

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        """Pickled as columns, without the records' values (deciding never reads them:
        the bad ones were rejected when prepared): a record pickled as a dataclass cost
        3.6 us against 1.0 for its columns and its transaction, in the process that
        reads a replay's range."""
        at = {id(txn): i for i, (_rec, txn) in enumerate(self.valid)}  # fresh: of valid
        recs = [rec for rec, _txn in self.valid]
        return (_staged, (
            self.out, [r.topic for r in recs], [r.partition for r in recs],
            [r.offset for r in recs], [r.key for r in recs], [r.timestamp_ms for r in recs],
            [txn for _rec, txn in self.valid], [at[id(txn)] for _rec, txn in self.fresh],
            self.earlier, self.repeats, self.first_in_batch, self.label_events, self.started,
            self.prepared, self.timings_ms))


def _staged(out: BatchResult, topics: list[str], partitions: list[int], offsets: list[int],
            keys: list[bytes | None], timestamps: list[int], txns: list[dict[str, Any]],
            fresh: list[int], *rest: Any) -> Staged:
    valid = [(RawRecord(*r, None, ts), txn) for *r, ts, txn in zip(
        topics, partitions, offsets, keys, timestamps, txns, strict=True)]
    return Staged(out, valid, [valid[i] for i in fresh], *rest)
