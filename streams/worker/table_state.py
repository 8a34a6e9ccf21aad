"""The dedupe state: transaction_id -> first decision bytes, in a Faust table.

Faust owns the table: its RocksDB store per partition, its changelog topic, recovery from
the changelog when a partition is assigned, and the persisted offset that says where
recovery starts. What we change is how a batch's entries are written: Faust sends each
changelog record through its Python producer (about 100 us a record here), so
:class:`FaustTableState` writes the store entries itself and produces the changelog
records through the worker's librdkafka producer, one delivery wait per batch, then
records the persisted offsets as Faust's own send callback would.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import faust.streams
from faust.types import TP
from rocksdict import WriteBatch, WriteOptions

from fraudstream.streams.worker.delivery import KafkaSink

#: Changelog key of the embedded-broker end marker; never a transaction_id (NUL byte).
END_MARKER = b"\x00fraudstream:end-marker"


def rocksdb_options(worker: Any) -> dict[str, int]:
    """The state table's RocksDB options from the worker's settings
    (:class:`~fraudstream.streams.settings.WorkerSettings`). Faust's defaults (2 GiB block
    cache, 3 x 64 MiB write buffers per partition) would let RocksDB alone grow past a
    worker's memory budget, and a larger memtable costs more per write."""
    return {
        "block_cache_size": worker.rocksdb_block_cache_mb << 20,
        "block_cache_compressed_size": worker.rocksdb_block_cache_mb << 20,
        "write_buffer_size": worker.rocksdb_write_buffer_mb << 20,
        "max_write_buffer_number": 2,
    }


class _PartitionMessage:
    __slots__ = ("topic", "partition")

    def __init__(self, topic: str, partition: int) -> None:
        self.topic = topic
        self.partition = partition


class _PartitionEvent:
    """What Faust's store code reads of the current event: its message's partition."""

    __slots__ = ("message", "__weakref__")

    def __init__(self, topic: str, partition: int) -> None:
        self.message = _PartitionMessage(topic, partition)


@contextmanager
def _as_event(event: Any) -> Iterator[None]:
    """Make Faust's store see ``event`` as the current one: it picks the partition's
    RocksDB from the current event. A batch mixes partitions, so each partition's
    operations run under a stand-in event of that partition."""
    token = faust.streams._current_event.set(weakref.ref(event))
    try:
        yield
    finally:
        faust.streams._current_event.reset(token)


