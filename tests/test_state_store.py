"""The StateStore contract, run over every backend of the feature state.

Backends: :class:`fraudstream.state.engine.MemoryStore` (the reference), :class:`RedisStore` on a
real
redis-server, and :class:`TableFeatureStore` on a real Faust table with RocksDB storage
whose changelog goes to the embedded broker. Then Redis-only tests: the key layout and
TTL, round trips, and what an outage does (degraded features, no crash, no hang, a
bounded number of attempts, recovery).

The Faust table is used without starting the Faust app: a RocksDB store opens a
partition's database lazily on first access (``Store._db_for_partition``), and
:class:`~fraudstream.streams.worker.table_state.FaustTableState` picks the partition through a
stand-in
current event and produces the changelog itself, so no consumer, rebalance or recovery is
needed. The changelog topic is created here (as the started app would).
"""

from __future__ import annotations

import asyncio
import math
import os
import random
import signal
import time
import uuid
import zlib
from array import array
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import faust
import pytest
import redis
from confluent_kafka.admin import AdminClient, NewTopic

from fraudstream.schemas.fx import Rates
from fraudstream.schemas.validate import validate_history_transaction
from fraudstream.state.engine import (
    FeatureBatch,
    FeatureEngine,
    LabelEvent,
    MemoryStore,
    StateUnavailable,
    TxnEvent,
)
from fraudstream.state.features import FEATURE_NAMES, FeatureConfig
from fraudstream.streams.settings import FeatureSettings
from fraudstream.streams.traffic.generator import TrafficGenerator
from fraudstream.streams.traffic.world import GeneratorConfig
from fraudstream.streams.worker.delivery import KafkaSink
from fraudstream.streams.worker.feature_store import TableFeatureStore
from fraudstream.streams.worker.redis_store import RedisStore
from fraudstream.streams.worker.table_state import FaustTableState

PARTITIONS = 3
T0 = 1_700_000_000_000  # 2023-11-14, event time of the hand-built transactions


# ----------------------------------------------------------------------------- backends


def _redis_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[RedisStore]:
    server = request.getfixturevalue("redis_server")
    store = RedisStore(server.url, f"test-{uuid.uuid4().hex[:8]}", PARTITIONS)
    yield store
    store.close()


@pytest.fixture(scope="module")
def kafka_sink(broker) -> Iterator[KafkaSink]:
    """One producer for the module's Faust tables (a new idempotent producer's first
    delivery waits about a second)."""
    sink = KafkaSink({"bootstrap.servers": broker.bootstrap})
    yield sink
    sink.producer.flush(5)


def _rocksdb_store(request: pytest.FixtureRequest, tmp_path: Path, cache_mb: float = 0.0,
                   owned: Callable[[], Any] = lambda: range(PARTITIONS),
                   recovering: Callable[[], bool] = lambda: False,
                   ) -> Iterator[TableFeatureStore]:
    broker = request.getfixturevalue("broker")
    sink = request.getfixturevalue("kafka_sink")
    uid = uuid.uuid4().hex[:8]
    app = faust.App(f"contract-{uid}", broker=f"kafka://{broker.bootstrap}",
                    store="rocksdb://", datadir=str(tmp_path / "faust"))
    table = app.Table("state", default=None, key_type=bytes, value_type=bytes,
                      partitions=PARTITIONS)
    assert type(table.data).__module__ == "faust.stores.rocksdb"
    admin = AdminClient({"bootstrap.servers": broker.bootstrap})
    futures = admin.create_topics(
        [NewTopic(table.changelog_topic.get_topic_name(), PARTITIONS, 1)])
    for fut in futures.values():
        fut.result(15)
    state = FaustTableState(table, f"transactions-{uid}", sink, end_marker=True)
    store = TableFeatureStore(state, owned=owned, cache_mb=cache_mb, recovering=recovering)
    store.refresh()
    yield store
    for db in table.data._dbs.values():
        db.close()


def _memory_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[MemoryStore]:
    yield MemoryStore(PARTITIONS)


def _rocksdb_cached_store(request: pytest.FixtureRequest, tmp_path: Path
                          ) -> Iterator[TableFeatureStore]:
    """RocksDB with a record cache so small that the contract's records overflow it."""
    yield from _rocksdb_store(request, tmp_path, cache_mb=0.002)


