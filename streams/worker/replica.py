"""Every partition's merchant, device and IP partials, readable by every worker.

With the RocksDB backend a merchant's features add up one partial record per source
partition (``m|``, ``d|``, ``i|`` keys, :mod:`fraudstream.state.engine`), and each partial
is written by the worker that owns its partition. A worker reads its own partitions'
partials from its Faust table; :class:`EntityReplica` gives it the others'. A thread tails
the state table's changelog (every partition, in bulk, with librdkafka, as
:mod:`fraudstream.streams.worker.restore` reads it), keeps the entity records and
tombstones, and writes them into a local RocksDB beside the worker's tables. Cards,
dedupe entries and the feature log are skipped: only their owner reads them.

Staleness: a partial changed by another worker is seen here once that worker has
produced its batch's changelog records and this thread has applied them.
:attr:`EntityReplica.on_delay` gets, for every batch of records applied, how long the
oldest of them waited since it was appended to the changelog (after the replica caught up
at start); the worker exports it as ``fraudstream_entity_replica_delay_seconds``.

Restarts: each partition's last applied offset is stored in the replica's own RocksDB,
in the write batch of its records, so a restarted worker goes on from there. A stored
offset past the partition's end (the topic was made again) or before its start (records
deleted before they were read) starts that partition afresh from its first record.

Memory: the records live on disk; the process holds RocksDB's block cache and write
buffers (``cache_mb`` and two 16 MB buffers) and librdkafka's fetch queue (16 MB).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from itertools import takewhile
from pathlib import Path
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition

from fraudstream.state.presence import TRACKED, Presence
from fraudstream.streams.topics import take_available
from fraudstream.streams.worker.restore import holds_offset

log = logging.getLogger("fraudstream.replica")

#: Key prefixes of the records kept: merchant, device and IP partials.
ENTITY_PREFIXES = (b"m|", b"d|", b"i|")
#: Where a partition's last applied offset is stored (no entity key starts with NUL).
_OFFSET_KEY = b"\x00offset|"
_RETRY_S = 2.0
#: Changed keys kept for readers' caches before they are told to drop everything.
_MAX_CHANGED = 200_000


def _head(partition: int) -> bytes:
    return partition.to_bytes(2, "big")


def prefixed_keys(db: Any, prefix: bytes) -> list[bytes]:
    """The keys of the RocksDB ``db`` that start with ``prefix``, in order."""
    n = len(prefix)
    return list(takewhile(lambda k: k[:n] == prefix, db.keys(from_key=prefix)))


def _open(path: Path, cache_mb: int) -> Any:
    from rocksdict import BlockBasedOptions, Cache, Options, Rdict

    options = Options(raw_mode=True)
    options.create_if_missing(True)
    options.set_write_buffer_size(16 << 20)
    options.set_max_write_buffer_number(2)
    table = BlockBasedOptions()
    table.set_block_cache(Cache(cache_mb << 20))
    table.set_bloom_filter(10, True)
    options.set_block_based_table_factory(table)
    path.parent.mkdir(parents=True, exist_ok=True)
    return Rdict(str(path), options=options)


class EntityReplica:
    """A local, read-only copy of the entity partials of every partition of ``topic``
    (the state table's changelog), kept current by a background thread."""

    def __init__(self, path: Path, consumer_config: dict[str, Any], topic: str,
                 partitions: int, cache_mb: int = 64,
                 on_delay: Callable[[float], None] | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.topic = topic
        self.partitions = partitions
        self.on_delay = on_delay
        self.clock = clock
        self._config = {**consumer_config, "enable.partition.eof": True,
                        "fetch.max.bytes": 8 << 20, "queued.max.messages.kbytes": 16384}
        self._db = _open(path, cache_mb)
        self.position = [self._stored(p) for p in range(partitions)]
        self._caught_up = [False] * partitions
        self.ready = threading.Event()
        self.applied = 0
        self.errors = 0
        #: The largest delay (seconds) of the last batch applied, for the status line.
        self.last_delay_s = 0.0
        #: Keys applied since :meth:`take_changed` last ran (None: more than _MAX_CHANGED).
        self._changed: list[tuple[int, bytes]] | None = []
        self._lock = threading.Lock()
        #: Where the device and IP keys held go (:meth:`index_into`); set once it holds
        #: every key this replica holds.
        self._presence: Presence | None = None
        self.indexed = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="entity-replica", daemon=True)

    # -- reads (the worker's event loop) -------------------------------------------------

    def read(self, keys: Sequence[tuple[int, bytes]]) -> list[bytes | None]:
        """The records of (partition, key) pairs, aligned (one RocksDB multi-get)."""
        return self._db.get([_head(p) + k for p, k in keys])

    def take_changed(self) -> list[tuple[int, bytes]] | None:
        """The (partition, key) pairs applied since the last call, for a reader's cache to
        drop; None when there were too many to keep (drop everything)."""
        with self._lock:
            changed, self._changed = self._changed, []
        return changed

    def index_into(self, presence: Presence) -> None:
        """Add the device and IP keys of every partition to ``presence``: those held now
        (read by the tailing thread, which sets :attr:`indexed` once done), then each
        one applied."""
        with self._lock:
            self._presence = presence

    # -- the tailing thread ---------------------------------------------------------------

    def _index(self) -> None:
        """Add every device and IP key held to the presence asked for (in the tailing
        thread, so no record is applied meanwhile)."""
        with self._lock:
            presence = self._presence
        if presence is None or self.indexed.is_set():
            return
        for p in range(self.partitions):
            head = _head(p)
            for prefix in TRACKED:
                presence.add(p, [k[2:] for k in prefixed_keys(self._db, head + prefix)])
        self.indexed.set()

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float = 5.0, close: bool = True) -> None:
        """Stop the thread; ``close`` the RocksDB too (the worker leaves it open: a batch
        still in hand while it shuts down may read it)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout_s)
        if close:
            self._db.close()

    def _stored(self, partition: int) -> int | None:
        raw = self._db.get(_OFFSET_KEY + _head(partition))
        return int(raw) if raw is not None else None

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._tail()
            except Exception as exc:  # a broker error must not end the replica for good
                self.errors += 1
                # The changelog does not exist before the first worker's Faust made it.
                log.warning("entity replica of %s: %s: %s; again in %.0f s", self.topic,
                            type(exc).__name__, exc, _RETRY_S)
                self._stop.wait(_RETRY_S)

    def _tail(self) -> None:
        consumer = Consumer(self._config)
        try:
            consumer.assign(self._starts(consumer))
            while not self._stop.is_set():
                self._index()
                msgs = take_available(consumer, 0.1, 10_000)
                if msgs:
                    self._apply(msgs)
        finally:
            consumer.close()

    def _starts(self, consumer: Any) -> list[TopicPartition]:
        """Where each partition is read from; partitions already at their end (or empty)
        count as caught up at once."""
        from rocksdict import WriteBatch

        starts = []
        reset = WriteBatch(raw_mode=True)
        for p in range(self.partitions):
            low, high = consumer.get_watermark_offsets(TopicPartition(self.topic, p), 15.0)
            stored = self.position[p]
            # The embedded broker may report the base offset of the last record batch as
            # the end: past it, a fetch tells whether the topic was made again.
            if stored is not None and (stored + 1 < low or (
                    stored >= high and not holds_offset(consumer, self.topic, p, stored))):
                log.warning("entity replica: %s[%d] holds offsets %d..%d, the replica had "
                            "read to %d: reading the partition again from its start",
                            self.topic, p, low, high, stored)
                reset.delete_range(_head(p), _head(p + 1))
                stored = self.position[p] = None
            start = stored + 1 if stored is not None else OFFSET_BEGINNING
            if high <= (stored + 1 if stored is not None else low):
                self._caught_up[p] = True
            starts.append(TopicPartition(self.topic, p, start))
        if not reset.is_empty():
            self._db.write(reset)
        self._check_ready()
        return starts

    def _apply(self, msgs: list[Any]) -> None:
        from rocksdict import WriteBatch

        batch = WriteBatch(raw_mode=True)
        changed: list[tuple[int, bytes]] = []
        touched: set[int] = set()
        oldest_ms: int | None = None
        position = self.position
        prefixes = ENTITY_PREFIXES
        for m in msgs:
            err = m.error()
            if err is not None:
                if err.code() == KafkaError._PARTITION_EOF:
                    self._caught_up[m.partition()] = True
                else:
                    log.warning("entity replica: %s", err)
                continue
            p = m.partition()
            key = m.key()
            if key is not None and key[:2] in prefixes:
                value = m.value()
                if value is None:
                    batch.delete(_head(p) + key)
                else:
                    batch.put(_head(p) + key, value)
                changed.append((p, key))
                self.applied += 1
            position[p] = m.offset()
            touched.add(p)
            kind, ts = m.timestamp()
            if kind and ts >= 0 and (oldest_ms is None or ts < oldest_ms):
                oldest_ms = ts
        for p in touched:
            batch.put(_OFFSET_KEY + _head(p), str(position[p]).encode())
        presence = self._presence
        if presence is not None and changed:
            # Before the write: a reader that then finds no record reads a stale replica,
            # never one that skips a record it holds.
            for p, key in changed:
                presence.add(p, (key,))
        if touched:
            self._db.write(batch)
        if changed:
            with self._lock:  # after the write: a reader that drops them reads them anew
                if self._changed is not None:
                    self._changed.extend(changed)
                    if len(self._changed) > _MAX_CHANGED:
                        self._changed = None
        if oldest_ms is not None and self.ready.is_set():
            delay = max(0.0, self.clock() - oldest_ms / 1000.0)
            self.last_delay_s = delay
            if self.on_delay is not None:
                self.on_delay(delay)
        self._check_ready()

    def _check_ready(self) -> None:
        if not self.ready.is_set() and all(self._caught_up):
            self.ready.set()
            log.warning("entity replica of %s: caught up (%d partitions, %d records "
                        "applied)", self.topic, self.partitions, self.applied)


def hold_recovery_until_ready(app: Any, replica: EntityReplica, wait_s: float) -> None:
    """Make each rebalance wait (at most ``wait_s``) for the replica to have read the
    changelog to its end, before Faust recovers the partitions and the worker decides:
    a worker that joins must not decide on other partitions' partials it has not read
    yet. Past ``wait_s`` it goes on, with a warning (and /readyz still failing)."""
    import asyncio

    recovery = app.tables.recovery
    original = recovery.on_rebalance

    async def on_rebalance(*args: Any, **kwargs: Any) -> None:
        if not replica.ready.is_set():
            t0 = time.monotonic()
            ready = await asyncio.get_running_loop().run_in_executor(
                None, replica.ready.wait, wait_s)
            if not ready:
                log.warning("entity replica of %s: not caught up after %.0f s "
                            "(FRAUDSTREAM_FEATURES_REPLICA_WAIT_S): deciding meanwhile; "
                            "other partitions' merchants, devices and IPs count short "
                            "until it is", replica.topic, time.monotonic() - t0)
        await original(*args, **kwargs)

    recovery.on_rebalance = on_rebalance


def install_replica(app: Any, settings: Any, changelog: str, partitions: int,
                    metrics: Any) -> EntityReplica:
    """The worker's replica of ``changelog``: started now (it reads while Faust starts and
    joins the group), waited for at each rebalance, its readiness gauge kept, and its
    thread stopped when the worker shuts down."""
    import asyncio

    w, fs = settings.worker, settings.features
    replica = EntityReplica(w.data_dir / f"{w.app_id}-entity-replica",
                            settings.kafka.consumer_config(f"{w.app_id}-replica"), changelog,
                            partitions, fs.replica_cache_mb,
                            on_delay=metrics.replica_delay.observe)
    replica.start()
    hold_recovery_until_ready(app, replica, fs.replica_wait_s)

    @app.timer(interval=1.0)
    async def replica_gauge() -> None:
        metrics.replica_ready.set(1 if replica.ready.is_set() else 0)

    @app.on_before_shutdown.connect
    async def stop_replica(_app: Any, **_kwargs: Any) -> None:
        await asyncio.get_running_loop().run_in_executor(
            None, lambda: replica.stop(close=False))

    return replica
