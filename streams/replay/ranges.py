"""Reading a replay's range: its bounds and configuration, the partitions' watermarks and
start offsets, and :class:`RangeReader`, which merges the partitions' records in event
time as an aligned worker does (or by Kafka timestamp, as a worker without alignment
meets live traffic), each partition keeping its own order, and pauses a partition that
runs ahead; :func:`read_labels` reads the labels that reach the features before and
during the range. What is done with the records is
:mod:`fraudstream.streams.replay.engine`'s job."""

from __future__ import annotations

import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime

from confluent_kafka import Consumer, TopicPartition

from fraudstream.streams.pipeline import RawRecord
from fraudstream.streams.settings import Settings
from fraudstream.streams.topics import last_batch_in, offsets_at, read_since

#: Records buffered per partition before it is paused (while others catch up in time).
#: A pause drops what the client had fetched for the partition, so the merge later waits
#: for it to be fetched again: at 20,000, 0.2-0.4 s every ~85k records of a 4-partition
#: range on the embedded broker; at 60,000 (~36 MB of records a partition) that wait came
#: once in 400k, and the reading process's peak RSS did not change.
MAX_BUFFERED = 60_000
#: Reading stops on a partition whose end is unknown after this long without a record.
IDLE_S = 2.0


class ReplayError(Exception):
    """A replay that cannot start: bad bounds, an unknown version, a forbidden topic."""


#: (value bytes) -> a transaction's event time in ms, None when it cannot be read.
EventTimeOf = Callable[[bytes | None], int | None]


@dataclass(frozen=True)
class Bound:
    kind: str  # "offset", "time" (Kafka timestamp) or "event" (the transaction's event time)
    value: int

    @staticmethod
    def parse(text: str, event_time: bool = False) -> Bound:
        """An offset, or a time: a Kafka timestamp, or with ``event_time`` the
        transaction's own ``event_time``."""
        bound = Bound._parse(text)
        return Bound("event", bound.value) if event_time and bound.kind == "time" else bound

    @staticmethod
    def _parse(text: str) -> Bound:
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
    #: 2: the decisions in a second process, on a second core (see
    #: :mod:`fraudstream.streams.replay.decider`); 1: all in this one.
    processes: int = 2
    replay_id: str = field(default_factory=lambda: time.strftime("%Y%m%d-%H%M%S-")
                           + uuid.uuid4().hex[:6])


def _watermarks(consumer: Consumer, topic: str, partitions: list[int]
                ) -> dict[int, tuple[int, int]]:
    return {p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
            for p in partitions}


def _seek_offsets(consumer: Consumer, topic: str, partitions: list[int], bound: Bound,
                  marks: dict[int, tuple[int, int]]) -> dict[int, int]:
    """Where reading starts on each partition for ``bound`` (a time: at or before its
    first record at or after the time; records before it are skipped as read; an event
    time: at the partition's start, as event times are not indexed)."""
    if bound.kind == "offset":
        return {p: min(max(bound.value, marks[p][0]), marks[p][1]) for p in partitions}
    if bound.kind == "event":
        return {p: marks[p][0] for p in partitions}
    return offsets_at(consumer, topic, partitions, bound.value,
                      {p: marks[p][1] for p in partitions})