BACKENDS: dict[str, Callable[..., Iterator[Any]]] = {
    "memory": _memory_store, "redis": _redis_store, "rocksdb": _rocksdb_store,
    "rocksdb-cached": _rocksdb_cached_store,
}


@pytest.fixture(params=list(BACKENDS))
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Any]:
    yield from BACKENDS[request.param](request, tmp_path)


def flush(store: Any) -> None:
    asyncio.run(store.flush())


def record(*values: float) -> bytes:
    """Binary bytes like a feature record's (doubles: NUL and high bytes included)."""
    return array("d", values).tobytes()


# ----------------------------------------------------------------------------- contract


def test_unknown_keys_read_as_none_aligned_with_the_input(store):
    keys = [(0, b"c|card_1"), (1, b"m|merchant_9"), (2, b"d|dev_1"), (0, b"i|10.0.0.1")]
    assert store.read(keys) == [None] * 4

    store.write([(1, b"m|merchant_9", record(1.0, 2.5))])
    flush(store)
    assert store.read(keys) == [None, record(1.0, 2.5), None, None]
    assert store.read(keys[::-1]) == [None, None, record(1.0, 2.5), None]


def test_written_records_are_read_back_per_partition(store):
    key = b"c|card_000123"
    store.write([(0, key, record(0.0, -1.5, math.inf)), (1, key, record(7.0)),
                 (2, b"m|merchant_9", b"\x00\xff\x00")])
    flush(store)
    assert store.read([(0, key), (1, key), (2, key), (2, b"m|merchant_9")]) == [
        record(0.0, -1.5, math.inf), record(7.0), None, b"\x00\xff\x00"]

    store.write([(1, key, record(8.0))])  # a later write replaces the record
    flush(store)
    assert store.read([(1, key), (0, key)]) == [record(8.0), record(0.0, -1.5, math.inf)]


def test_a_batch_of_many_keys_is_read_in_one_call(store):
    items = [(i % PARTITIONS, f"c|card_{i:06d}".encode(), record(float(i))) for i in range(1500)]
    store.write(items[::2])
    flush(store)
    got = store.read([(p, k) for p, k, _v in items])
    assert len(got) == len(items)
    assert got == [v if i % 2 == 0 else None for i, (_p, _k, v) in enumerate(items)]


def test_every_backend_gives_the_features_of_the_memory_store(store):
    batches = traffic_batches()
    reference = MemoryStore(PARTITIONS)
    want = run_engine(reference, batches)
    got = run_engine(store, batches)

    assert len(got) == len(want) == len(batches)
    for b_got, b_want in zip(got, want, strict=True):
        assert not b_got.degraded
        assert (b_got.replayed, b_got.late, b_got.too_late, b_got.labels_counted) == (
            b_want.replayed, b_want.late, b_want.too_late, b_want.labels_counted)
        for v_got, v_want in zip(b_got.vectors, b_want.vectors, strict=True):
            for name, x, y in zip(FEATURE_NAMES, row(v_got), row(v_want), strict=True):
                assert same(x, y), (name, x, y)
    # The state after the run is byte for byte the reference's.
    keys = sorted(reference.data)
    assert store.read(keys) == [reference.data[k] for k in keys]

    # The run exercised the state: repeat cards, merchants across partitions, late events,
    # labels and redeliveries.
    vectors = [v for b in want for v in b.vectors]
    assert max(v["card_count_1h"] for v in vectors) >= 3
    assert max(v["card_count_7d"] for v in vectors) >= 10
    assert max(v["merchant_count_7d"] for v in vectors) >= 5
    assert max(v["device_count_1h"] for v in vectors) >= 1
    assert sum(b.late for b in want) > 0 and sum(b.labels_counted for b in want) > 0
    assert sum(b.replayed for b in want) > 0
    assert {k[0] for k in keys if k[1].startswith(b"m|")} == set(range(PARTITIONS))


