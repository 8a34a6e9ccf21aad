"""Writing one batch's results out, in the order that makes delivery at-least-once
without ever giving a transaction two different decisions.

The order (:meth:`BatchCommitter.commit`):

1. **Decide** (done before, by :class:`streams.pipeline.Pipeline`): nothing written yet.
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

If step 3 or 4 fails, :meth:`commit` raises and the batch is not acknowledged.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Sequence
from typing import Any, Protocol

from confluent_kafka import KafkaError, Producer

from state.engine import StateStore, StateUnavailable
from streams.pipeline import BatchResult


class DeliveryError(RuntimeError):
    """The broker did not acknowledge a record of the batch."""


class DedupeState(Protocol):
    def record(self, entries: Sequence[tuple[int, bytes, bytes]]) -> None:
        """Store (partition, dedupe key, decision bytes) entries; queue their changelog."""

    async def flush(self) -> None:
        """Return once everything recorded so far is acknowledged by the broker."""


class Sink(Protocol):
    async def publish(
        self, batches: Sequence[tuple[str, Sequence[tuple[bytes | None, bytes]]]]
    ) -> None:
        """Produce (topic, [(key, value)]) batches; return once all are acknowledged."""


class BatchCommitter:
    def __init__(self, state: DedupeState, sink: Sink, decisions: str, dlq: str,
                 features: StateStore | None = None, features_topic: str = "features",
                 by_card_topic: str = "transactions.by-card",
                 shadow_topic: str = "decisions.shadow", drift_topic: str = "drift",
                 encode_drift: Any = None) -> None:
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
        await self.sink.publish(batches)


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
        self, batches: Sequence[tuple[str, Sequence[tuple[bytes | None, bytes]]]]
    ) -> None:
        await self.send(
            (topic, None, key, value) for topic, records in batches for key, value in records
        )

    async def send(
        self, records: Iterable[tuple[str, int | None, bytes | None, bytes | None]]
    ) -> dict[tuple[str, int], int]:
        """Produce (topic, partition or None, key, value) records and wait until the broker
        acknowledged every one. Returns the highest offset written per (topic, partition).
        Raises :class:`DeliveryError` if any record was not acknowledged."""
        errors: list[KafkaError] = []
        last: dict[tuple[str, int], int] = {}

        def on_delivery(err: KafkaError | None, msg: Any) -> None:
            if err is not None:
                errors.append(err)
                return
            tp = (msg.topic(), msg.partition())
            offset = msg.offset()
            if offset > last.get(tp, -1):
                last[tp] = offset

        produce = self.producer.produce
        count = 0
        for topic, partition, key, value in records:
            count += 1
            while True:
                try:
                    if partition is None:
                        produce(topic, value=value, key=key, on_delivery=on_delivery)
                    else:
                        produce(topic, value=value, key=key, partition=partition,
                                on_delivery=on_delivery)
                    break
                except BufferError:  # local queue full: serve callbacks and retry
                    self.producer.poll(0.05)
        if not count:
            return last
        # flush() serves every delivery callback; it blocks, so run it off the event loop.
        loop = asyncio.get_running_loop()
        left = await loop.run_in_executor(None, self.producer.flush, self.flush_timeout_s)
        if errors or left:
            first = errors[0] if errors else f"{left} still queued"
            raise DeliveryError(f"{len(errors) + left} record(s) not acknowledged: {first}")
        return last


__all__ = ["BatchCommitter", "DedupeState", "DeliveryError", "KafkaSink", "Sink"]
