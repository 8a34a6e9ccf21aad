"""Which partitions may hold a device's or an IP's partial (state/presence.py), and the
worker's RocksDB store that keeps it: a partial is never skipped because the index did
not know it, whoever wrote it (this worker, a former owner of the partition, another
worker through the replica)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import faust
import pytest
from confluent_kafka.admin import AdminClient, NewTopic

from fraudstream.state.engine import FeatureEngine, MemoryStore, TxnEvent
from fraudstream.state.features import FeatureConfig
from fraudstream.state.presence import MAX_PARTITIONS, MIN_PARTITIONS, Presence
from fraudstream.streams.worker.delivery import KafkaSink
from fraudstream.streams.worker.feature_store import TableFeatureStore
from fraudstream.streams.worker.table_state import FaustTableState
from tests.conftest import T0_MS

PARTITIONS = 4
ALL = (1 << PARTITIONS) - 1


def _bits(mask: int) -> set[int]:
    return {p for p in range(PARTITIONS) if mask >> p & 1}


def test_a_key_added_is_held_by_its_partition_and_unindexed_partitions_hold_everything():
    presence = Presence(PARTITIONS, bits=16)
    assert _bits(presence.holders(b"d|dev")) == set(range(PARTITIONS))  # nothing indexed
    presence.set_indexed(ALL)
    assert _bits(presence.holders(b"d|dev")) == set()
    presence.add(2, [b"d|dev", b"m|shop", b"c|card"])
    presence.add_masks({b"i|10.0.0.1": 1 << 3})
    assert _bits(presence.holders(b"d|dev")) == {2}
    assert _bits(presence.holders(b"i|10.0.0.1")) == {3}
    assert _bits(presence.holders(b"d|other")) <= {2, 3}  # a shared bucket at most
    presence.set_indexed(ALL & ~(1 << 1))  # partition 1: written elsewhere, not indexed
    assert _bits(presence.holders(b"d|dev")) == {1, 2}
    assert _bits(presence.word(b"d|dev")) == {2}  # what the engine reads: indexed only
    with pytest.raises(ValueError):
        Presence(MAX_PARTITIONS + 1)


# ---------------------------------------------------------------- the worker's store


@pytest.fixture(scope="module")
def sink(broker) -> Iterator[KafkaSink]:
    sink = KafkaSink({"bootstrap.servers": broker.bootstrap})
    yield sink
    sink.producer.flush(5)


@pytest.fixture
def table(broker, tmp_path: Path) -> Iterator[Any]:
    uid = uuid.uuid4().hex[:8]
    app = faust.App(f"presence-{uid}", broker=f"kafka://{broker.bootstrap}",
                    store="rocksdb://", datadir=str(tmp_path / "faust"))
    table = app.Table("state", default=None, key_type=bytes, value_type=bytes,
                      partitions=PARTITIONS)
    admin = AdminClient({"bootstrap.servers": broker.bootstrap})
    for fut in admin.create_topics(
            [NewTopic(table.changelog_topic.get_topic_name(), PARTITIONS, 1)]).values():
        fut.result(15)
    yield table
    for db in table.data._dbs.values():
        db.close()


def _txn(offset: int, partition: int, card: str) -> TxnEvent:
    return TxnEvent(partition, offset, {
        "card_id": card, "event_time": T0_MS + offset * 1000, "amount_ref": 10.0,
        "merchant_id": "shop", "country": "FR", "device_id": "dev", "ip": "10.0.0.1",
        "lat": None, "lon": None})


def _elsewhere(events: list[TxnEvent]) -> list[tuple[int, bytes, bytes]]:
    """The records another worker would have written deciding ``events`` alone."""
    other = MemoryStore(PARTITIONS)
    return FeatureEngine(FeatureConfig(), other).process(events).writes


@pytest.mark.parametrize("how", ["assigned", "rebalanced"])
def test_a_partial_written_by_another_worker_counts_once_the_partition_is_here(
        how: str, table: Any, sink: KafkaSink) -> None:
    """Partition 2's device and IP partials were written by another worker (and recovered
    here by Faust). Once the partition is assigned to this worker (or given back after a
    rebalance), an event on partition 0 with the same device counts them: 2 cards."""
    owned = {0, 1} if how == "assigned" else {0, 1, 2}
    state = FaustTableState(table, f"transactions-{uuid.uuid4().hex[:6]}", sink,
                            end_marker=True)
    store = TableFeatureStore(state, owned=lambda: owned, cache_mb=1.0)
    assert store.presence is not None
    engine = FeatureEngine(FeatureConfig(), store)
    store.refresh()
    first = engine.process([_txn(0, 0, "card_a")])
    store.write(first.writes)
    asyncio.run(store.flush())
    assert first.vectors[0]["device_cards_24h"] == 1.0

    state.record(_elsewhere([_txn(1, 2, "card_b")]))  # what Faust's recovery brings
    if how == "assigned":
        owned.add(2)
    else:
        store.rebalanced({2})  # what the rebalance hook does: partition 2 came back
    store.refresh()
    later = engine.process([_txn(2, 0, "card_c")]).vectors[0]
    assert later["device_cards_24h"] == 3.0  # card_a, card_b (partition 2), card_c
    assert later["ip_cards_24h"] == 3.0
    assert store.scanned_keys >= 2


def test_without_presence_every_partition_is_read(table: Any, sink: KafkaSink) -> None:
    state = FaustTableState(table, "transactions-off", sink, end_marker=True)
    assert TableFeatureStore(state, owned=lambda: {0}, presence=False).presence is None
    # More partitions than a word tells apart, or too few to gain: no index.
    for n in (MAX_PARTITIONS + 1, MIN_PARTITIONS - 1):
        assert TableFeatureStore(state, owned=lambda: {0}, partitions=n).presence is None
