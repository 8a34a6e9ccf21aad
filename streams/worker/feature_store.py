"""The RocksDB backend of the feature state: records in the worker's Faust table.

Feature records share the Faust table of the dedupe entries (``<app_id>-state``):
RocksDB per partition, one changelog topic, recovery when a partition is assigned, all
handled by Faust. A batch's feature records and dedupe entries go to the changelog in one
produce, features first: once a decision's dedupe entry is acknowledged, so are the feature
records it was computed with.

Partials of merchants, devices and IPs are readable for the partitions this worker owns:
with one worker (or one partition) merchant features count every event; with several
workers each sees the merchants' events of its own partitions. A team that needs the
global view runs the Redis backend (:mod:`fraudstream.streams.worker.redis_store`), where every
worker reads
every partition's partial.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence

from fraudstream.state.features import DAY_MS
from fraudstream.state.records import record_max_ts
from fraudstream.streams.worker.table_state import FaustTableState, _as_event


class TableFeatureStore:
    def __init__(self, state: FaustTableState, owned: Callable[[], Sequence[int]]) -> None:
        self.state = state
        self._owned_fn = owned
        self._owned: tuple[int, ...] = ()

    def refresh(self) -> None:
        """Re-read which partitions this worker owns (call once per batch)."""
        self._owned = tuple(sorted(self._owned_fn()))

    def readable(self, partition: int) -> Sequence[int]:
        return self._owned if partition in self._owned else (partition, *self._owned)

    def read(self, keys: Sequence[tuple[int, bytes]]) -> list[bytes | None]:
        by_partition: dict[int, list[int]] = {}
        for i, (p, _k) in enumerate(keys):
            by_partition.setdefault(p, []).append(i)
        out: list[bytes | None] = [None] * len(keys)
        for p, idx in by_partition.items():
            for i, value in zip(idx, self.state.lookup(p, [keys[i][1] for i in idx]),
                                strict=True):
                out[i] = value
        return out

    def write(self, items: Sequence[tuple[int, bytes, bytes]]) -> None:
        self.state.record(items)

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
        for partition, db in list(dbs.items()):
            now = now_ms.get(partition)
            if now is None:
                continue
            before = now - 31 * DAY_MS
            log_before = b"f|%05d|" % int((now - log_days * DAY_MS) // DAY_MS)
            seen = 0
            for key, value in db.items(from_key=b"c|"):
                if key.startswith(b"f|"):
                    if key < log_before:
                        expired.append((partition, key))
                    continue
                if key[1:2] != b"|" or key[:1] not in b"cmdi":
                    continue
                record = decode(value)
                if isinstance(record, bytes) and _idle(record, before):
                    expired.append((partition, key))
                seen += 1
                if seen % chunk == 0:
                    await asyncio.sleep(0)
        if not expired:
            return 0
        store = self.state.table.data
        for partition, key in expired:
            with _as_event(self.state._event(partition)):
                store.pop(key, None)
        await self.state._write_changelog((p, k, None) for p, k in expired)
        return len(expired)


def _idle(record: bytes, before: float) -> bool:
    try:
        return record_max_ts(record) < before
    except (ValueError, IndexError, TypeError):
        return False  # not a feature record: leave it alone