class _PartitionRange:
    """One partition's records of the range (and of its warm-up), filtered as read.

    With event-time bounds a record is in the range when its event time is in
    ``[from, to)``. The partition ends at its first record past ``to`` by more than the
    allowed lateness (``lateness_ms``): a later one could only be too late. Records read
    after the range began that are outside it (late ones from before ``from``, early ones
    from after ``to``) reach the state, not the report: a worker would have met them."""

    def __init__(self, first: int, start: Bound, end: Bound | None, stop: int | None,
                 warmup: Bound | None, lateness_ms: int = 0) -> None:
        self.first = first  # where reading starts
        self.start, self.end, self.warmup = start, end, warmup
        self.stop = stop  # offset where the range ends, None: read until idle
        self.lateness_ms = lateness_ms
        self.started = start.kind == "offset" and first >= start.value
        self.warming = warmup is not None and warmup.kind == "offset"
        self.done = stop is not None and first >= stop

    @staticmethod
    def _reached(bound: Bound, offset: int, ts: int, et: int | None) -> bool:
        if bound.kind == "offset":
            return offset >= bound.value
        if bound.kind == "time":
            return ts >= bound.value
        return et is not None and et >= bound.value

    def classify(self, offset: int, ts: int, et: int | None = None) -> str | None:
        """"range", "warmup" (the state only), or None (outside); sets ``done`` at the
        range's end. ``et``: the record's event time (needed for event-time bounds)."""
        if self.done:
            return None
        if self.stop is not None and offset >= self.stop:
            self.done = True
            return None
        end = self.end
        if end is not None and end.kind == "time" and ts >= end.value:
            self.done = True  # the first record at or after --to ends the range
            return None
        if end is not None and end.kind == "event" and et is not None \
                and et >= end.value + self.lateness_ms:
            self.done = True  # past --to by more than the lateness: nothing more is in it
            return None
        if self.stop is not None and offset + 1 >= self.stop:
            self.done = True  # the range's last record: nothing may follow it for long
        after = end is not None and end.kind == "event" and et is not None \
            and et >= end.value
        s = self.start
        if s.kind == "event":
            inside = not after and (self._reached(s, offset, ts, et)
                                    or (et is None and self.started))
            if inside:
                self.started = True
                return "range"
        else:
            if not self.started:
                self.started = self._reached(s, offset, ts, et)
            if self.started and not after:
                return "range"
        if self.warmup is not None and not self.warming:
            self.warming = self._reached(self.warmup, offset, ts, et)
        return "warmup" if self.warming or self.started else None


