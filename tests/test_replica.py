"""Every worker reads every partition's merchant, device and IP partials: the entity
replica (streams/worker/replica.py) and the RocksDB feature store reading through it, on
the embedded broker."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import faust
import pytest
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic

from fraudstream.state.engine import FeatureEngine, MemoryStore, TxnEvent
from fraudstream.state.features import FeatureConfig
from fraudstream.state.presence import Presence
from fraudstream.streams.worker.delivery import KafkaSink
from fraudstream.streams.worker.feature_store import TableFeatureStore
from fraudstream.streams.worker.replica import EntityReplica
from fraudstream.streams.worker.table_state import FaustTableState
from tests.conftest import T0_MS

PARTITIONS = 3


def _topic(broker: Any, name: str, partitions: int = PARTITIONS) -> str:
    admin = AdminClient({"bootstrap.servers": broker.bootstrap})
    for fut in admin.create_topics([NewTopic(name, partitions, 1)]).values():
        fut.result(15)
    return name


def _config(broker: Any) -> dict[str, Any]:
    return {"bootstrap.servers": broker.bootstrap, "group.id": "replica-test",
            "enable.auto.commit": False, "fetch.wait.max.ms": 50}


def _wait(condition: Callable[[], bool], timeout_s: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def test_the_replica_keeps_every_partitions_entity_records_and_nothing_else(broker, tmp_path):
    topic = _topic(broker, f"replica-{uuid.uuid4().hex[:8]}-changelog")
    producer = Producer({"bootstrap.servers": broker.bootstrap, "linger.ms": 5})
    for p in range(PARTITIONS):
        for key, value in ((b"m|shop", b"m%d" % p), (b"d|dev", b"d%d" % p),
                           (b"i|10.0.0.1", b"i%d" % p), (b"c|card_%d" % p, b"card"),
                           (b"20454|txn-%d" % p, b"decision"), (b"f|20454|txn", b"vector")):
            producer.produce(topic, key=key, value=value, partition=p)
    producer.produce(topic, key=b"d|dev", value=None, partition=2)  # deleted (expired)
    producer.flush(15)
    delays: list[float] = []
    replica = EntityReplica(tmp_path / "replica", _config(broker), topic, PARTITIONS,
                            cache_mb=8, on_delay=delays.append)
    replica.start()
    try:
        assert replica.ready.wait(30), "the replica never read the changelog to its end"
        assert replica.read([(p, b"m|shop") for p in range(PARTITIONS)]) == [b"m0", b"m1", b"m2"]
        assert replica.read([(1, b"d|dev"), (2, b"d|dev"), (0, b"i|10.0.0.1")]) == [
            b"d1", None, b"i0"]
        # Cards, dedupe entries and the feature log are their owner's only: not kept.
        assert replica.read([(0, b"c|card_0"), (1, b"20454|txn-1"), (2, b"f|20454|txn")]) == [
            None, None, None]
        assert replica.applied == 3 * PARTITIONS + 1

        # A partial another worker writes later is read here within the staleness bound.
        producer.produce(topic, key=b"m|shop", value=b"m1-new", partition=1)
        producer.flush(15)
        assert _wait(lambda: replica.read([(1, b"m|shop")]) == [b"m1-new"], 10)
        assert delays and max(delays) < 5.0, delays
        positions = list(replica.position)
    finally:
        replica.stop()

    # A restart goes on from the offsets it stored: nothing is read twice.
    again = EntityReplica(tmp_path / "replica", _config(broker), topic, PARTITIONS, cache_mb=8)
    assert again.position == positions
    producer.produce(topic, key=b"m|shop", value=b"m0-new", partition=0)
    producer.produce(topic, key=b"d|new", value=b"d1-new", partition=1)
    producer.flush(15)
    presence = Presence(PARTITIONS)
    presence.set_indexed((1 << PARTITIONS) - 1)  # what the index says, only
    again.index_into(presence)
    again.start()
    try:
        assert again.ready.wait(30) and again.indexed.wait(30)
        # The devices and IPs it held before the restart, and those applied since.
        assert _wait(lambda: presence.holders(b"d|new") >> 1 & 1, 10)
        assert all(presence.holders(b"i|10.0.0.1") >> p & 1 for p in range(PARTITIONS))
        assert all(presence.holders(b"d|dev") >> p & 1 for p in (0, 1))
        assert _wait(lambda: again.read([(0, b"m|shop")]) == [b"m0-new"], 10)
        assert again.applied == 2
        assert again.read([(1, b"m|shop"), (2, b"m|shop")]) == [b"m1-new", b"m2"]
    finally:
        again.stop()


def test_a_changelog_made_again_is_read_from_its_start(broker, tmp_path):
    """A broker that lost its data: the replica had read offsets the topic no longer has.
    (The restart above, past the end the embedded broker reports, is not taken for one.)"""
    producer = Producer({"bootstrap.servers": broker.bootstrap, "linger.ms": 20})
    before = _topic(broker, f"replica-{uuid.uuid4().hex[:8]}-changelog")
    for i in range(10):
        producer.produce(before, key=b"m|shop-%d" % i, value=b"before", partition=0)
    producer.flush(15)
    replica = EntityReplica(tmp_path / "replica", _config(broker), before, PARTITIONS)
    replica.start()
    try:
        assert replica.ready.wait(30) and replica.applied == 10
    finally:
        replica.stop()
    # The same store on the topic as made again (a new name stands for it here).
    after = _topic(broker, f"replica-{uuid.uuid4().hex[:8]}-changelog")
    producer.produce(after, key=b"m|shop-0", value=b"after", partition=0)
    producer.produce(after, key=b"d|phone", value=b"after", partition=0)
    producer.flush(15)
    again = EntityReplica(tmp_path / "replica", _config(broker), after, PARTITIONS)
    again.start()
    try:
        assert again.ready.wait(30)
        assert _wait(lambda: again.applied == 2, 10), again.applied
        assert again.read([(0, b"m|shop-0"), (0, b"d|phone"), (0, b"m|shop-1")]) == [
            b"after", b"after", None]
    finally:
        again.stop()


# ------------------------------------------------------------- two workers, one merchant


@pytest.fixture(scope="module")
def sink(broker) -> Iterator[KafkaSink]:
    sink = KafkaSink({"bootstrap.servers": broker.bootstrap})
    yield sink
    sink.producer.flush(5)


class _Worker:
    """One worker's feature state: its Faust table (partitions ``owned``) and a replica."""

    def __init__(self, broker: Any, sink: KafkaSink, app_id: str, path: Path,
                 owned: set[int], replica: bool = True) -> None:
        app = faust.App(app_id, broker=f"kafka://{broker.bootstrap}", store="rocksdb://",
                        datadir=str(path / "faust"))
        self.table = app.Table("state", default=None, key_type=bytes, value_type=bytes,
                               partitions=PARTITIONS)
        state = FaustTableState(self.table, f"transactions-{app_id}", sink, end_marker=True)
        self.replica = EntityReplica(path / "replica", _config(broker),
                                     self.table.changelog_topic.get_topic_name(),
                                     PARTITIONS, cache_mb=8) if replica else None
        self.store = TableFeatureStore(state, owned=lambda: owned, cache_mb=1.0,
                                       replica=self.replica)
        self.store.refresh()
        self.engine = FeatureEngine(FeatureConfig(), self.store)
        if self.replica is not None:
            self.replica.start()

    def decide(self, events: list[TxnEvent]) -> list[Any]:
        self.store.refresh()  # as the worker does before each batch
        batch = self.engine.process(events)
        self.store.write(batch.writes)
        asyncio.run(self.store.flush())
        return batch.vectors

    def close(self) -> None:
        if self.replica is not None:
            self.replica.stop()
        for db in self.table.data._dbs.values():
            db.close()


