"""The worker says so when it stops making progress, and leaves read positions the broker
does not have.

Two ways a worker used to stop in silence, both handled here:

- **A read position the broker does not have.** Apache Kafka answers a fetch past a
  partition's end with OFFSET_OUT_OF_RANGE, and the consumer resets the position by the
  worker's ``auto.offset.reset`` policy; aiokafka only logs that at INFO.
  :class:`OutOfRangeLog` turns it into an error line and a count. A broker that lost its
  log (the embedded broker restarted: it keeps everything in memory) while committed
  offsets came back from somewhere answers such a fetch with no records and no error, and
  the worker waits for offsets that never come. :class:`ProgressTracker` sees a position
  past the partition's end (the end the fetch itself reported, and the listed end offset)
  twice in a row, and the watchdog seeks it by the same policy, with an error line and a
  count.
- **No progress.** A partition of an input topic with records behind the worker's handled
  offset, and no record of it handled for ``FRAUDSTREAM_WORKER_STALL_S`` seconds, is
  stalled: an error line names each such partition with its handled offset and end, the
  ``fraudstream_stalled_partitions`` gauge counts them, ``fraudstream_stall_seconds``
  tells how long the oldest has waited, and the ``FraudstreamWorkerStalled`` alert fires.
  A health endpoint's liveness check should fail on the same signal
  (:attr:`ProgressWatchdog.stalled`).

The watchdog runs on a timer of the worker, reading the consumer's own state (positions
and the end each fetch reported) and listing end offsets once per check; the batch
consumer (:mod:`fraudstream.streams.worker.batching`) reports each handled batch
(:meth:`ProgressTracker.handled`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("fraudstream.worker")

#: The longest fetch wait :meth:`ProgressWatchdog._longer_fetch_wait` goes to.
MAX_FETCH_WAIT_MS = 640
#: Records waiting on the broker this long (or stall_s, if shorter) with no fetch
#: returning them, while the handler is idle: the fetch wait is raised.
STARVED_S = 5.0

#: What aiokafka's fetcher logs (at INFO) when the broker says a position is out of range.
AIOKAFKA_OUT_OF_RANGE = "Fetch offset %s is out of range for partition %s, resetting offset"


@dataclass(frozen=True)
class PartitionView:
    """One input partition as the consumer sees it at a check."""

    topic: str
    partition: int
    #: The next offset the consumer will fetch (None: not known yet, e.g. being reset).
    position: int | None
    #: The partition's end: the larger of the end the last fetch reported and the listed
    #: end offset (the embedded broker understates the latter). None: not known.
    end: int | None
    #: The last fetch's answer is recent (its end can be trusted to judge the position).
    fresh: bool = True


@dataclass(frozen=True)
class Stall:
    topic: str
    partition: int
    #: The next offset to be handled (the last handled + 1, or where reading started).
    handled: int
    end: int
    idle_s: float

    def describe(self) -> str:
        return (f"{self.topic}[{self.partition}] next offset {self.handled}, "
                f"end {self.end}, nothing handled for {self.idle_s:.0f} s")


@dataclass(frozen=True)
class Reset:
    topic: str
    partition: int
    position: int
    end: int


class ProgressTracker:
    """Pure bookkeeping: what was handled when, and what a check concludes from it."""

    def __init__(self, stall_s: float) -> None:
        self.stall_s = stall_s
        #: (topic, partition) -> the next offset to handle, and when it last moved.
        self.next_offset: dict[tuple[str, int], int] = {}
        self.moved_at: dict[tuple[str, int], float] = {}
        self._beyond: dict[tuple[str, int], int] = {}
        #: Partitions with records in the handler's hands, and since when it has them
        #: (while it is busy, the consumer hands out nothing else).
        self.in_flight: set[tuple[str, int]] = set()
        self.busy_since: float | None = None

    def started(self, batch: Iterable[tuple[Any, Sequence[Any]]],
                now: float | None = None) -> None:
        """A batch's records are in the handler's hands: (tp, records) pairs."""
        self.busy_since = time.monotonic() if now is None else now
        for tp, recs in batch:
            if recs:
                self.in_flight.add((tp.topic, tp.partition))

    def handled(self, batch: Iterable[tuple[Any, Sequence[Any]]],
                now: float | None = None) -> None:
        """A batch's records were handled and acknowledged: (tp, records) pairs."""
        now = time.monotonic() if now is None else now
        self.busy_since = None
        for tp, recs in batch:
            if recs:
                key = (tp.topic, tp.partition)
                self.in_flight.discard(key)
                self.next_offset[key] = recs[-1].offset + 1
                self.moved_at[key] = now

    def reset(self, topic: str, partition: int, offset: int, now: float) -> None:
        """The position was moved (a reset): reading starts again from ``offset``."""
        key = (topic, partition)
        self.next_offset[key] = offset
        self.moved_at[key] = now
        self._beyond.pop(key, None)

    def check(self, views: Sequence[PartitionView],
              now: float | None = None) -> tuple[list[Reset], list[Stall]]:
        """Positions past the end (seen at two checks in a row, at the same position),
        and the partitions with records waiting (on the broker past the position, or in
        the handler's hands) of which nothing was handled for ``stall_s``. Partitions not
        in ``views`` (revoked) are forgotten."""
        now = time.monotonic() if now is None else now
        seen = {(v.topic, v.partition) for v in views}
        for key in [k for k in self.moved_at if k not in seen]:
            self.moved_at.pop(key, None)
            self.next_offset.pop(key, None)
            self._beyond.pop(key, None)
        resets: list[Reset] = []
        stalls: list[Stall] = []
        for v in views:
            key = (v.topic, v.partition)
            self.moved_at.setdefault(key, now)
            if v.position is not None and v.end is not None and v.fresh and v.position > v.end:
                if self._beyond.get(key) == v.position:
                    resets.append(Reset(v.topic, v.partition, v.position, v.end))
                else:
                    self._beyond[key] = v.position
                continue
            self._beyond.pop(key, None)
            waiting = key in self.in_flight or (
                v.position is not None and v.end is not None and v.end > v.position)
            if not waiting:
                self.moved_at[key] = now  # caught up: nothing to wait for
                continue
            idle = now - self.moved_at[key]
            if idle >= self.stall_s:
                handled = self.next_offset.get(key, v.position)
                stalls.append(Stall(v.topic, v.partition,
                                    handled if handled is not None else -1,
                                    v.end if v.end is not None else -1, idle))
        return resets, stalls


