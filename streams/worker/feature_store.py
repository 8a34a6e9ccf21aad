"""The RocksDB backend of the feature state: records in the worker's Faust table.

Feature records share the Faust table of the dedupe entries (``<app_id>-state``):
RocksDB per partition, one changelog topic, recovery when a partition is assigned, all
handled by Faust. A batch's feature records and dedupe entries go to the changelog in one
produce, features first: once a decision's dedupe entry is acknowledged, so are the feature
records it was computed with.

Partials of merchants, devices and IPs: those of the partitions this worker owns come from
its table (and the cache); with a replica (:mod:`fraudstream.streams.worker.replica`, on by
default) those of every other partition come from it, so a merchant's features count all
of its events whichever worker decides. Without one, each worker sees the merchants'
events of its own partitions only.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from itertools import repeat
from typing import Any

from fraudstream.state.features import DAY_MS
from fraudstream.state.presence import MAX_PARTITIONS, MIN_PARTITIONS, TRACKED, Presence
from fraudstream.state.records import record_max_ts
from fraudstream.streams.worker.replica import EntityReplica, prefixed_keys
from fraudstream.streams.worker.table_state import FaustTableState, _as_event

log = logging.getLogger("fraudstream.features")

_MISS = object()
#: What a cached entry costs besides its key and value (dict slot, tuple, bytes headers).
_ENTRY_BYTES = 150


class TableFeatureStore:
    """Feature records in the worker's Faust table, with a write-through cache.

    The cache: this worker is the only writer of the records of the partitions it owns
    (and reads no others), so between two rebalances a record it read or wrote stays what
    it last saw, and so does a key it found empty. It keeps them in two generations of
    about ``cache_mb / 2`` each (a hit moves an entry to the young one; when the young one
    is full it becomes the old one and the old one is dropped), and empties both at every
    rebalance (:meth:`forget`) and after idle expiry. Records of other partitions, read
    from the replica, are cached too: before each read the keys the replica applied since
    the last one are dropped from the cache (:meth:`EntityReplica.take_changed`), so a
    cached record is at most one batch older than the replica."""

    def __init__(self, state: FaustTableState, owned: Callable[[], Sequence[int]],
                 cache_mb: float = 0.0, replica: EntityReplica | None = None,
                 partitions: int | None = None, presence: bool = True,
                 recovering: Callable[[], bool] = lambda: False) -> None:
        self.state = state
        #: Whether Faust is restoring table partitions from the changelog: an owned
        #: partition is indexed only once its store is whole.
        self._recovering = recovering
        self._owned_fn = owned
        self._owned: tuple[int, ...] = ()
        self._owned_set: frozenset[int] = frozenset()
        self.replica = replica
        self._all = tuple(range(replica.partitions)) if replica is not None else ()
        self.replica_reads = 0
        self._half = int(cache_mb * (1 << 20) / 2)
        self._young: dict[tuple[int, bytes], bytes | None] = {}
        self._old: dict[tuple[int, bytes], bytes | None] = {}
        self._young_bytes = 0
        self.cache_hits = 0
        self.cache_misses = 0
        #: Which partitions may hold a device's or an IP's partial, so the engine reads
        #: only those (:mod:`fraudstream.state.presence`). Owned partitions are indexed
        #: from the local store when assigned, the others by the replica.
        self.presence: Presence | None = None
        n = partitions or (replica.partitions if replica is not None else None) \
            or getattr(state.table, "partitions", None)
        if (presence and n and MIN_PARTITIONS <= n <= MAX_PARTITIONS
                and hasattr(state.table.data, "_db_for_partition")):
            self.presence = Presence(n)
            if replica is not None:
                replica.index_into(self.presence)
        self._scanned: set[int] = set()
        self.scanned_keys = 0

    def refresh(self) -> None:
        """Re-read which partitions this worker owns (call once per batch)."""
        owned = tuple(sorted(self._owned_fn()))
        if owned != self._owned:
            self.forget()
        self._owned = owned
        self._owned_set = frozenset(owned)
        if self.presence is not None:
            self._index_owned()

    def rebalanced(self, newly_assigned: Iterable[int] | None = None) -> None:
        """A rebalance happened: the stores of the partitions newly assigned (None: of
        every partition) may have been written by another worker since this one read
        them. Their device and IP keys are indexed again before the next batch."""
        self.forget()
        if newly_assigned is None:
            self._scanned.clear()
        else:
            self._scanned.difference_update(newly_assigned)

    def _index_owned(self) -> None:
        """Add the device and IP keys of owned partitions not indexed yet (just assigned,
        recovered by Faust) to :attr:`presence`, and tell it which partitions it knows:
        the owned ones, and the others once the replica indexed them."""
        presence, owned = self.presence, self._owned_set
        assert presence is not None
        self._scanned &= owned
        # A store still being restored would be indexed without the keys restored later,
        # and a key left out is never read there: read such partitions everywhere for now.
        todo = [] if self._recovering() else sorted(owned - self._scanned)
        if todo:
            t0, n = time.perf_counter(), 0
            for p in todo:
                db = self.state._db(p)
                for prefix in TRACKED:
                    keys = prefixed_keys(db, prefix)
                    presence.add(p, keys)
                    n += len(keys)
                self._scanned.add(p)
            self.scanned_keys += n
            log.info("presence: %d device and IP keys of partitions %s indexed in %.2f s",
                     n, todo, time.perf_counter() - t0)
        known = sum(1 << p for p in self._scanned)
        replica = self.replica
        if replica is not None and replica.indexed.is_set():
            known |= (1 << replica.partitions) - 1
        presence.set_indexed(known)

    def forget(self) -> None:
        """Empty the cache (partitions were assigned or revoked: a store may change)."""
        self._young, self._old, self._young_bytes = {}, {}, 0

    def readable(self, partition: int) -> Sequence[int]:
        if self._all:
            return self._all
        return self._owned if partition in self._owned else (partition, *self._owned)

    def read(self, keys: Sequence[tuple[int, bytes]]) -> list[bytes | None]:
        replica = self.replica
        if replica is not None and self._half:
            changed = replica.take_changed()
            if changed is None:  # more changed than it keeps track of
                self.forget()
            else:
                young, old, owned = self._young, self._old, self._owned_set
                for key in changed:
                    if key[0] not in owned:  # this worker's own records: it wrote them
                        young.pop(key, None)
                        old.pop(key, None)
        by_partition: dict[int, list[int]] = {}
        if self._half:
            young, old, miss = self._young, self._old, _MISS
            out: list[Any] = list(map(young.get, keys, repeat(miss)))
            revived: list[tuple[tuple[int, bytes], bytes | None]] = []
            for i in [i for i, value in enumerate(out) if value is miss]:
                k = keys[i]
                value = old.get(k, miss)
                if value is miss:
                    by_partition.setdefault(k[0], []).append(i)
                    continue
                revived.append((k, value))
                out[i] = value
            self._keep(revived)
        else:
            out = [None] * len(keys)
            for i, (p, _k) in enumerate(keys):
                by_partition.setdefault(p, []).append(i)
        fetched = 0
        owned = self._owned_set
        for p, idx in by_partition.items():
            fetched += len(idx)
            if replica is not None and p not in owned:
                values = replica.read([keys[i] for i in idx])
                self.replica_reads += len(idx)
            else:
                values = self.state.lookup(p, [keys[i][1] for i in idx])
            for i, value in zip(idx, values, strict=True):
                out[i] = value
            if self._half:
                self._keep([(keys[i], value) for i, value in zip(idx, values, strict=True)])
        self.cache_misses += fetched
        self.cache_hits += len(keys) - fetched
        return out

    def _keep(self, entries: Sequence[tuple[tuple[int, bytes], bytes | None]]) -> None:
        """Put ``entries`` in the young generation; a full one becomes the old one."""
        if not entries:
            return
        self._young.update(entries)
        self._grown(sum(len(k[1]) + (len(v) if v else 0) for k, v in entries)
                    + _ENTRY_BYTES * len(entries))

    def _grown(self, size: int) -> None:
        """The young generation took ``size`` more bytes; a full one becomes the old one."""
        self._young_bytes += size
        if self._young_bytes > self._half:
            self._old, self._young, self._young_bytes = self._young, {}, 0

    def write(self, items: Sequence[tuple[int, bytes, bytes]]) -> None:
        self.state.record(items)
        if not self._half or not items:
            return
        young, size = self._young, _ENTRY_BYTES * len(items)
        for p, k, v in items:
            young[p, k] = v
            size += len(k) + len(v)
        self._grown(size)

    async def flush(self) -> None:
        await self.state.flush()

    async def expire_idle(self, now_ms: Mapping[int, float], chunk: int = 5000,
                          log_days: float = 30.0) -> int:
        """Delete feature records with no event in the 31 days before ``now_ms[partition]``,
        and feature-log entries of event days older than ``log_days`` before it (with
        changelog tombstones). ``now_ms`` is event time (the worker passes the newest
        event_time decided per partition); a partition missing from it is left alone.
        Reads the local RocksDB partitions in chunks, yielding to the event loop between
        them, so batches go on during a long scan."""
        dbs = getattr(self.state.table.data, "_dbs", None)
        if not dbs:
            return 0
        decode = self.state.table.data._decode_value
        expired: list[tuple[int, bytes]] = []
        for partition in list(dbs):
            now = now_ms.get(partition)
            if now is None:
                continue
            before = now - 31 * DAY_MS
            log_before = b"f|%05d|" % int((now - log_days * DAY_MS) // DAY_MS)
            start: bytes | None = b"c|"
            while start is not None:
                # No handle is held across the await: a partition revoked meanwhile must
                # close (Faust drops its last reference), or it cannot be opened again.
                start = _scan_chunk(dbs.get(partition), partition, start, chunk, before,
                                    log_before, decode, expired)
                await asyncio.sleep(0)
        expired = [(p, k) for p, k in expired if p in dbs]  # not a partition revoked since
        if not expired:
            return 0
        self.forget()
        store = self.state.table.data
        for partition, key in expired:
            with _as_event(self.state._event(partition)):
                store.pop(key, None)
        await self.state._write_changelog((p, k, None) for p, k in expired)
        return len(expired)


def _scan_chunk(db: Any, partition: int, start: bytes, chunk: int, before: float,
                log_before: bytes, decode: Any, expired: list[tuple[int, bytes]],
                ) -> bytes | None:
    """Up to ``chunk`` records of ``db`` from ``start``: the idle ones and the old
    feature-log entries into ``expired``; returns where the next chunk starts (None: done,
    or the partition is gone)."""
    if db is None:
        return None
    seen = 0
    for key, value in db.items(from_key=start):
        if seen == chunk:
            return key
        seen += 1
        if key.startswith(b"f|"):
            if key < log_before:
                expired.append((partition, key))
            continue
        if key[1:2] != b"|" or key[:1] not in b"cmdi":
            continue
        record = decode(value)
        if isinstance(record, bytes) and _idle(record, before):
            expired.append((partition, key))
    return None


def _idle(record: bytes, before: float) -> bool:
    try:
        return record_max_ts(record) < before
    except (ValueError, IndexError, TypeError):
        return False  # not a feature record: leave it alone


def forget_on_rebalance(app: Any, store: TableFeatureStore) -> None:
    """Empty ``store``'s cache, and what it indexed of its partitions' devices and IPs, at
    every rebalance, before Faust recovers the partitions assigned (their records may
    have been written by another worker meanwhile)."""
    recovery = app.tables.recovery
    original = recovery.on_rebalance

    async def on_rebalance(*args: Any, **kwargs: Any) -> None:
        # (assigned, revoked, newly_assigned, generation_id): topic partitions
        newly = args[2] if len(args) > 2 else kwargs.get("newly_assigned")
        store.rebalanced(None if newly is None else {tp.partition for tp in newly})
        await original(*args, **kwargs)

    recovery.on_rebalance = on_rebalance
