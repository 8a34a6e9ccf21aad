"""``fraudstream replay``: a range of ``transactions`` through a champion and a challenger.

The replay reads the range with its own consumer: partitions assigned by hand, offsets
never committed, so the live workers' group never sees it. It rebuilds the features from
empty in its own memory (optionally warmed up on an earlier stretch of the topic), and
runs the live worker's :class:`fraudstream.streams.pipeline.Pipeline`: dedupe, features, rules, the
champion as the active model and the challenger as the shadow, each through the same
cascade (thresholds, guardrails, online blend). It writes the challenger's decisions to
``decisions.shadow`` (or ``--topic``), each with a ``fraudstream-replay-id`` header; it
never writes to ``decisions``, the dead-letter topic or the live state.

Order: the partitions' records are merged by Kafka timestamp (each partition keeping its
own order), which is how a worker meets them on live traffic. Merchant, device and IP
features add up events across partitions, so this order is what makes them match live
ones; reading partition chunk by chunk, as a worker does on a backlog, would not.

Range bounds (``--from``, ``--to``, ``--warmup-from``): an integer is an offset, used on
every chosen partition; anything else is a time (ISO 8601, or ``@<epoch ms>``). Times
follow Kafka's ``offsets_for_times`` meaning (a partition's range starts at its first
record whose Kafka timestamp is at or after the time), resolved on the records read: the
embedded broker answers that lookup only to the record batch. ``--from`` is included and
``--to`` is not; without ``--to`` the range ends at the end of each partition when the
replay starts.

Labels: the ``labels`` records (co-partitioned with ``transactions``) reach the features
and the online learners in Kafka timestamp order, each before the first transaction batch
past its timestamp, from 31 days before the first record read (the merchant fraud
features count the labels of the last 30 days, which a replay starting from empty state
would otherwise miss) to the end of the range. The
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
import uuid
import zlib
from array import array
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from confluent_kafka import Consumer, Producer, TopicPartition

from fraudstream.schemas.codec import Codecs, DecodeError, make_registry
from fraudstream.schemas.validate import ValidationError
from fraudstream.scorers.cascade import ModelStage
from fraudstream.scorers.online import OnlineStage
from fraudstream.scorers.registry import ACTIVE, Registry
from fraudstream.scorers.rules import RuleSet, RulesScorer
from fraudstream.state.engine import FeatureConfig, FeatureEngine, MemoryStore
from fraudstream.streams.pipeline import Limits, Pipeline, RawRecord
from fraudstream.streams.settings import Settings

REPLAY_HEADER = "fraudstream-replay-id"
OUTCOMES = ("approve", "review", "decline", "none")
#: Labels this far before the first record read are fed too: the merchant fraud features
#: count the labels of the last 30 complete days.
LABEL_LOOKBACK_MS = 31 * 86_400_000
#: Records buffered per partition before it is paused (while others catch up in time).
MAX_BUFFERED = 20_000
#: Batches between two freezes of the garbage collector's survivors.
FREEZE_EVERY = 5
#: Reading stops on a partition whose end is unknown after this long without a record.
IDLE_S = 2.0


class ReplayError(Exception):
    """A replay that cannot start: bad bounds, an unknown version, a forbidden topic."""


@dataclass(frozen=True)
class Bound:
    kind: str  # "offset" or "time"
    value: int

    @staticmethod
    def parse(text: str) -> Bound:
        text = text.strip()
        if text.lstrip("-").isdigit():
            if int(text) < 0:
                raise ReplayError(f"offset {text} is negative")
            return Bound("offset", int(text))
        if text.startswith("@") and text[1:].isdigit():
            return Bound("time", int(text[1:]))
        try:
            when = datetime.fromisoformat(text.replace("Z", "+00:00"))
        except ValueError:
            raise ReplayError(f"{text!r} is neither an offset, an ISO 8601 time nor "
                              "@<epoch ms>") from None
        if when.tzinfo is None:
            raise ReplayError(f"time {text!r} has no time zone (add Z or +00:00)")
        return Bound("time", int(when.timestamp() * 1000))


@dataclass
class ReplayConfig:
    challenger: str
    start: Bound
    end: Bound | None = None
    champion: str | None = None  # the registry's ACTIVE version
    partitions: list[int] | None = None  # all
    warmup: Bound | None = None
    topic: str | None = None  # the challenger's decisions; decisions.shadow
    publish: bool = True
    online: bool = True
    batch: int = 500
    replay_id: str = field(default_factory=lambda: time.strftime("%Y%m%d-%H%M%S-")
                           + uuid.uuid4().hex[:6])


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


def _watermarks(consumer: Consumer, topic: str, partitions: list[int]
                ) -> dict[int, tuple[int, int]]:
    return {p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
            for p in partitions}


def _seek_offsets(consumer: Consumer, topic: str, partitions: list[int], bound: Bound,
                  marks: dict[int, tuple[int, int]]) -> dict[int, int]:
    """Where reading starts on each partition for ``bound`` (a time: at or before its
    first record at or after the time; records before it are skipped as read)."""
    if bound.kind == "offset":
        return {p: min(max(bound.value, marks[p][0]), marks[p][1]) for p in partitions}
    found = consumer.offsets_for_times(
        [TopicPartition(topic, p, bound.value) for p in partitions], timeout=10)
    return {tp.partition: tp.offset if tp.offset >= 0 else marks[tp.partition][1]
            for tp in found}


class _PartitionRange:
    """One partition's records of the range (and of its warm-up), filtered as read."""

    def __init__(self, first: int, start: Bound, end: Bound | None, stop: int | None,
                 warmup: Bound | None) -> None:
        self.first = first  # where reading starts
        self.start, self.end, self.warmup = start, end, warmup
        self.stop = stop  # offset where the range ends, None: read until idle
        self.started = start.kind == "offset" and first >= start.value
        self.warming = warmup is not None and warmup.kind == "offset"
        self.done = stop is not None and first >= stop

    def classify(self, offset: int, ts: int) -> str | None:
        """"range", "warmup", or None (outside); sets ``done`` at the range's end."""
        if self.done:
            return None
        if self.stop is not None and offset >= self.stop:
            self.done = True
            return None
        if self.end is not None and self.end.kind == "time" and ts >= self.end.value:
            self.done = True  # the first record at or after --to ends the range
            return None
        if self.stop is not None and offset + 1 >= self.stop:
            self.done = True  # the range's last record: nothing may follow it for long
        if not self.started:
            s = self.start
            self.started = offset >= s.value if s.kind == "offset" else ts >= s.value
        if self.started:
            return "range"
        if self.warmup is not None and not self.warming:
            w = self.warmup
            self.warming = offset >= w.value if w.kind == "offset" else ts >= w.value
        return "warmup" if self.warming else None