def test_a_record_delivered_twice_is_counted_once(store):
    engine = FeatureEngine(FeatureConfig(), store)
    first = TxnEvent(1, 10, txn("card_1", T0))

    def batch(*events: TxnEvent) -> FeatureBatch:
        out = engine.process(list(events))
        store.write(out.writes)
        flush(store)
        return out

    b = batch(first)
    assert b.vectors[0]["card_count_1h"] == 1 and b.vectors[0]["merchant_count_1d"] == 1
    assert len(b.writes) == 4  # card, merchant, device, IP
    b = batch(first)  # redelivered in a later batch: nothing changes in the state
    assert (b.replayed, b.writes) == (1, [])
    second = TxnEvent(1, 11, txn("card_1", T0 + 1000))
    b = batch(second, second)  # a new event, delivered twice in one batch
    assert b.replayed == 1
    assert b.vectors[0]["card_count_1h"] == 2  # the first event counted once, not twice
    assert b.vectors[0]["merchant_count_1d"] == 2
    assert b.vectors[0]["device_count_1h"] == 2
    b = batch(TxnEvent(1, 12, txn("card_1", T0 + 2000)))
    v = b.vectors[0]
    assert (v["card_count_1h"], v["card_sum_1h"], v["merchant_count_1d"],
            v["device_count_1h"], v["ip_count_1h"]) == (3, 75.0, 3, 3, 3)


def test_a_replayed_event_counts_once_in_every_window():
    """Delivered again (its dedupe entry lost, its feature records kept): the windows count
    it once, as on its first delivery. First-use flags and the gap then see it as known."""
    store = MemoryStore(PARTITIONS)
    engine = FeatureEngine(FeatureConfig(), store)
    event = TxnEvent(1, 10, txn("card_1", T0))
    first = engine.process([event])
    store.write(first.writes)
    again = engine.process([event])
    assert again.replayed == 1 and again.writes == []
    windowed = [n for n in FEATURE_NAMES if n.startswith(("card_count", "card_sum", "card_mean",
                                                          "card_max", "merchant_", "device_",
                                                          "ip_"))]
    for name in windowed:
        assert same(again.vectors[0][name], first.vectors[0][name]), name


# ----------------------------------------------------------------------------- Redis only


def test_redis_keys_carry_prefix_and_partition_and_expire_by_ttl(redis_server):
    prefix = f"test-{uuid.uuid4().hex[:8]}"
    store = RedisStore(redis_server.url, prefix, PARTITIONS, ttl_ms=60_000)
    raw = redis.Redis.from_url(redis_server.url)
    try:
        store.write([(2, b"c|card_1", b"x"), (0, b"c|card_1", b"y")])
        flush(store)
        assert raw.get(f"{prefix}:2:c|card_1".encode()) == b"x"
        assert raw.get(f"{prefix}:0:c|card_1".encode()) == b"y"
        assert sorted(raw.scan_iter(match=f"{prefix}:*")) == [
            f"{prefix}:0:c|card_1".encode(), f"{prefix}:2:c|card_1".encode()]
        assert 0 < raw.pttl(f"{prefix}:2:c|card_1") <= 60_000
        assert store.readable(0) == store.readable(2) == range(PARTITIONS)
    finally:
        raw.close()
        store.close()


def test_redis_reads_a_batch_in_one_round_trip_and_writes_in_one(redis_server, monkeypatch):
    store = RedisStore(redis_server.url, f"test-{uuid.uuid4().hex[:8]}", PARTITIONS)
    sent: list[int] = []
    real = redis.connection.AbstractConnection.send_packed_command

    def counting(self, command, check_health=True):  # type: ignore[no-untyped-def]
        sent.append(1)
        return real(self, command, check_health)

    try:
        store.read([(0, b"c|warm")])  # connect (and the handshake) outside the count
        monkeypatch.setattr(redis.connection.AbstractConnection, "send_packed_command",
                            counting)
        items = [(i % PARTITIONS, b"c|card_%d" % i, b"v%d" % i) for i in range(800)]
        store.write(items[:400])
        store.write(items[400:])
        assert sent == []  # write() only queues
        flush(store)
        assert len(sent) == 1
        got = store.read([(p, k) for p, k, _v in items])
        assert len(sent) == 2
        assert got == [v for _p, _k, v in items]
        flush(store)  # nothing queued: no round trip
        assert len(sent) == 2
    finally:
        store.close()


def test_redis_store_from_settings():
    features = FeatureSettings(backend="redis", redis_url="redis://127.0.0.1:1/3",
                               redis_prefix="fs", redis_timeout_ms=150, redis_retry_s=2.5)
    store = RedisStore.from_settings(features, 4)
    kwargs = store.client.connection_pool.connection_kwargs
    assert (kwargs["socket_timeout"], kwargs["socket_connect_timeout"]) == (0.15, 0.15)
    assert (kwargs["port"], kwargs["db"]) == (1, 3)
    assert store.redis_key(3, b"c|card_1") == b"fs:3:c|card_1"
    assert (store.partitions, store.retry_s, store.up) == (4, 2.5, True)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class NoNetwork:
    """Stands in for the redis client: any use fails the test."""

    def __getattr__(self, name: str) -> Any:
        pytest.fail(f"the store used the network while down ({name})")


