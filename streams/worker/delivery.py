"""Writing one batch's results out, in the order that makes delivery at-least-once
without ever giving a transaction two different decisions.

The order (:meth:`BatchCommitter.commit`):

1. **Decide** (done before, by :class:`fraudstream.streams.pipeline.Pipeline`): nothing written yet.
2. **Record** the batch's changed feature records in the feature store, then each new
   decision in the dedupe state (transaction_id -> decision bytes); the state queues the
   changelog records (with the RocksDB backend both share one changelog, features first).
3. **Flush the state**: wait until the feature store and the broker acknowledged them,
   so the dedupe entry (and the features it was decided with) outlives a crash. A feature
   store that is down (Redis) does not stop decisions: its writes are counted as lost.
4. **Publish** the decisions and dead letters, and wait for the broker's acknowledgement
   of every one of them (delivery reports).
5. **Acknowledge the input** (the caller, by returning): only now may the consumer
   commit the batch's offsets (Faust commits acknowledged offsets every
   ``FRAUDSTREAM_WORKER_COMMIT_INTERVAL_S``).

A crash before 3 completes: no decision was published, the input is redelivered and
decided afresh. A crash after 3 and before 5: the input is redelivered, the dedupe state
already holds the first decision, and those same bytes are published again. So every
transaction gets a decision, and a transaction_id never gets two different ones
(consumers may see the identical record twice: key it by transaction_id).

If step 3 or 4 fails, :meth:`commit` raises and the batch is not acknowledged. One
exception: a dead letter the broker refuses (too large for it, say) does not fail the
batch, or that one record would stop its partition for good: it is sent again without
the original value, and if that is refused too it is logged as an error (source topic,
partition, offset, reason) and counted in ``fraudstream_dead_letters_lost_total``
(:mod:`fraudstream.streams.dead_letters`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

from confluent_kafka import KafkaError, KafkaException, Producer

from fraudstream.state.engine import StateStore, StateUnavailable
from fraudstream.streams.batch import BatchResult
from fraudstream.streams.dead_letters import DeadLetters

log = logging.getLogger("fraudstream.delivery")

#: (topic, index of the record in that topic's batch, the broker's or client's error).
Refusal = tuple[str, int, str]


class DeliveryError(RuntimeError):
    """The broker did not acknowledge a record of the batch."""


class DedupeState(Protocol):
    def record(self, entries: Sequence[tuple[int, bytes, bytes]]) -> None:
        """Store (partition, dedupe key, decision bytes) entries; queue their changelog."""

    async def flush(self) -> None:
        """Return once everything recorded so far is acknowledged by the broker."""


class Sink(Protocol):
    async def publish(
        self, batches: Sequence[tuple[str, Sequence[tuple[bytes | None, bytes]]]],
        tolerant: Sequence[str] = (),
    ) -> list[Refusal]:
        """Produce (topic, [(key, value)]) batches; return once all are acknowledged.
        A record of a ``tolerant`` topic that is refused for good (an error in its
        delivery report, or refused by the client at produce time) is returned instead
        of failing the whole call."""


class BatchCommitter:
    def __init__(self, state: DedupeState, sink: Sink, decisions: str, dlq: str,
                 features: StateStore | None = None, features_topic: str = "features",
                 by_card_topic: str = "transactions.by-card",
                 shadow_topic: str = "decisions.shadow", drift_topic: str = "drift",
                 encode_drift: Any = None, dead_letters: DeadLetters | None = None,
                 on_lost: Callable[[str], None] | None = None) -> None:
        self.state = state
        self.sink = sink
        self.decisions_topic = decisions
        self.dlq_topic = dlq
        self.features = features
        self.features_topic = features_topic
        self.by_card_topic = by_card_topic
        self.shadow_topic = shadow_topic
        self.drift_topic = drift_topic
        self.encode_drift = encode_drift
        #: Feature records the store could not take (it was down).
        self.lost_feature_writes = 0
        #: Rebuilds a refused dead letter without its value (None: no second try).
        self.dead_letters = dead_letters
        #: Called once per dead letter lost, with the error (a metric).
        self.on_lost = on_lost

    async def commit(self, result: BatchResult) -> None:
        """Steps 2-4 of the module docstring, in that order."""
        if result.feature_writes and self.features is not None:
            self.features.write(result.feature_writes)
        if result.new_entries:
            self.state.record(result.new_entries)
        if result.feature_writes and self.features is not None:
            try:
                await self.features.flush()
            except StateUnavailable:
                self.lost_feature_writes += len(result.feature_writes)
        if result.new_entries:
            await self.state.flush()
        batches = [(self.decisions_topic, result.decisions), (self.dlq_topic, result.dead_letters)]
        if result.feature_log:
            batches.append((self.features_topic, result.feature_log))
        if result.forwards:
            batches.append((self.by_card_topic, result.forwards))
        if result.shadow:
            batches.append((self.shadow_topic, result.shadow))
        if result.drift_events and self.encode_drift is not None:
            batches.append((self.drift_topic, [(e["feature"].encode(), self.encode_drift(e))
                                               for e in result.drift_events]))
        refused = await self.sink.publish(batches, tolerant=(self.dlq_topic,))
        if refused:
            await self._refused(result.dead_letters,
                                [(i, why) for topic, i, why in refused if topic == self.dlq_topic])

    async def _refused(self, letters: Sequence[tuple[bytes | None, bytes]],
                       refused: list[tuple[int, str]]) -> None:
        """Dead letters the broker refused: again without their value, else lost."""
        again: list[tuple[bytes | None, bytes]] = []
        first: list[str] = []
        for i, why in refused:
            key, value = letters[i]
            if self.dead_letters is None:
                self._lost(value, why)
                continue
            try:
                stripped = self.dead_letters.without_payload(value, why)
            except Exception as exc:  # our own encoding; never lets the batch fail
                self._lost(value, f"{why}; cannot rebuild it: {exc}")
                continue
            log.warning("dead letter %s refused (%s): sent again without the value",
                        self.dead_letters.describe(value), why)
            again.append((key, stripped))
            first.append(why)
        if not again:
            return
        for _topic, i, why in await self.sink.publish([(self.dlq_topic, again)],
                                                      tolerant=(self.dlq_topic,)):
            self._lost(again[i][1], f"{first[i]}; then without the value: {why}")

    def _lost(self, value: bytes, why: str) -> None:
        where = (self.dead_letters.describe(value) if self.dead_letters is not None
                 else f"({len(value)} bytes)")
        log.error("dead letter LOST, the broker refused it: %s: %s", where, why)
        if self.on_lost is not None:
            self.on_lost(why)


class KafkaSink:
    """Batched produce through librdkafka: one delivery wait per batch, not per record."""

    def __init__(self, config: dict[str, Any], flush_timeout_s: float = 60.0) -> None:
        self.flush_timeout_s = flush_timeout_s
        conf = {
            "linger.ms": 1,
            "acks": "all",
            "enable.idempotence": True,
            "compression.type": "lz4",
            "queue.buffering.max.messages": 1_000_000,
            **config,
        }
        self.producer = Producer(conf)

    async def publish(
        self, batches: Sequence[tuple[str, Sequence[tuple[bytes | None, bytes]]]],
        tolerant: Sequence[str] = (),
    ) -> list[Refusal]:
        refused: list[Refusal] = []
        await self.send(
            ((topic, None, key, value) for topic, records in batches for key, value in records),
            tolerant=[(topic, refused) for topic, _ in batches if topic in tolerant],
            offsets=False,
        )
        return refused

    async def send(
        self, records: Iterable[tuple[str, int | None, bytes | None, bytes | None]],
        tolerant: Sequence[tuple[str, list[Refusal]]] = (),
        offsets: bool = True,
    ) -> dict[tuple[str, int], int]:
        """Produce (topic, partition or None, key, value) records and wait until the broker
        acknowledged every one. Returns the highest offset written per (topic, partition).
        Raises :class:`DeliveryError` if any record was not acknowledged, except those of
        the ``tolerant`` topics refused for good: they are appended, as (topic, index
        among that topic's records, error), to the list given with the topic. Records
        still queued after ``flush_timeout_s`` always raise (the broker is unreachable,
        not refusing one record). ``offsets=False``: the offsets are not kept (an empty
        dict is returned), which spares three calls per delivery report."""
        errors: list[KafkaError] = []
        last: dict[tuple[str, int], int] = {}
        refusals = dict(tolerant)
        seen: dict[str, int] = dict.fromkeys(refusals, 0)

        def on_delivery(err: KafkaError | None, msg: Any) -> None:
            if err is not None:
                errors.append(err)
                return
            tp = (msg.topic(), msg.partition())
            offset = msg.offset()
            if offset > last.get(tp, -1):
                last[tp] = offset

        def on_error(err: KafkaError | None, _msg: Any) -> None:
            if err is not None:
                errors.append(err)

        default = on_delivery if offsets else on_error

        def tolerated(out: list[Refusal], topic: str, index: int) -> Callable[..., None]:
            def on_report(err: KafkaError | None, msg: Any) -> None:
                if err is not None:
                    out.append((topic, index, _error_text(err)))
                else:
                    on_delivery(err, msg)
            return on_report

        produce = self.producer.produce
        count = 0
        many = getattr(self.producer, "produce_many", None)  # the renewing producer's
        if many is not None:
            # One call for the records of topics that are not tolerant: it keeps one entry
            # per send for a renewal, not one per record. The rest take the loop below.
            records = list(records)
            plain = [r for r in records if r[0] not in refusals] if refusals else records
            count = many(plain, default)
            records = plain[count:] + [r for r in records if r[0] in refusals] \
                if refusals else plain[count:]
        for topic, partition, key, value in records:
            count += 1
            out = refusals.get(topic) if refusals else None
            if out is None:
                try:  # the common case, one call (positional: -1 is the partitioner's)
                    produce(topic, value, key, -1 if partition is None else partition, default)
                    continue
                except (BufferError, KafkaException):
                    pass  # the loop below waits for room, or says why it was refused
                report = default
            else:
                index = seen[topic]
                seen[topic] = index + 1
                report = tolerated(out, topic, index)
            while True:
                try:
                    if partition is None:
                        produce(topic, value=value, key=key, on_delivery=report)
                    else:
                        produce(topic, value=value, key=key, partition=partition,
                                on_delivery=report)
                    break
                except BufferError:  # local queue full: serve callbacks and retry
                    self.producer.poll(0.05)
                except KafkaException as exc:  # refused by the client (too large, ...)
                    if out is None:
                        raise DeliveryError(f"record for {topic} refused: {exc}") from exc
                    out.append((topic, index, _error_text(exc.args[0])))
                    count -= 1
                    break
        if not count:
            return last
        # flush() serves every delivery callback; it blocks, so run it off the event loop.
        loop = asyncio.get_running_loop()
        left = await loop.run_in_executor(None, self.producer.flush, self.flush_timeout_s)
        if errors or left:
            first = errors[0] if errors else f"{left} still queued"
            raise DeliveryError(f"{len(errors) + left} record(s) not acknowledged: {first}")
        return last


def _error_text(err: Any) -> str:
    if isinstance(err, KafkaError):
        return f"{err.name()}: {err.str()}"
    return str(err)


__all__ = ["BatchCommitter", "DedupeState", "DeliveryError", "KafkaSink", "Sink"]