class RangeReader:
    """Batches of the range's ``transactions`` records, with their role (range/warm-up)."""

    def __init__(self, settings: Settings, config: ReplayConfig, group: str) -> None:
        self.settings = settings
        self.topic = settings.topics.transactions
        self.consumer = Consumer({**settings.kafka.consumer_config(group),
                                  "enable.auto.offset.store": False,
                                  "queued.max.messages.kbytes": 16384})
        meta = self.consumer.list_topics(self.topic, timeout=10).topics.get(self.topic)
        if meta is None or meta.error is not None or not meta.partitions:
            raise ReplayError(f"topic {self.topic!r} not found")
        partitions = sorted(meta.partitions)
        if config.partitions is not None:
            unknown = set(config.partitions) - set(partitions)
            if unknown:
                raise ReplayError(f"{self.topic} has no partition {sorted(unknown)}")
            partitions = sorted(config.partitions)
        self.partitions = partitions
        marks = _watermarks(self.consumer, self.topic, partitions)
        first = _seek_offsets(self.consumer, self.topic, partitions,
                              config.warmup or config.start, marks)
        # On the embedded broker the end offset understates the last batch: the range's
        # end is then found by reading until the partition stays idle.
        until_end = self.settings.kafka.embedded
        stops: dict[int, int | None] = {}
        for p in partitions:
            if config.end is not None and config.end.kind == "offset":
                stops[p] = config.end.value
            elif config.end is not None and not until_end:
                stops[p] = _seek_offsets(self.consumer, self.topic, [p], config.end, marks)[p]
            else:
                stops[p] = None if until_end else marks[p][1]
        if config.warmup is not None and config.start.kind == "offset" and \
                config.warmup.kind == "offset" and config.warmup.value > config.start.value:
            raise ReplayError("--warmup-from must come before --from")
        self.ranges = {p: _PartitionRange(first[p], config.start, config.end, stops[p],
                                          config.warmup) for p in partitions}
        #: Next offset to read, and the end offset when the replay started.
        self.position = dict(first)
        self.ends = {p: marks[p][1] for p in partitions}
        self.consumer.assign([TopicPartition(self.topic, p, first[p]) for p in partitions])
        self.batch = config.batch

    def batches(self) -> Iterator[list[tuple[str, RawRecord]]]:
        """The records in Kafka timestamp order across partitions (each partition's own
        order kept), as a live worker meets them on live traffic; in batches."""
        buffers: dict[int, deque[tuple[str, RawRecord]]] = {p: deque() for p in self.partitions}
        paused: set[int] = set()
        idle_since = time.monotonic()
        while True:
            finished = all(r.done for r in self.ranges.values())
            if not finished:
                msgs = self.consumer.consume(self.batch * 4, 0.5)
                for m in msgs:
                    if m.error():
                        continue
                    p = m.partition()
                    r = self.ranges[p]
                    self.position[p] = m.offset() + 1
                    ts_type, ts = m.timestamp()
                    ts = ts if ts_type and ts >= 0 else 0
                    role = r.classify(m.offset(), ts)
                    if role is not None:
                        buffers[p].append((role, RawRecord(m.topic(), p, m.offset(), m.key(),
                                                           m.value(), ts)))
                if msgs:
                    idle_since = time.monotonic()
                elif time.monotonic() - idle_since > IDLE_S:
                    for r in self.ranges.values():
                        r.done = True  # read to the end (or the end offset is gone)
                self._flow(buffers, paused)
            out = self._merge(buffers)
            for i in range(0, len(out), self.batch):
                yield out[i:i + self.batch]
            if finished and not any(buffers.values()):
                return

    def _merge(self, buffers: dict[int, deque[tuple[str, RawRecord]]]
               ) -> list[tuple[str, RawRecord]]:
        """Take records, earliest timestamp first, while no partition that may still hold
        an earlier record has none buffered."""
        def waiting(p: int) -> bool:
            return (not buffers[p] and not self.ranges[p].done
                    and self.position[p] < self.ends[p])

        out: list[tuple[str, RawRecord]] = []
        while not any(waiting(p) for p in self.partitions):
            heads = [(buf[0][1].timestamp_ms, p) for p, buf in buffers.items() if buf]
            if not heads:
                break
            _, first = min(heads)
            buf = buffers[first]
            ts_next = min((t for t, p in heads if p != first), default=None)
            # the partition's run of records up to the next head's timestamp, in one go
            while buf and (ts_next is None or buf[0][1].timestamp_ms <= ts_next):
                out.append(buf.popleft())
        return out

    def _flow(self, buffers: dict[int, deque[tuple[str, RawRecord]]], paused: set[int]) -> None:
        """Pause finished partitions, and ones far ahead of the others (memory bound)."""
        stop, go = [], []
        for p, r in self.ranges.items():
            full = len(buffers[p]) > MAX_BUFFERED
            if (r.done or full) and p not in paused:
                paused.add(p)
                stop.append(TopicPartition(self.topic, p))
            elif p in paused and not r.done and len(buffers[p]) < MAX_BUFFERED // 4:
                paused.discard(p)
                go.append(TopicPartition(self.topic, p))
        if stop:
            self.consumer.pause(stop)
        if go:
            self.consumer.resume(go)

    def close(self) -> None:
        self.consumer.close()