def test_redis_outage_degrades_features_then_recovers(start_redis):
    server = start_redis()
    clock = FakeClock()
    timeout_ms, retry_s = 200, 1.0
    store = RedisStore(server.url, "outage", PARTITIONS, timeout_ms=timeout_ms,
                       retry_s=retry_s, clock=clock)
    engine = FeatureEngine(FeatureConfig(), store)
    offsets = iter(range(1_000_000))

    def events(n: int) -> list[TxnEvent]:
        return [TxnEvent(i % PARTITIONS, next(offsets), txn(f"card_{i % 7}", T0 + i * 1000))
                for i in range(n)]

    def timed(evs: list[TxnEvent]) -> tuple[FeatureBatch, float]:
        t = time.perf_counter()
        out = engine.process(evs)
        return out, time.perf_counter() - t

    try:
        b = engine.process(events(20))
        assert not b.degraded
        store.write(b.writes)
        flush(store)
        assert store.up

        server.stop()
        b, took = timed(events(20))
        assert b.degraded and len(b.vectors) == 20 and b.writes == []
        assert all(v["features_degraded"] == 1.0 for v in b.vectors)
        assert all(v["card_count_1h"] == 0.0 for v in b.vectors)
        assert b.vectors[0]["hour_of_day"] == float((T0 // 3_600_000) % 24)  # event fields
        assert took < timeout_ms / 1000 + 0.3
        assert (store.up, store.failures, store.degraded_reads) == (False, 1, 1)

        # Within retry_s: answered at once, the network untouched.
        client, store.client = store.client, NoNetwork()
        try:
            b, took = timed(events(20))
            assert b.degraded and all(v["features_degraded"] == 1.0 for v in b.vectors)
            assert took < timeout_ms / 1000 / 10
            store.write([(0, b"c|card_1", b"x"), (1, b"c|card_2", b"y")])
            with pytest.raises(StateUnavailable):
                flush(store)
        finally:
            store.client = client
        assert (store.failures, store.degraded_reads, store.lost_writes) == (1, 2, 2)

        # retry_s later, still down: one more attempt, then down again.
        clock.now += retry_s
        b, took = timed(events(5))
        assert b.degraded and took < timeout_ms / 1000 + 0.3
        assert (store.failures, store.degraded_reads, store.reconnects) == (2, 3, 0)

        server.start()  # same port, empty (no persistence)
        b = engine.process(events(5))
        assert b.degraded  # still within retry_s of the last failure
        assert store.failures == 2
        clock.now += retry_s
        b = engine.process(events(5))
        assert not b.degraded
        assert all(v["features_degraded"] == 0.0 for v in b.vectors)
        assert (store.up, store.reconnects, store.failures) == (True, 1, 2)
        store.write(b.writes)
        flush(store)
        b = engine.process(events(5))
        assert not b.degraded and b.vectors[0]["card_count_1h"] >= 1.0
    finally:
        store.close()


def test_redis_flush_failure_drops_the_queue_and_counts_it(start_redis):
    server = start_redis()
    clock = FakeClock()
    store = RedisStore(server.url, "flush", PARTITIONS, timeout_ms=200, retry_s=1.0,
                       clock=clock)
    try:
        store.write([(0, b"c|a", b"1")])
        flush(store)
        server.stop()
        store.write([(0, b"c|a", b"2"), (1, b"c|b", b"3"), (2, b"m|c", b"4")])
        with pytest.raises(StateUnavailable):
            flush(store)
        assert (store.lost_writes, store.failures, store.up) == (3, 1, False)
        flush(store)  # the queue was dropped: nothing left to send, nothing raised
        server.start()
        clock.now += 1.0
        store.write([(0, b"c|a", b"5")])
        flush(store)
        assert (store.reconnects, store.lost_writes) == (1, 3)
        assert store.read([(0, b"c|a"), (1, b"c|b")]) == [b"5", None]
    finally:
        store.close()


def test_a_hung_redis_costs_one_timeout(start_redis):
    """A server that stops answering (SIGSTOP) without closing connections: the socket
    timeout bounds the call."""
    server = start_redis()
    clock = FakeClock()
    store = RedisStore(server.url, "hung", PARTITIONS, timeout_ms=100, retry_s=1.0,
                       clock=clock)
    assert server.proc is not None
    try:
        assert store.read([(0, b"c|a")]) == [None]
        os.kill(server.proc.pid, signal.SIGSTOP)
        try:
            t = time.perf_counter()
            with pytest.raises(StateUnavailable):
                store.read([(0, b"c|a")])
            took = time.perf_counter() - t
            assert 0.08 < took < 0.4
            t = time.perf_counter()
            with pytest.raises(StateUnavailable):
                store.read([(0, b"c|a")])
            assert time.perf_counter() - t < 0.01
        finally:
            os.kill(server.proc.pid, signal.SIGCONT)
        clock.now += 1.0
        assert store.read([(0, b"c|a")]) == [None]
        assert (store.failures, store.reconnects, store.degraded_reads) == (1, 1, 2)
    finally:
        store.close()


# ----------------------------------------------------------------------------- helpers


def txn(card_id: str, event_time: int, **changes: Any) -> dict[str, Any]:
    base = {"card_id": card_id, "merchant_id": "merchant_9", "amount": 25.0,
            "currency": "EUR", "event_time": event_time, "country": "FR", "lat": 48.857,
            "lon": 2.352, "device_id": "dev_1", "ip": "90.1.2.3"}
    base.update(changes)
    base.setdefault("amount_ref", base["amount"])  # EUR: as the validator returns it
    return base


def row(vector: Any) -> list[float]:
    """A vector's values in FEATURE_NAMES order, through its Mapping interface."""
    return [vector[name] for name in FEATURE_NAMES]


def same(x: float, y: float) -> bool:
    return (math.isnan(x) and math.isnan(y)) or math.isclose(x, y, rel_tol=1e-9)


_TRAFFIC: list[tuple[list[TxnEvent], list[LabelEvent]]] = []


RATES = Rates.load()


def traffic_batches(n: int = 600, size: int = 50
                    ) -> list[tuple[list[TxnEvent], list[LabelEvent]]]:
    """Generated traffic in simulated event time (mean gap 3 min: ~30 h), as micro-batches
    of ``size`` transactions with the labels due by then. Some neighbours swap places
    (late events), a few events arrive hours late, a few are delivered again."""
    if _TRAFFIC:
        return _TRAFFIC
    gen = TrafficGenerator(GeneratorConfig(seed=7, n_cards=40, n_merchants=120,
                                           fraud_rate=0.05, time_compression=12.0))
    rng = random.Random(7)
    now = T0
    rows: list[tuple[str, dict[str, Any]]] = []
    for _ in range(n):
        now += int(rng.expovariate(1 / 180_000))
        t = validate_history_transaction(gen.next_transaction(now), RATES)
        if rng.random() < 0.02:
            t = {**t, "event_time": t["event_time"] - 3 * 3_600_000}
        rows.append(("t", t))
        rows.extend(("l", label) for label in gen.due_labels(now))
    for i in range(len(rows) - 1):
        if rows[i][0] == rows[i + 1][0] == "t" and rng.random() < 0.1:
            rows[i], rows[i + 1] = rows[i + 1], rows[i]

    def partition(card_id: str) -> int:
        return zlib.crc32(card_id.encode()) % PARTITIONS

    txn_offsets = [0] * PARTITIONS
    label_offsets = [0] * PARTITIONS
    txns: list[TxnEvent] = []
    labels: list[LabelEvent] = []
    for kind, row in rows:
        p = partition(row["card_id"])
        if kind == "l":
            labels.append(LabelEvent(p, label_offsets[p], row))
            label_offsets[p] += 1
            continue
        txns.append(TxnEvent(p, txn_offsets[p], row))
        txn_offsets[p] += 1
        if rng.random() < 0.02:
            txns.append(txns[-1])  # delivered again
        if len(txns) >= size:
            _TRAFFIC.append((txns, labels))
            txns, labels = [], []
    if txns or labels:
        _TRAFFIC.append((txns, labels))
    return _TRAFFIC


def run_engine(store: Any, batches: list[tuple[list[TxnEvent], list[LabelEvent]]]
               ) -> list[FeatureBatch]:
    engine = FeatureEngine(FeatureConfig(), store)

    async def run() -> list[FeatureBatch]:
        out = []
        for txns, labels in batches:
            b = engine.process(txns, labels)
            store.write(b.writes)
            await store.flush()
            out.append(b)
        return out

    return asyncio.run(run())


def test_the_record_cache_reads_the_table_again_after_a_rebalance(request, tmp_path):
    """Between rebalances the worker is the only writer of its partitions' records; after
    one, a record another worker wrote meanwhile is what the next batch reads."""
    owned = {0, 1, 2, 3}
    stores = _rocksdb_store(request, tmp_path, cache_mb=1.0, owned=lambda: owned)
    store = next(stores)
    key = (2, b"m|shop")
    assert store.read([key]) == [None]
    store.write([(2, b"m|shop", record(1.0))])
    flush(store)
    hits = store.cache_hits
    assert store.read([key]) == [record(1.0)] and store.cache_hits == hits + 1
    # Partition 2 went to another worker, which wrote the record; then it came back.
    store.state.record([(2, b"m|shop", record(2.0))])
    store.rebalanced()  # what the rebalance hook does (forget_on_rebalance)
    assert store.read([key]) == [record(2.0)]
    store.state.record([(2, b"m|shop", record(3.0))])
    owned.discard(3)  # the assignment changed between two batches
    store.refresh()
    assert store.read([key]) == [record(3.0)]
    stores.close()


def test_a_partition_restored_from_the_changelog_is_indexed_only_once_whole(request, tmp_path):
    """A device's partials are read only from the partitions the presence index names.
    Indexed halfway through Faust's restore, a partition would never be read for the
    devices restored after: it counts as holding every key until the restore ends."""
    recovering = True
    store = next(_rocksdb_store(request, tmp_path, recovering=lambda: recovering))
    presence = store.presence
    assert presence is not None
    store.rebalanced({1})  # partition 1 newly assigned: Faust restores it
    store.refresh()  # a batch during the restore (none should come; the index must hold)
    store.state.record([(1, b"d|phone", record(1.0))])  # restored after that batch
    assert presence.holders(b"d|phone") >> 1 & 1
    recovering = False
    store.refresh()
    every = (1 << PARTITIONS) - 1
    assert presence.holders(b"d|phone") & every == 1 << 1  # indexed: only where it lives
    assert presence.holders(b"d|tablet") & every == 0


def test_a_partition_revoked_and_given_back_opens_again(request, tmp_path):
    """A rebalance that takes a partition away and gives it back (as a standby, after a
    worker rejoined) reopens its RocksDB in the same process: nothing of ours may keep the
    old handle, or the file lock stays held and the worker crashes."""
    from faust.types import TP

    store = next(_rocksdb_store(request, tmp_path))
    state = store.state
    state.record([(0, b"00001|t1", b"decision")])  # the write handle of partition 0
    faust_store = state.table.data
    tp = TP(state.table.changelog_topic.get_topic_name(), 0)
    faust_store.revoke_partitions(state.table, {tp})
    assert 0 not in faust_store._dbs
    assert faust_store._db_for_partition(0).get(b"00001|t1") == b"decision"  # no lock error
    assert state.lookup(0, [b"00001|t1"]) == [b"decision"]


def test_idle_entities_expire_and_the_rest_stay_read_in_chunks(request, tmp_path):
    """``expire_idle`` reads the partitions a few records at a time (yielding between
    chunks, holding no handle across them): every idle card goes, every active one
    stays, whatever the chunk boundaries."""
    store = next(_rocksdb_store(request, tmp_path))
    engine = FeatureEngine(FeatureConfig(), store)
    day = 86_400_000
    old = [TxnEvent(0, i, txn(f"old_{i}", T0, merchant_id=f"mo{i}", device_id=f"do{i}",
                              ip=f"10.0.0.{i}")) for i in range(7)]
    new = [TxnEvent(0, 10 + i, txn(f"new_{i}", T0 + 40 * day, merchant_id=f"mn{i}",
                                   device_id=f"dn{i}", ip=f"10.0.1.{i}")) for i in range(5)]
    for events in (old, new):
        store.write(engine.process(events).writes)
        flush(store)
    removed = asyncio.run(store.expire_idle({0: T0 + 40 * day}, chunk=3))
    assert removed == 7 * 4  # each old card with its merchant, device and IP
    db = store.state.table.data._dbs[0]
    keys = [k for k in db.keys() if k[1:2] == b"|"]
    assert keys and not any(b"old_" in k or b"mo" in k for k in keys)
    assert sum(b"new_" in k for k in keys) == 5
