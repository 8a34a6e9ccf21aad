"""``fraudstream replay``: a range of ``transactions`` through a champion and a challenger.

The replay reads the range with its own consumer: partitions assigned by hand, offsets
never committed, so the live workers' group never sees it. It rebuilds the features from
empty in its own memory (optionally warmed up on an earlier stretch of the topic), and
runs the live worker's :class:`fraudstream.streams.pipeline.Pipeline`: dedupe, features,
rules (those in force on the control topic, as a worker starting now would take them),
the champion as the active model and the challenger as the shadow, each through the same
cascade (thresholds, guardrails, online blend). It writes the challenger's decisions to
``decisions.shadow`` (or ``--topic``), each with a ``fraudstream-replay-id`` header; it
never writes to ``decisions``, the dead-letter topic or the live state.

Order: the partitions' records are merged as the live worker decides them. Merchant,
device and IP features add up events across partitions, so this order is what makes them
match live ones. With event-time alignment on (``FRAUDSTREAM_WORKER_ALIGN_WAIT_MS`` above
0, the default) that is event time: the earliest transaction next, ties to the lower
partition, each partition keeping its own order, as
:class:`fraudstream.streams.worker.align.Aligner` merges them. With alignment off it is
Kafka timestamp order, how a worker without it meets live traffic.

Range bounds (``--from``, ``--to``, ``--warmup-from``): an integer is an offset, used on
every chosen partition; anything else is a time (ISO 8601, or ``@<epoch ms>``). Times
follow Kafka's ``offsets_for_times`` meaning (a partition's range starts at its first
record whose Kafka timestamp is at or after the time), resolved on the records read: the
embedded broker answers that lookup only to the record batch. ``--from`` is included and
``--to`` is not; without ``--to`` the range ends at the end of each partition when the
replay starts. With ``--event-time`` the times are transactions' event times: a history
loaded in one go has Kafka timestamps of the load, and a fraud team names its windows in
event time. Event times are not indexed, so each partition is read from its start; the
range is the transactions with an event time in ``[from, to)``; a partition ends at its
first record past ``to`` by more than ``FRAUDSTREAM_FEATURES_ALLOWED_LATENESS_S``, and
records met after the range began that are outside it feed the state (a worker would have
met them), not the report.

Labels: the ``labels`` records (co-partitioned with ``transactions``) reach the features
and the online learners, read from 31 days (by Kafka timestamp) before the first record
read (the merchant fraud features count the labels of the last 30 days, which a replay
starting from empty state would otherwise miss) to the end of the range; in event-time
order each goes before the first transaction batch past ``label_time`` +
``FRAUDSTREAM_FEATURES_LABEL_DELAY_S``, as the aligner places it, and in Kafka order
before the first batch past its timestamp. The
quality measures use every label of the range's transactions, up to the end of the topic;
a transaction without a label counts as genuine (labels are chargebacks and a sample of
confirmations).

No deadline: a replay scores every transaction (a live worker would fall back on a late
batch), so fallbacks in a replay are the model's own (``nan``, ``error``) or degraded
features. The online learners start empty (``--online learn``, as a worker started at
``--from`` would) or are left out on both sides (``--online off``).

A replay is restartable, not resumable: the same arguments give the same decisions and
report, and a second run writes its challenger decisions again under its own id.
"""

from __future__ import annotations

import bisect
import gc
import time
import zlib
from array import array
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import Producer

from fraudstream.schemas.codec import Codecs, DecodeError, decode_json, make_registry
from fraudstream.schemas.validate import ValidationError
from fraudstream.scorers.cascade import ModelStage
from fraudstream.scorers.online import OnlineStage
from fraudstream.scorers.registry import ACTIVE, Registry
from fraudstream.state.engine import FeatureConfig, FeatureEngine, MemoryStore
from fraudstream.streams.control.follow import rules_in_force
from fraudstream.streams.pipeline import Limits, Pipeline, RawRecord
from fraudstream.streams.replay.ranges import (
    EventTimeOf,
    RangeReader,
    ReplayConfig,
    ReplayError,
    read_labels,
)
from fraudstream.streams.settings import Settings
from fraudstream.streams.worker.align import record_times

REPLAY_HEADER = "fraudstream-replay-id"
OUTCOMES = ("approve", "review", "decline", "none")
#: Labels this far before the first record read are fed too: the merchant fraud features
#: count the labels of the last 30 complete days.
LABEL_LOOKBACK_MS = 31 * 86_400_000
#: Batches between two freezes of the garbage collector's survivors.
FREEZE_EVERY = 5