def _txn(i: int, partition: int, card: str) -> TxnEvent:
    return TxnEvent(partition, i, {
        "card_id": card, "event_time": T0_MS + i * 1000, "amount_ref": 10.0 + i,
        "merchant_id": "shop", "country": "FR", "device_id": "dev", "ip": "10.0.0.1",
        "lat": None, "lon": None})


ENTITY_FEATURES = ("merchant_count_1d", "merchant_mean_amount_1d", "device_count_1h",
                   "device_cards_24h", "ip_count_1h", "ip_cards_24h")


def test_two_workers_see_every_partitions_events_of_a_merchant(broker, sink, tmp_path):
    """Worker A decides partition 0, worker B partitions 1 and 2: each one's merchant,
    device and IP features are those of one store holding every partition (the offline
    builder's), once the other's writes reached its replica. Without the replica, B
    counts only its own partitions."""
    app_id = f"replica-{uuid.uuid4().hex[:8]}"
    _topic(broker, f"{app_id}-state-changelog")
    _topic(broker, f"{app_id}-alone-state-changelog")
    a = _Worker(broker, sink, app_id, tmp_path / "a", {0})
    b = _Worker(broker, sink, app_id, tmp_path / "b", {1, 2})
    alone = _Worker(broker, sink, app_id + "-alone", tmp_path / "c", {1, 2}, replica=False)
    everything = FeatureEngine(FeatureConfig(), MemoryStore(PARTITIONS))
    try:
        assert a.replica.ready.wait(30) and b.replica.ready.wait(30)
        offsets = iter(range(1000))
        rounds = [(a, 0, 5), (b, 1, 3), (a, 0, 2), (b, 2, 4)]
        for worker, partition, n in rounds:
            events = [_txn(next(offsets), partition, f"card_{partition}_{k}") for k in range(n)]
            mine = worker.decide(events)
            want = everything.process(events)
            everything.store.write(want.writes)
            for name in ENTITY_FEATURES:
                assert [v[name] for v in mine] == [v[name] for v in want.vectors], name
            # Wait for the other worker's replica to hold what this one wrote.
            other = b if worker is a else a
            key = (partition, b"m|shop")
            written = worker.store.read([key])
            assert _wait(lambda other=other, key=key, written=written:
                         other.replica.read([key]) == written, 10)
        # The same last events, decided by a worker without a replica: its own share only.
        last = [_txn(900 + k, 1, f"card_x_{k}") for k in range(2)]
        assert [v["merchant_count_1d"] for v in alone.decide(last)] == [1.0, 2.0]
        assert b.decide(last)[-1]["merchant_count_1d"] == 14 + 2
    finally:
        for w in (a, b, alone):
            w.close()