class OutOfRangeLog(logging.Filter):
    """Catches aiokafka's INFO line for a position the broker said is out of range (it then
    resets by ``auto.offset.reset``) and reports it as an error, counted."""

    def __init__(self, watchdog: ProgressWatchdog) -> None:
        super().__init__()
        self.watchdog = watchdog

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg == AIOKAFKA_OUT_OF_RANGE and isinstance(record.args, tuple) \
                and len(record.args) == 2:
            offset, tp = record.args
            self.watchdog.out_of_range(getattr(tp, "topic", str(tp)),
                                       int(getattr(tp, "partition", -1)), int(offset))
            return False  # said again, as an error, by the watchdog
        # The logger is set to INFO so that the line above reaches this filter; its other
        # lines show only as the worker's log level says.
        return record.levelno >= logging.getLogger().getEffectiveLevel()

    def install(self) -> None:
        logger = logging.getLogger("aiokafka.consumer.fetcher")
        logger.addFilter(self)
        logger.setLevel(logging.INFO)


class ProgressWatchdog:
    """Runs :class:`ProgressTracker` on the worker's consumer, logs, counts and resets."""

    def __init__(self, app: Any, topics: Iterable[str], stall_s: float,
                 metrics: Any = None) -> None:
        self.app = app
        self.topics = frozenset(topics)
        self.tracker = ProgressTracker(stall_s)
        self.metrics = metrics
        #: The partitions stalled at the last check (a liveness check fails on these).
        self.stalled: list[Stall] = []
        self._reported_at = 0.0
        self._wait_raised_at = float("-inf")
        #: (topic, partition) -> records not handled yet, at the last check (the batch
        #: handler sets the lag gauge too, but only for partitions that progress).
        self.lag: dict[tuple[str, int], int] = {}
        #: (topic, partition) -> position the broker said is out of range, reset pending.
        self._out_of_range: dict[tuple[str, int], int] = {}

    @property
    def interval_s(self) -> float:
        """How often to check: a stall is reported within stall_s + this."""
        return max(0.5, min(5.0, self.tracker.stall_s / 4))

    def started(self, batch: Iterable[tuple[Any, Sequence[Any]]]) -> None:
        self.tracker.started(batch)

    def handled(self, batch: Iterable[tuple[Any, Sequence[Any]]]) -> None:
        self.tracker.handled(batch)

    @property
    def policy(self) -> str:
        return str(getattr(self.app.conf, "consumer_auto_offset_reset", "earliest"))

    def out_of_range(self, topic: str, partition: int, offset: int) -> None:
        """The broker refused position ``offset`` of ``topic[partition]``: the consumer
        resets it by policy; the new position is logged at the next check."""
        log.error("offset out of range: %s[%d] position %d is not on the broker; resetting "
                  "to the %s offset (auto.offset.reset)", topic, partition, offset, self.policy)
        self._count_reset(topic, partition, "out_of_range")
        self._out_of_range[(topic, partition)] = offset

    def _count_reset(self, topic: str, partition: int, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.offset_resets.labels(topic, str(partition), reason).inc()

    async def check(self) -> list[Stall]:
        """One check: gather the views, reset positions past the end, report stalls."""
        views = await self.views()
        now = time.monotonic()
        if getattr(self.app, "in_recovery", False):
            # Restoring tables from their changelogs pauses the input: waiting, not
            # stalled (Faust logs the recovery's progress itself).
            views = [PartitionView(v.topic, v.partition, v.position, v.position, v.fresh)
                     for v in views]
        for v in views:
            old = self._out_of_range.get((v.topic, v.partition))
            if old is not None and v.position is not None and v.position != old:
                del self._out_of_range[(v.topic, v.partition)]
                log.error("offset out of range: %s[%d] reset from %d to %d", v.topic,
                          v.partition, old, v.position)
                self._forget_committed(v.topic, v.partition)
                self.tracker.reset(v.topic, v.partition, v.position, now)
        resets, stalls = self.tracker.check(views, now)
        self.lag = {}
        for v in views:
            if v.end is not None:
                key = (v.topic, v.partition)
                start = self.tracker.next_offset.get(key, v.position)
                if start is not None:
                    self.lag[key] = max(0, v.end - start)
                    if self.metrics is not None:
                        self.metrics.lag.labels(v.topic, str(v.partition)).set(self.lag[key])
        for r in resets:
            await self._reset(r, now)
        self._report(stalls, now)
        starved = [v for v in views if v.position is not None and v.end is not None
                   and v.end > v.position and now - self.tracker.moved_at.get(
                       (v.topic, v.partition), now) >= min(self.tracker.stall_s, STARVED_S)]
        if starved and self.tracker.busy_since is None \
                and now - self._wait_raised_at >= 2 * self.interval_s:
            self._wait_raised_at = now
            self._longer_fetch_wait(starved)
        return stalls

    def _longer_fetch_wait(self, starved: list[PartitionView]) -> None:
        """Records wait on the broker and no fetch brings them. The embedded broker lists
        every stored record batch of a partition on each fetch; past ~100k batches it does
        not answer within a 10 ms fetch wait and returns nothing, every time (measured).
        A longer wait lets it answer; Apache Kafka answers as soon as data is there, so
        there the longer wait costs nothing."""
        try:
            fetcher = self.app.consumer._thread._consumer._fetcher
        except Exception:
            return
        wait = int(getattr(fetcher, "_fetch_max_wait_ms", 0) or 0)
        if 0 < wait < MAX_FETCH_WAIT_MS:
            fetcher._fetch_max_wait_ms = min(MAX_FETCH_WAIT_MS, wait * 4)
            log.error("records wait on the broker and no fetch returns them (%s): fetch wait "
                      "raised from %d ms to %d ms", ", ".join(
                          f"{v.topic}[{v.partition}] at {v.position}, end {v.end}"
                          for v in starved), wait, fetcher._fetch_max_wait_ms)

    def _report(self, stalls: list[Stall], now: float) -> None:
        was = bool(self.stalled)
        self.stalled = stalls
        if self.metrics is not None:
            self.metrics.stalled_partitions.set(len(stalls))
            self.metrics.stall_seconds.set(max((s.idle_s for s in stalls), default=0.0))
        if stalls:
            if not was or now - self._reported_at >= self.tracker.stall_s:
                self._reported_at = now
                busy = self.tracker.busy_since
                why = (f"the batch handler has been busy with one batch for {now - busy:.0f} s "
                       "(deciding, or waiting for the broker to acknowledge its results)"
                       if busy is not None else "no fetch returns their records")
                log.error("stalled: no progress for %.0f s on %d input partition(s) with "
                          "records behind: %s; %s", self.tracker.stall_s, len(stalls),
                          "; ".join(s.describe() for s in stalls), why)
        elif was:
            log.warning("stall over: every input partition is progressing again")

    async def _reset(self, r: Reset, now: float) -> None:
        """Seek a position past the end by policy: to the first offset (earliest) or the
        end (latest)."""
        from faust.types import TP

        tp = TP(r.topic, r.partition)
        consumer = self.app.consumer
        try:
            if self.policy == "latest":
                target = r.end
            else:
                first = await asyncio.wait_for(consumer.earliest_offsets(tp), 10.0)
                target = int(first.get(tp, 0) or 0)
            await asyncio.wait_for(consumer._thread.seek_wait({tp: target}), 10.0)
        except Exception as exc:  # the broker is away again: the next check retries
            log.error("offset past the end: %s[%d] at %d, end %d: reset failed: %r",
                      r.topic, r.partition, r.position, r.end, exc)
            return
        self._forget_committed(r.topic, r.partition)
        self.tracker.reset(r.topic, r.partition, target, now)
        self._count_reset(r.topic, r.partition, "beyond_end")
        log.error("offset past the end: %s[%d] position %d is beyond the partition's end "
                  "%d (the broker lost its log?); reset to %d, the %s offset "
                  "(auto.offset.reset)", r.topic, r.partition, r.position, r.end, target,
                  self.policy)

    def _forget_committed(self, topic: str, partition: int) -> None:
        """After a reset, Faust's own bookkeeping still holds the old committed offset:
        acknowledgements below it would be dropped and nothing committed again."""
        from faust.types import TP

        tp = TP(topic, partition)
        consumer = self.app.consumer
        for name in ("_committed_offset", "_read_offset", "_acked", "_acked_index", "_gap"):
            getattr(consumer, name, {}).pop(tp, None)

    async def views(self) -> list[PartitionView]:
        """The assigned input partitions: position, end, freshness of the fetched end."""
        try:
            consumer = self.app.consumer._thread._consumer
            assignment = consumer._subscription.subscription.assignment
            tps = [tp for tp in assignment.tps if tp.topic in self.topics]
        except Exception:  # not started, or between two assignments
            return []
        listed: dict[Any, int] = {}
        if tps:
            try:
                listed = dict(await asyncio.wait_for(self.app.consumer.highwaters(*tps),
                                                     max(1.0, self.interval_s)))
            except Exception:  # the broker does not answer: the fetched ends still count
                listed = {}
        now_ms = time.time() * 1000.0
        fresh_ms = 3000.0 * self.interval_s
        views = []
        for tp in tps:
            try:
                state = assignment.state_value(tp)
            except Exception:
                continue
            position = state._position if state.has_valid_position else None
            ends = [e for e in (state.highwater, listed.get(tp)) if e is not None and e >= 0]
            fresh = state.timestamp is not None and now_ms - state.timestamp <= fresh_ms
            views.append(PartitionView(tp.topic, tp.partition, position,
                                       max(ends) if ends else None, fresh))
        return views


__all__ = ["AIOKAFKA_OUT_OF_RANGE", "OutOfRangeLog", "PartitionView", "ProgressTracker",
           "ProgressWatchdog", "Reset", "Stall"]