class Decided:
    """Every decided transaction of the range, both sides, in columns (a million
    transactions take about 100 bytes each, and no object per transaction for the garbage
    collector to walk). Cards are crc32 tokens, never card numbers."""

    def __init__(self) -> None:
        self.transaction_ids: list[str] = []
        self.cards = array("L")
        self.event_times = array("q")
        self.partitions = array("l")
        #: Outcomes as indexes into OUTCOMES ("none": the side did not decide).
        self.champion = bytearray()
        self.challenger = bytearray()
        self.champion_score = array("d")
        self.challenger_score = array("d")

    def __len__(self) -> int:
        return len(self.transaction_ids)

    def add(self, transaction_id: str, card_id: str, event_time: int, partition: int,
            champion: str, champion_score: float, challenger: str,
            challenger_score: float) -> None:
        self.transaction_ids.append(transaction_id)
        self.cards.append(zlib.crc32(card_id.encode()))
        self.event_times.append(event_time)
        self.partitions.append(partition)
        self.champion.append(OUTCOMES.index(champion))
        self.champion_score.append(champion_score)
        self.challenger.append(OUTCOMES.index(challenger))
        self.challenger_score.append(challenger_score)


@dataclass
class ReplayResult:
    config: ReplayConfig
    champion: str
    challenger: str
    decided: Decided = field(default_factory=Decided)
    #: Records of the range: read, duplicates, bad (with reasons), warm-up.
    read: int = 0
    duplicates: int = 0
    bad: Counter[str] = field(default_factory=Counter)
    warmup: int = 0
    fallbacks: Counter[str] = field(default_factory=Counter)
    #: Milliseconds spent per pipeline stage (decode, dedupe, features, rules, model, total).
    stage_ms: Counter[str] = field(default_factory=Counter)
    labels_fed: int = 0
    bad_labels: int = 0
    #: transaction_id -> is_fraud, every label read for the range's transactions.
    labels: dict[str, bool] = field(default_factory=dict)
    published: int = 0
    seconds: float = 0.0
    ranges: dict[int, tuple[int, int | None]] = field(default_factory=dict)


def _load_models(settings: Settings, config: ReplayConfig) -> tuple[Any, Any]:
    registry = Registry(settings.scoring.models_dir)
    champion = config.champion or registry.pointer(ACTIVE)
    if champion is None:
        raise ReplayError(f"no --champion and no ACTIVE version in {registry.root}")
    loaded = []
    for version in (champion, config.challenger):
        if version not in registry.versions():
            raise ReplayError(f"no version {version!r} in {registry.root}")
        try:
            loaded.append(registry.load(version))
        except Exception as exc:  # a refused artifact: say why
            raise ReplayError(f"version {version} cannot be loaded: {exc}") from exc
    return loaded[0], loaded[1]


def build_pipeline(settings: Settings, codecs: Codecs, champion: Any, challenger: Any,
                   partitions: int, online: bool) -> tuple[Pipeline, MemoryStore]:
    """The live worker's pipeline on a fresh in-memory state, without a deadline; the
    caller writes each batch's ``feature_writes`` to the store, as the worker's committer
    does."""
    fs = settings.features
    store = MemoryStore(partitions)
    engine = FeatureEngine(
        FeatureConfig(allowed_lateness_ms=int(fs.allowed_lateness_s * 1000),
                      label_delay_ms=int(fs.label_delay_s * 1000)), store)
    return Pipeline(
        codecs, rules_in_force(settings),
        Limits.from_settings(settings),
        input_format=settings.codec.input_format, features=engine,
        models=ModelStage(active=champion, shadow=challenger),
        budget_ms=float("inf"),
        online=OnlineStage(store, settings.scoring.online_max_weight) if online else None,
        decision_records=False,  # the champion's verdicts go to the report, not a topic
    ), store