class FaustTableState:
    """The dedupe table, read and written once per partition per batch.

    ``end_marker`` (embedded broker only): Tansu reports a partition's end offset as the
    base offset of its last record batch + 1, so Faust's recovery would stop before the
    other records of the last batch and forget them. After each batch we append one
    tombstone for :data:`END_MARKER` to every changelog partition written, in a produce
    of its own: the reported end then lies past every real entry.
    """

    def __init__(self, table: Any, source_topic: str, sink: KafkaSink,
                 end_marker: bool = False, wal: bool = False) -> None:
        self.table = table
        self.source_topic = source_topic
        self.sink = sink
        self.end_marker = end_marker
        self.wal = wal
        self._unlogged: dict[int, Any] = {}
        store = table.data
        revoke = getattr(store, "revoke_partitions", None)
        if revoke is not None:
            def revoke_partitions(tbl: Any, tps: Any) -> None:
                # Faust closes a revoked partition's RocksDB by dropping its last reference:
                # a handle kept here would keep the file lock, and the partition could not
                # be opened again in this process (a worker crashed on the standby it was
                # given back after a rebalance: "lock hold by current process").
                for tp in tps:
                    self._unlogged.pop(tp.partition, None)
                revoke(tbl, tps)

            store.revoke_partitions = revoke_partitions
        self._events: dict[int, _PartitionEvent] = {}
        self._pending: list[tuple[int, bytes, bytes]] = []

    def _event(self, partition: int) -> _PartitionEvent:
        event = self._events.get(partition)
        if event is None:
            event = self._events[partition] = _PartitionEvent(self.source_topic, partition)
        return event

    def _db(self, partition: int) -> Any:
        """The partition's RocksDB, writing without its write-ahead log unless ``wal``.

        The changelog is what the store is recovered from, so the log only doubles it
        (~1 µs per record written). Without it a crash loses the writes since the last
        memtable flush: all of them after some point, since every write of a partition,
        Faust's persisted changelog offset included, goes through this handle in order.
        Recovery then starts at the older persisted offset and applies the changelog from
        there, as after any restart."""
        db = self.table.data._db_for_partition(partition)
        if not self.wal and self._unlogged.get(partition) is not db:
            options = WriteOptions()
            options.disable_wal = True
            db.set_write_options(options)
            self._unlogged[partition] = db
        return db

    def lookup(self, partition: int, keys: list[bytes]) -> list[bytes | None]:
        """The values of ``keys`` in ``partition``: one RocksDB multi-get (the table holds
        raw bytes, as its changelog does), or Faust's store API for the memory store."""
        store = self.table.data
        if hasattr(store, "_db_for_partition"):
            return self._db(partition).get(keys)
        with _as_event(self._event(partition)):
            return [store.get(k) for k in keys]

    def record(self, entries: Sequence[tuple[int, bytes, bytes]]) -> None:
        """Write the entries to the local store (one RocksDB write batch per partition);
        their changelog goes out in :meth:`flush`."""
        store = self.table.data
        if hasattr(store, "_db_for_partition"):
            batches: dict[int, WriteBatch] = {}
            for partition, key, value in entries:
                batch = batches.get(partition)
                if batch is None:
                    batch = batches[partition] = WriteBatch(raw_mode=True)
                batch.put(key, value)
            for partition, batch in batches.items():
                self._db(partition).write(batch)
        else:
            by_partition: dict[int, list[tuple[bytes, bytes]]] = {}
            for partition, key, value in entries:
                by_partition.setdefault(partition, []).append((key, value))
            for partition, items in by_partition.items():
                with _as_event(self._event(partition)):
                    for key, value in items:
                        store[key] = value
        self._pending.extend(entries)

    async def flush(self) -> None:
        """Produce the pending changelog records; return once the broker acknowledged
        them, then remember the persisted offsets (where recovery starts next time)."""
        pending, self._pending = self._pending, []
        if not pending:
            return
        last = await self._write_changelog(pending)
        if self.end_marker:
            changelog = self.table.changelog_topic.get_topic_name()
            await self.sink.send((changelog, p, END_MARKER, None) for _t, p in last)

    async def _write_changelog(
        self, records: Iterable[tuple[int, bytes, bytes | None]]
    ) -> dict[tuple[str, int], int]:
        """Produce (partition, key, value or tombstone) changelog records, wait for the
        broker, then record the persisted offsets as Faust's own send callback would."""
        changelog = self.table.changelog_topic.get_topic_name()
        last = await self.sink.send((changelog, p, k, v) for p, k, v in records)
        store = self.table.data
        for (topic, partition), offset in last.items():
            store.set_persisted_offset(TP(topic, partition), offset)
        return last

    async def expire(self, before_days: Mapping[int, int]) -> int:
        """Delete the entries of event days before ``before_days[partition]`` from the
        local RocksDB partitions, with changelog tombstones; returns how many. A partition
        missing from ``before_days`` (no event-time bound known yet) is left alone.

        Keys lead with the event day, so each partition is read from its first key to the
        first one that stays. The memory store keeps no per-partition files: it does not
        expire (it is for tests and demos).
        """
        dbs = getattr(self.table.data, "_dbs", None)
        if not dbs:
            return 0
        expired = _expired_entries(dbs, before_days)  # no handle held past it
        if not expired:
            return 0
        store = self.table.data
        for partition, key in expired:
            with _as_event(self._event(partition)):
                store.pop(key, None)
        await self._write_changelog((p, k, None) for p, k in expired)
        return len(expired)


def _expired_entries(dbs: dict[int, Any], before_days: Mapping[int, int]
                     ) -> list[tuple[int, bytes]]:
    """(partition, key) of the dedupe entries of event days before ``before_days``."""
    expired: list[tuple[int, bytes]] = []
    for partition, db in list(dbs.items()):
        before_day = before_days.get(partition)
        if before_day is None:
            continue
        stop = b"%05d|" % before_day
        for key in db.keys():
            if key >= stop:
                break
            if key[:5].isdigit():  # entries only, not Faust's own offset key
                expired.append((partition, key))
    return expired
