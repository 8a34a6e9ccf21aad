"""Bulk recovery of the state table from its changelog, before Faust's own recovery.

Faust recovers a table partition by passing every changelog record through its consumer
and message machinery: about 5k records/s here, so a worker holding 1M cards would take
minutes to start on a fresh machine. When a partition is assigned, :func:`install` first
reads its changelog from the locally persisted offset with librdkafka and writes it into
the partition's RocksDB in write batches (the same raw keys and values Faust would write),
then records the persisted offset. Faust's recovery then starts from there and finds
little or nothing left to do; it still owns the last step (and the consistency rules).

Only the RocksDB store benefits (the memory store keeps Faust's path).
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import time
from collections.abc import Iterable
from typing import Any

from confluent_kafka import Consumer, TopicPartition

log = logging.getLogger("fraudstream.restore")

#: Fewer records than this left to recover: leave them to Faust.
MIN_RECORDS = 20_000
_WRITE_EVERY = 20_000


def restore_partition(db: Any, offset_key: bytes, consumer_config: dict[str, Any],
                      topic: str, partition: int, idle_s: float = 1.0) -> int:
    """Apply ``topic``/``partition`` from the offset after the one ``db`` holds under
    ``offset_key`` to the end; returns how many records were applied."""
    from rocksdict import WriteBatch

    raw = db.get(offset_key)
    persisted = int(raw) if raw is not None else None
    consumer = Consumer({**consumer_config, "enable.partition.eof": True,
                         "fetch.max.bytes": 16 << 20, "queued.max.messages.kbytes": 32768})
    try:
        low, high = consumer.get_watermark_offsets(TopicPartition(topic, partition), 15.0)
        if (persisted is not None and persisted >= high
                and not holds_offset(consumer, topic, partition, persisted)):
            # Faust would seek past the end and never read what was written since.
            log.warning("%s[%d] ends before offset %d, which this store had applied: the "
                        "topic was made again (a broker that lost its data); reading it "
                        "from its start over the local store", topic, partition, persisted)
            persisted = low - 1
            db.put(offset_key, str(persisted).encode())  # where Faust's recovery starts
        start = max(low, persisted + 1 if persisted is not None else low)
        if high - start < MIN_RECORDS:
            return 0
        consumer.assign([TopicPartition(topic, partition, start)])
        batch, applied, last = WriteBatch(raw_mode=True), 0, -1
        quiet_since: float | None = None
        while True:
            msgs = consumer.consume(10_000, 0.2)
            records = [m for m in msgs if not m.error()]
            if not records:
                # Past the end it was told (the embedded broker may report an end lower
                # than the last record): stop once nothing more came for ``idle_s``.
                # Before it, wait for the broker (up to a minute without progress).
                quiet_since = quiet_since or time.monotonic()
                waited = time.monotonic() - quiet_since
                if waited >= (idle_s if last >= high - 1 else 60.0):
                    if last < high - 1:
                        log.warning("%s[%d]: no records past offset %d of %d for %.0f s; "
                                    "Faust's recovery goes on from there", topic, partition,
                                    last, high, waited)
                    break
                continue
            quiet_since = None
            for m in records:
                value = m.value()
                if value is None:
                    batch.delete(m.key())
                else:
                    batch.put(m.key(), value)
                last = m.offset()
            applied += len(records)
            if len(batch) >= _WRITE_EVERY:
                batch.put(offset_key, str(last).encode())
                db.write(batch)
                batch = WriteBatch(raw_mode=True)
        if last >= 0:
            batch.put(offset_key, str(last).encode())
            db.write(batch)
        return applied
    finally:
        consumer.close()


def holds_offset(consumer: Any, topic: str, partition: int, offset: int,
                 timeout_s: float = 3.0) -> bool:
    """Whether ``topic``/``partition`` still holds ``offset`` or a later record (the
    record at ``offset`` may be compacted away). For a position at or past the reported
    end: the embedded broker reports the base offset of the last record batch as the end,
    so only a fetch tells a partition that holds it from one made again since. No record
    within ``timeout_s`` (the end, or past it: the broker answers such a fetch with
    nothing) counts as not held. Leaves ``consumer`` unassigned."""
    consumer.assign([TopicPartition(topic, partition, offset)])
    try:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for m in consumer.consume(1, 0.2):
                return m.error() is None and m.offset() >= offset
        return False
    finally:
        consumer.unassign()


class Restoring:
    """Whether a bulk restore is under way (the worker is not ready meanwhile)."""

    def __init__(self) -> None:
        self.running = False


def install(app: Any, table: Any, source_topic: str,
            consumer_config: dict[str, Any]) -> Restoring:
    """Run :func:`restore_partition` for the table partitions of every assignment, before
    Faust's recovery of them."""
    recovery = app.tables.recovery
    original = recovery.on_rebalance
    state = Restoring()

    async def on_rebalance(assigned: set[Any], revoked: set[Any], newly_assigned: set[Any],
                           generation_id: int = 0) -> None:
        store = table.data
        if hasattr(store, "_db_for_partition"):
            partitions = sorted({tp.partition for tp in assigned if tp.topic == source_topic})
            if partitions:
                loop = asyncio.get_running_loop()
                state.running = True
                try:
                    await loop.run_in_executor(None, _restore_all, store, table, partitions,
                                               consumer_config)
                finally:
                    state.running = False
        await original(assigned, revoked, newly_assigned, generation_id)

    recovery.on_rebalance = on_rebalance
    return state


def _restore_all(store: Any, table: Any, partitions: Iterable[int],
                 consumer_config: dict[str, Any]) -> None:
    topic = table.changelog_topic.get_topic_name()
    t0 = time.monotonic()
    total = 0
    for p in partitions:
        total += restore_partition(store._db_for_partition(p), store.offset_key,
                                   consumer_config, topic, p)
    if total:
        took = time.monotonic() - t0
        log.info("restored %d changelog records of %s in %.1f s (%.0f/s)", total, topic,
                 took, total / took)
        _release_memory()


def _release_memory() -> None:
    """Give the fetch buffers of a bulk restore back to the system (glibc keeps freed
    memory in its arenas otherwise, and the worker's RSS would stay inflated)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass
