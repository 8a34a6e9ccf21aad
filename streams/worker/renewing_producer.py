"""A librdkafka producer that is replaced when it stops getting acknowledgements.

Why: the idempotent producer keeps a producer id that the broker issued. The embedded
broker keeps those ids in memory; once restarted it answers every produce of the old id
with UNKNOWN_PRODUCER_ID, and librdkafka bumps the epoch and retries the same id, forever
(measured: 560 refusals in 19 s, nothing delivered, no error reported to the
application). The worker's batch then waited out the 60 s delivery timeout and the worker
exited, with no log line before. Apache Kafka accepts such a retry, but any broker that
lost the producer's state could wedge it the same way.

:class:`RenewingProducer` stands in for :class:`confluent_kafka.Producer` in
:class:`fraudstream.streams.worker.delivery.KafkaSink`. It remembers each record until its delivery
report;
when a flush sees no acknowledgement for ``stuck_s`` seconds with records queued, it
purges the old producer (its reports are ignored), builds a new one (a new producer id)
and produces the unacknowledged records again, in their order, with their callbacks. A
record may so be written twice (at-least-once, as after a crash: decisions are keyed by
transaction_id, and a repeated changelog record holds the same value), never lost.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from functools import partial
from typing import Any

log = logging.getLogger("fraudstream.worker")



class RenewingProducer:
    def __init__(self, factory: Callable[[], Any], stuck_s: float,
                 on_renew: Callable[[int], None] | None = None) -> None:
        self._factory = factory
        self._producer = factory()
        self.stuck_s = stuck_s
        self.on_renew = on_renew
        self._generation = 0
        self._seq = 0
        #: seq -> (produce arguments, the caller's callback), until delivered.
        self._pending: dict[int, tuple[Any, ...]] = {}
        self._acks = 0
        self.renewals = 0

    def produce(self, topic: str, value: Any = None, key: Any = None,
                partition: int | None = None, on_delivery: Any = None,
                **kwargs: Any) -> None:
        """``Producer.produce``, with the same arguments (``callback`` too)."""
        if on_delivery is None and kwargs:
            on_delivery = kwargs.pop("callback", None)
        seq = self._seq  # produce() runs on one thread at a time (the event loop's)
        self._seq = seq + 1
        if partition == -1:  # librdkafka's "unassigned": the partitioner chooses
            partition = None
        record = (topic, value, key, partition, kwargs, on_delivery)
        self._pending[seq] = record
        try:
            self._produce(seq, record)
        except BaseException:
            self._pending.pop(seq, None)
            raise

    def _produce(self, seq: int, record: tuple[Any, ...]) -> None:
        topic, value, key, partition, kwargs, on_delivery = record
        report = partial(self._delivered, seq, self._generation, on_delivery)
        if partition is None:
            self._producer.produce(topic, value, key, on_delivery=report, **kwargs)
        else:
            self._producer.produce(topic, value, key, partition, on_delivery=report, **kwargs)

    def _delivered(self, seq: int, generation: int, on_delivery: Any, err: Any,
                   msg: Any) -> None:
        if generation != self._generation:
            return  # a report of a replaced producer: the record was sent again
        del self._pending[seq]
        self._acks += 1
        if on_delivery is not None:
            on_delivery(err, msg)

    def flush(self, timeout: float = -1) -> int:
        """Like ``Producer.flush``; a producer with records queued and no acknowledgement
        for ``stuck_s`` is replaced, and its records sent again, before the timeout."""
        deadline = time.monotonic() + timeout if timeout >= 0 else float("inf")
        acks, moved = self._acks, time.monotonic()
        while True:
            left = self._producer.flush(max(0.0, min(1.0, deadline - time.monotonic())))
            if not left:
                return 0
            now = time.monotonic()
            if self._acks != acks:
                acks, moved = self._acks, now
            elif self.stuck_s > 0 and now - moved >= self.stuck_s:
                self.renew()
                moved = now
            if now >= deadline:
                return len(self._producer)

    def renew(self) -> None:
        """Replace the producer and produce every unacknowledged record again."""
        old = self._producer
        self._generation += 1
        pending = sorted(self._pending.items())
        self.renewals += 1
        log.error("producer: no acknowledgement for %.0f s with %d record(s) waiting; a new "
                  "producer (new producer id) sends them again (a broker that lost the "
                  "producer's state refuses the old one forever)", self.stuck_s, len(pending))
        try:
            old.purge(True, True)
            old.flush(0)
        except Exception as exc:  # pragma: no cover - purging a wedged producer
            log.warning("producer: purging the old producer failed: %r", exc)
        self._producer = self._factory()
        for seq, record in pending:
            while True:
                try:
                    self._produce(seq, record)
                    break
                except BufferError:
                    self._producer.poll(0.05)
        if self.on_renew is not None:
            self.on_renew(len(pending))

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