def read_labels(settings: Settings, partitions: list[int], since_ms: int, group: str,
                ) -> list[RawRecord]:
    """``labels`` records of ``partitions`` with a Kafka timestamp from ``since_ms`` to the
    end of the topic, sorted by (timestamp, partition, offset)."""
    topic = settings.topics.labels
    consumer = Consumer(settings.kafka.consumer_config(group))
    try:
        meta = consumer.list_topics(topic, timeout=10).topics.get(topic)
        if meta is None or meta.error is not None:
            return []
        parts = [p for p in partitions if p in meta.partitions]
        marks = _watermarks(consumer, topic, parts)
        first = _seek_offsets(consumer, topic, parts, Bound("time", since_ms), marks)
        consumer.assign([TopicPartition(topic, p, first[p]) for p in parts])
        out: list[RawRecord] = []
        # The end offsets at start, where the broker reports them right; the embedded
        # broker's understate the last batch, so there the topic is read until idle.
        left = {p: marks[p][1] for p in parts if first[p] < marks[p][1]}
        idle_since = time.monotonic()
        while time.monotonic() - idle_since < IDLE_S and (left or settings.kafka.embedded):
            msgs = consumer.consume(1000, 0.5)
            for m in msgs:
                if m.error():
                    continue
                if m.offset() + 1 >= left.get(m.partition(), 0):
                    left.pop(m.partition(), None)
                _, ts = m.timestamp()
                if ts >= since_ms:
                    out.append(RawRecord(topic, m.partition(), m.offset(), m.key(), m.value(),
                                         ts))
            if msgs:
                idle_since = time.monotonic()
    finally:
        consumer.close()
    out.sort(key=lambda r: (r.timestamp_ms, r.partition, r.offset))
    return out


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
        codecs, RulesScorer(RuleSet.load(settings.scoring.rules_path)),
        Limits.from_settings(settings),
        input_format=settings.codec.input_format, features=engine,
        models=ModelStage(active=champion, shadow=challenger),
        budget_ms=float("inf"),
        online=OnlineStage(store, settings.scoring.online_max_weight) if online else None,
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
    reader = RangeReader(settings, config, group)
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
    labelled: set[bytes] = set()
    fed = batches = 0
    thresholds = gc.get_threshold()
    gc.set_threshold(50_000, 20, 20)  # fewer young collections: batches make many objects
    t0 = time.monotonic()
    try:
        for batch in reader.batches():
            if labels is None:
                labels = read_labels(settings, reader.partitions,
                                     min(rec.timestamp_ms for _, rec in batch)
                                     - LABEL_LOOKBACK_MS, group)
                label_times = [lab.timestamp_ms for lab in labels]
                for lab in labels:  # every label of the range's transactions, for the measures
                    try:
                        rec = pipeline.read_label(lab)
                    except (DecodeError, ValidationError):
                        continue  # counted as a bad label when it is fed
                    tid = rec["transaction_id"]
                    result.labels[tid] = result.labels.get(tid, False) or bool(rec["is_fraud"])
                labelled = {tid.encode() for tid in result.labels}
            until = bisect.bisect_right(label_times, max(rec.timestamp_ms for _, rec in batch))
            due, fed = labels[fed:until], max(fed, until)
            result.labels_fed += len(due)
            # Warm-up records first (they come first in each partition), then the range.
            warm = [rec for role, rec in batch if role == "warmup"]
            rng = [rec for role, rec in batch if role == "range"]
            for role, records in (("warmup", warm), ("range", rng)):
                if not records and not due:
                    continue
                res = pipeline.process(records, lookup, due)
                due = []
                # The feature log serves labels looking for their features: the replay
                # knows every label to come, so it keeps only the entries one will read.
                store.write([w for w in res.feature_writes
                             if not w[1].startswith(b"f|") or w[1].split(b"|", 2)[2] in labelled])
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
