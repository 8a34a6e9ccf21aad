"""A librdkafka producer that is replaced when it stops getting acknowledgements.

Why: the idempotent producer keeps a producer id that the broker issued. The embedded
broker keeps those ids in memory; once restarted it answers every produce of the old id
with UNKNOWN_PRODUCER_ID, and librdkafka bumps the epoch and retries the same id, forever
(measured: 560 refusals in 19 s, nothing delivered, no error reported to the
application). The worker's batch then waited out the 60 s delivery timeout and the worker
exited, with no log line before. Apache Kafka accepts such a retry, but any broker that
lost the producer's state could wedge it the same way.

:class:`RenewingProducer` stands in for :class:`confluent_kafka.Producer` in
:class:`fraudstream.streams.worker.delivery.KafkaSink`. It remembers what was produced
until a flush finds nothing left queued. When a flush sees no acknowledgement for
``stuck_s`` seconds with records queued, it purges the old producer (its reports are
ignored), builds a new one (a new producer id) and produces every record not yet confirmed
again, in their order, with their callbacks. A record may so be written twice
(at-least-once, as after a crash: decisions are keyed by transaction_id, and a repeated
changelog record holds the same value), never lost.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from confluent_kafka import KafkaException

log = logging.getLogger("fraudstream.worker")

#: (topic, partition or None, key, value)
_Record = tuple[str, int | None, Any, Any]


class RenewingProducer:
    """Per send it keeps one entry of a table, dropped in bulk: a flush that ends with
    nothing queued confirms everything produced before it started. Delivery reports go
    through one wrapper per caller's callback and producer, which drops the reports of a
    replaced producer. :meth:`produce_many` takes a whole send: a record costs the
    librdkafka call, as with no renewal. (An entry and a ``partial`` per record, dropped
    per report, cost ~3 µs of CPU per record: ``python -m fraudstream.loadtest.sink``.)"""

    def __init__(self, factory: Callable[[], Any], stuck_s: float,
                 on_renew: Callable[[int], None] | None = None) -> None:
        self._factory = factory
        self._producer = factory()
        self.stuck_s = stuck_s
        self.on_renew = on_renew
        self._generation = 0
        self._seq = 0
        #: seq -> (records, the caller's callback, produce keywords), until confirmed.
        self._pending: dict[int, tuple[list[_Record], Any, dict[str, Any]]] = {}
        #: Every entry below this seq is confirmed (dropped from ``_pending``).
        self._confirmed = 0
        #: The entry being produced right now (None: none), which a flush on another
        #: thread must not confirm: some of its records may not be queued yet.
        self._producing: int | None = None
        #: id(callback) -> (callback, its wrapper for the current producer).
        self._reports: dict[int, tuple[Any, Callable[[Any, Any], None]]] = {}
        self._acks = 0
        self.renewals = 0

    def produce(self, topic: str, value: Any = None, key: Any = None,
                partition: int | None = None, on_delivery: Any = None,
                **kwargs: Any) -> None:
        """``Producer.produce``, with the same arguments (``callback`` too)."""
        if on_delivery is None and kwargs:
            on_delivery = kwargs.pop("callback", None)
        if partition == -1:  # librdkafka's "unassigned": the partitioner chooses
            partition = None
        records = [(topic, partition, key, value)]
        seq = self._open(records, on_delivery, kwargs)
        try:
            self._send(records, on_delivery, kwargs, full="raise")
        except BaseException:
            self._pending.pop(seq, None)
            raise
        finally:
            self._producing = None

    def produce_many(self, records: list[_Record], on_delivery: Any) -> int:
        """Produce (topic, partition or None, key, value) records in order, all with
        ``on_delivery``; returns how many were queued: fewer when librdkafka's queue
        filled or it refused a record, and the caller produces the rest."""
        seq = self._open(records, on_delivery, {})
        try:
            done = self._send(records, on_delivery, {}, full="stop")
        finally:
            self._producing = None
        if done < len(records):
            self._pending[seq] = (records[:done], on_delivery, {})
        return done

    def _open(self, records: list[_Record], on_delivery: Any, kwargs: dict[str, Any]) -> int:
        """A new entry for ``records``, marked as being produced (the caller unmarks it);
        returns its seq. Producing runs on one thread at a time (the event loop's). The
        mark is set before the seq moves past it: a flush reads the seq first (see
        :meth:`flush`)."""
        seq = self._seq
        self._producing = seq
        self._seq = seq + 1
        self._pending[seq] = (records, on_delivery, kwargs)
        return seq

    def _send(self, records: list[_Record], on_delivery: Any, kwargs: dict[str, Any],
              full: str) -> int:
        """Produce ``records`` on the current producer; returns how many. A full queue
        (BufferError) or a record the client refuses (KafkaException): ``full="raise"``
        raises it, ``"stop"`` returns there; ``"wait"`` waits for room (and raises a
        refusal)."""
        known = self._reports.get(id(on_delivery))
        report = known[1] if known is not None and known[0] is on_delivery \
            else self._wrap(on_delivery)
        done = 0
        while True:
            produce = self._producer.produce
            try:
                for topic, partition, key, value in records[done:] if done else records:
                    if kwargs:
                        produce(topic, value, key, -1 if partition is None else partition,
                                on_delivery=report, **kwargs)
                    else:  # positional: -1 is librdkafka's "unassigned"
                        produce(topic, value, key, -1 if partition is None else partition,
                                report)
                    done += 1
                return done
            except KafkaException:  # refused by the client (too large, ...)
                if full == "stop":
                    return done  # the caller's own produce of it says why
                raise
            except BufferError:
                if full == "stop":
                    return done
                if full == "raise":
                    raise
                self._producer.poll(0.05)

    def _wrap(self, on_delivery: Any) -> Callable[[Any, Any], None]:
        """The delivery callback given to the current producer for ``on_delivery``."""
        generation = self._generation

        def report(err: Any, msg: Any) -> None:
            if generation != self._generation:
                return  # a report of a replaced producer: the record was sent again
            self._acks += 1
            if on_delivery is not None:
                on_delivery(err, msg)

        if len(self._reports) >= 64:  # the sink makes new callbacks per send
            self._reports = {}
        self._reports[id(on_delivery)] = (on_delivery, report)
        return report

    def flush(self, timeout: float = -1) -> int:
        """Like ``Producer.flush``; a producer with records queued and no acknowledgement
        for ``stuck_s`` is replaced, and its records sent again, before the timeout."""
        deadline = time.monotonic() + timeout if timeout >= 0 else float("inf")
        acks, moved = self._acks, time.monotonic()
        # What a flush ending empty confirms: the entries before the seq read now, less
        # one still being produced on the event loop's thread (set before the seq moved
        # past it, so read after the seq).
        produced = self._seq
        producing = self._producing
        if producing is not None and producing < produced:
            produced = producing
        while True:
            left = self._producer.flush(max(0.0, min(1.0, deadline - time.monotonic())))
            if not left:
                self._confirm(produced)
                return 0
            now = time.monotonic()
            if self._acks != acks:
                acks, moved = self._acks, now
            elif self.stuck_s > 0 and now - moved >= self.stuck_s:
                self.renew()
                moved = now
            if now >= deadline:
                return len(self._producer)

    def _confirm(self, below: int) -> None:
        """Everything produced before seq ``below`` was reported: forget it. Two flushes
        may run at once, on two threads: an entry is dropped at most once, and a lower
        mark written last only makes a later call look again."""
        pending = self._pending
        for seq in range(self._confirmed, below):
            pending.pop(seq, None)
        if below > self._confirmed:
            self._confirmed = below

    def renew(self) -> None:
        """Replace the producer and produce every unconfirmed record again."""
        old = self._producer
        self._generation += 1
        self._reports = {}
        pending = sorted(self._pending.items())
        self.renewals += 1
        count = sum(len(records) for _seq, (records, _cb, _kw) in pending)
        log.error("producer: no acknowledgement for %.0f s with %d record(s) waiting; a new "
                  "producer (new producer id) sends them again (a broker that lost the "
                  "producer's state refuses the old one forever)", self.stuck_s, count)
        try:
            old.purge(True, True)
            old.flush(0)
        except Exception as exc:  # pragma: no cover - purging a wedged producer
            log.warning("producer: purging the old producer failed: %r", exc)
        self._producer = self._factory()
        for _seq, (records, on_delivery, kwargs) in pending:
            self._send(records, on_delivery, kwargs, full="wait")
        if self.on_renew is not None:
            self.on_renew(count)

    def poll(self, timeout: float = 0) -> int:
        return int(self._producer.poll(timeout))

    def __len__(self) -> int:
        return len(self._producer)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._producer, name)


def install(sink: Any, config: dict[str, Any], stuck_s: float,
            on_renew: Callable[[int], None] | None = None) -> None:
    """Give ``sink`` (a :class:`fraudstream.streams.worker.delivery.KafkaSink`) a renewing
    producer, each
    new one built as the sink builds its own (same configuration)."""
    if stuck_s <= 0:
        return
    first = sink.producer
    made = [first]

    def factory() -> Any:
        if made:
            return made.pop()
        return type(sink)(config).producer

    sink.producer = RenewingProducer(factory, stuck_s, on_renew)


__all__ = ["RenewingProducer", "install"]