def run_replay(settings: Settings, config: ReplayConfig, progress: Any = None) -> ReplayResult:
    """Replay the range; ``progress(n)`` is called with the records read per batch."""
    out_topic = config.topic or settings.topics.decisions_shadow
    if out_topic in (settings.topics.decisions, settings.topics.dlq,
                     settings.topics.transactions, settings.topics.labels):
        raise ReplayError(f"a replay never writes to {out_topic!r}: name another --topic")
    champion, challenger = _load_models(settings, config)
    codecs = Codecs(make_registry(settings.codec.registry_url, settings.codec.registry_username,
                                  settings.codec.registry_password), settings.topics)
    group = f"fraudstream-replay-{config.replay_id}"
    w = settings.worker
    # An aligned worker decides in event time: so does the replay (see the module doc).
    by_event_time = w.align_wait_ms > 0 and not w.repartition
    reader = RangeReader(settings, config, group, event_time_of(settings, codecs),
                         by_event_time)
    label_delay_ms = int(settings.features.label_delay_s * 1000)
    pipeline, store = build_pipeline(settings, codecs, champion, challenger,
                              max(reader.partitions) + 1, config.online)
    result = ReplayResult(config, champion.version, challenger.version)
    result.ranges = {p: (r.first, r.stop) for p, r in reader.ranges.items()}
    # bounded client queues: a replay reads and writes as fast as it can
    producer = Producer({**settings.kafka.client_config(), "linger.ms": 50,
                         "queue.buffering.max.kbytes": 65536}) if config.publish else None
    headers = [(REPLAY_HEADER, config.replay_id.encode())]
    seen: set[bytes] = set()  # dedupe keys decided: a repeat is counted, not decided again

    def lookup(_partition: int, keys: list[bytes]) -> list[bytes | None]:
        return [b"" if k in seen else None for k in keys]

    labels: list[RawRecord] | None = None
    label_times: list[int] = []
    fed = batches = 0
    thresholds = gc.get_threshold()
    gc.set_threshold(50_000, 20, 20)  # fewer young collections: batches make many objects
    t0 = time.monotonic()
    try:
        for batch in reader.batches():
            if labels is None:
                labels = read_labels(settings, reader.partitions,
                                     min(rec.timestamp_ms for _, rec, _t in batch)
                                     - LABEL_LOOKBACK_MS, group)
                due_at: dict[int, float] = {}
                for k, lab in enumerate(labels):
                    # every label of the range's transactions, for the measures
                    try:
                        rec = pipeline.read_label(lab)
                    except (DecodeError, ValidationError):
                        due_at[k] = float("-inf")  # counted as a bad label when it is fed
                        continue
                    tid = rec["transaction_id"]
                    result.labels[tid] = result.labels.get(tid, False) or bool(rec["is_fraud"])
                    due_at[k] = rec["label_time"] + label_delay_ms
                # The feature log serves labels looking for their features: the replay
                # knows every label to come, so it logs only the transactions one will read.
                pipeline.feature_log_for = result.labels
                if by_event_time:  # as the aligner: when they start to count
                    order = sorted(range(len(labels)), key=lambda k: (due_at[k], k))
                    labels = [labels[k] for k in order]
                    label_times = [due_at[k] for k in order]
                else:
                    label_times = [lab.timestamp_ms for lab in labels]
            until = bisect.bisect_right(label_times, max(t for _, _r, t in batch))
            due, fed = labels[fed:until], max(fed, until)
            result.labels_fed += len(due)
            for role, records in _runs(batch):
                if not records and not due:
                    continue
                res = pipeline.process(records, lookup, due)
                due = []
                store.write(res.feature_writes)
                seen.update(key for _p, key, _v in res.new_entries)
                _count_rejects(result, res, codecs, settings.topics.labels)
                if role == "warmup":
                    result.warmup += len(records)
                    continue
                _collect(result, res, len(records))
                if producer is not None:
                    for key, value in res.shadow:
                        producer.produce(out_topic, key=key, value=value, headers=headers)
                    result.published += len(res.shadow)
                    producer.poll(0)
            if progress is not None:
                progress(len(batch))
            batches += 1
            if batches % FREEZE_EVERY == 0:
                # The state and the report's columns only grow: what survived a collection
                # moves out of the collector's sight, or every full collection would walk
                # the whole replay again (that doubled the cost per record).
                gc.collect()
                gc.freeze()
    finally:
        gc.unfreeze()
        gc.set_threshold(*thresholds)
        reader.close()
        if producer is not None and producer.flush(60) != 0:
            raise ReplayError("challenger decisions not all delivered")
    result.seconds = time.monotonic() - t0
    return result


def _runs(batch: list[tuple[str, RawRecord, float]]) -> list[tuple[str, list[RawRecord]]]:
    """The batch as runs of one role, in order (warm-up records come first in each
    partition; with event-time bounds, records outside the range that feed the state can
    come between the range's)."""
    runs: list[tuple[str, list[RawRecord]]] = []
    for role, rec, _t in batch:
        if runs and runs[-1][0] == role:
            runs[-1][1].append(rec)
        else:
            runs.append((role, [rec]))
    return runs or [("range", [])]


def event_time_of(settings: Settings, codecs: Codecs) -> EventTimeOf:
    """A transaction record's event time, as the worker's aligner reads it."""
    avro = settings.codec.input_format == "avro"
    decode = codecs.transaction.decode if avro else decode_json
    of = record_times(decode, decode, settings.topics.transactions, 0,
                      codecs.transaction.event_time if avro else None)
    topic = settings.topics.transactions
    return lambda value: of(topic, value)


def _count_rejects(result: ReplayResult, res: Any, codecs: Codecs, labels_topic: str) -> None:
    for _key, value in res.dead_letters:
        dl = codecs.dead_letter.decode(value)
        if dl["source_topic"] == labels_topic:
            result.bad_labels += 1
        else:
            result.bad[f"{dl['error_kind']}:{dl['field'] or '-'}"] += 1


def _collect(result: ReplayResult, res: Any, n_records: int) -> None:
    """The batch's new decisions of both sides, into the columns of the report."""
    result.read += n_records
    result.stage_ms.update(res.timings_ms)
    result.duplicates += res.duplicates
    result.fallbacks.update(res.fallbacks)
    challenger = res.shadow_verdicts
    if challenger is None:  # the challenger failed on this batch (counted in fallbacks)
        challenger = [{"decision": "none", "score": float("nan")}] * len(res.verdicts)
    add = result.decided.add
    for (rec, txn), a, b in zip(res.fresh, res.verdicts, challenger, strict=True):
        add(txn["transaction_id"], txn["card_id"], txn["event_time"], rec.partition,
            a["decision"], a["score"], b["decision"], b["score"])