class RangeReader:
    """Batches of the range's ``transactions`` records, with their role (range/warm-up)
    and the time they were merged by.

    ``event_time_of`` reads a record's event time; with ``by_event_time`` the partitions
    are merged by it (an unreadable one goes at once), else by Kafka timestamp."""

    def __init__(self, settings: Settings, config: ReplayConfig, group: str,
                 event_time_of: EventTimeOf | None = None, by_event_time: bool = False
                 ) -> None:
        bounds = [b for b in (config.start, config.end, config.warmup) if b is not None]
        if event_time_of is None and (by_event_time or any(b.kind == "event" for b in bounds)):
            raise ValueError("event times are needed: pass event_time_of")
        times = [b for b in bounds if b.kind != "offset"]
        if times and len({b.kind for b in times}) > 1:
            raise ReplayError("--from, --to and --warmup-from are all Kafka times or all "
                              "event times")
        self.event_time_of = event_time_of
        self.by_event_time = by_event_time
        self.need_event_time = by_event_time or any(b.kind == "event" for b in bounds)
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
        # end is then found by reading that batch to its end (see ``last_batch_in``), or
        # until the partition stays idle.
        until_end = self.until_end = self.settings.kafka.embedded
        stops: dict[int, int | None] = {}
        for p in partitions:
            if config.end is not None and config.end.kind == "offset":
                stops[p] = config.end.value
            elif config.end is not None and config.end.kind == "event":
                stops[p] = None if until_end else marks[p][1]  # ends past --to (lateness)
            elif config.end is not None and not until_end:
                stops[p] = _seek_offsets(self.consumer, self.topic, [p], config.end, marks)[p]
            else:
                stops[p] = None if until_end else marks[p][1]
        if config.warmup is not None and config.start.kind == config.warmup.kind and \
                config.warmup.value > config.start.value:
            raise ReplayError("--warmup-from must come before --from")
        if config.end is not None and config.start.kind == config.end.kind and \
                config.end.value <= config.start.value:
            raise ReplayError("--to must come after --from")
        lateness = int(settings.features.allowed_lateness_s * 1000)
        self.ranges = {p: _PartitionRange(first[p], config.start, config.end, stops[p],
                                          config.warmup, lateness) for p in partitions}
        #: Next offset to read, and the end offset when the replay started.
        self.position = dict(first)
        #: On the embedded broker: partitions whose last batch (as the end offset says)
        #: has been fetched since they were last paused (a pause drops what is queued).
        self.reached: set[int] = set()
        self.ends = {p: marks[p][1] for p in partitions}
        self.consumer.assign([TopicPartition(self.topic, p, first[p]) for p in partitions])
        self.batch = config.batch

    def batches(self) -> Iterator[list[tuple[str, RawRecord, float]]]:
        """(role, record, merge time): the records in event-time order across partitions
        (or Kafka timestamp order), each partition's own order kept, as a worker meets
        them; in batches of ``config.batch`` records, the last one shorter. The batches do
        not depend on how the fetches fell: labels go in between batches and the learners
        learn per batch, so the same range gives the same decisions on every run."""
        buffers: dict[int, deque[tuple[str, RawRecord, float]]] = {
            p: deque() for p in self.partitions}
        merged: list[tuple[str, RawRecord, float]] = []  # not yet a whole batch
        event_time_of = self.event_time_of
        paused: set[int] = set()
        idle_since = time.monotonic()
        asked = self.batch * 4
        while True:
            finished = all(r.done for r in self.ranges.values())
            if not finished:
                # Every partition's last batch reached: the rest of it is queued, so a
                # read that does not wait tells the end (no 0.5 s wait at the end).
                ended = self.until_end and all(
                    r.done or p in self.reached for p, r in self.ranges.items())
                msgs = self.consumer.consume(asked, 0.0 if ended else 0.5)
                for m in msgs:
                    if m.error():
                        continue
                    p = m.partition()
                    r = self.ranges[p]
                    self.position[p] = m.offset() + 1
                    if self.position[p] >= self.ends[p]:
                        self.reached.add(p)
                    ts_type, ts = m.timestamp()
                    ts = ts if ts_type and ts >= 0 else 0
                    et = event_time_of(m.value()) if self.need_event_time else None
                    role = r.classify(m.offset(), ts, et)
                    if role is not None:
                        key = (float("-inf") if et is None else float(et)) \
                            if self.by_event_time else float(ts)
                        buffers[p].append((role, RawRecord(m.topic(), p, m.offset(), m.key(),
                                                           m.value(), ts), key))
                if msgs:
                    idle_since = time.monotonic()
                elif time.monotonic() - idle_since > IDLE_S:
                    for r in self.ranges.values():
                        r.done = True  # read to the end (or the end offset is gone)
                if self.until_end and last_batch_in(len(msgs), asked):
                    for p in self.reached:
                        self.ranges[p].done = True
                self._flow(buffers, paused)
            merged += self._merge(buffers)
            last = finished and not any(buffers.values())
            whole = len(merged) if last else len(merged) - len(merged) % self.batch
            for i in range(0, whole, self.batch):
                yield merged[i:i + self.batch]
            del merged[:whole]
            if last:
                return

    def _merge(self, buffers: dict[int, deque[tuple[str, RawRecord, float]]]
               ) -> list[tuple[str, RawRecord, float]]:
        """Take records, earliest time first (ties: the lower partition), while no
        partition that may still hold an earlier record has none buffered."""
        def waiting(p: int) -> bool:
            # the embedded broker's end offset understates the last batch: there a
            # partition may hold more until it is found idle
            return (not buffers[p] and not self.ranges[p].done
                    and (self.until_end or self.position[p] < self.ends[p]))

        out: list[tuple[str, RawRecord, float]] = []
        while not any(waiting(p) for p in self.partitions):
            heads = [(buf[0][2], p) for p, buf in buffers.items() if buf]
            if not heads:
                break
            _, first = min(heads)
            buf = buffers[first]
            following = min(((t, p) for t, p in heads if p != first), default=None)
            # the partition's run of records up to the next head, in one go
            while buf and (following is None or (buf[0][2], first) < following):
                out.append(buf.popleft())
        return out

    def _flow(self, buffers: dict[int, deque[tuple[str, RawRecord, float]]],
              paused: set[int]) -> None:
        """Pause finished partitions, and ones far ahead of the others (memory bound)."""
        stop, go = [], []
        for p, r in self.ranges.items():
            full = len(buffers[p]) > MAX_BUFFERED
            if (r.done or full) and p not in paused:
                paused.add(p)
                self.reached.discard(p)
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
    end of the topic when the read starts (:func:`~fraudstream.streams.topics.read_since`),
    sorted by (timestamp, partition, offset)."""
    topic = settings.topics.labels
    consumer = Consumer(settings.kafka.consumer_config(group))
    try:
        meta = consumer.list_topics(topic, timeout=10).topics.get(topic)
        if meta is None or meta.error is not None:
            return []
        parts = [p for p in partitions if p in meta.partitions]
        out = [RawRecord(topic, m.partition(), m.offset(), m.key(), m.value(),
                         m.timestamp()[1])
               for m in read_since(consumer, topic, parts, since_ms, settings.kafka.embedded,
                                   IDLE_S)]
    finally:
        consumer.close()
    out.sort(key=lambda r: (r.timestamp_ms, r.partition, r.offset))
    return out
