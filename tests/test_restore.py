"""Bulk recovery of the state table (streams/worker/restore.py) against the embedded broker."""

from __future__ import annotations

import uuid

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic
from rocksdict import Options, Rdict

from fraudstream.streams.worker import restore

OFFSET_KEY = b"__faust\0offset__"


@pytest.fixture
def changelog(broker):
    topic = f"restore-{uuid.uuid4().hex[:8]}-changelog"
    admin = AdminClient({"bootstrap.servers": broker.bootstrap})
    for fut in admin.create_topics([NewTopic(topic, 1, 1)]).values():
        fut.result(15)
    return topic


def test_a_changelog_is_applied_in_bulk_with_tombstones_and_the_offset(broker, changelog,
                                                                        tmp_path, monkeypatch):
    # The embedded broker reports the base offset of the last record batch as the end:
    # compare with a threshold well below what was written.
    monkeypatch.setattr(restore, "MIN_RECORDS", 1000)
    n = 25_000
    producer = Producer({"bootstrap.servers": broker.bootstrap, "linger.ms": 20})
    for i in range(n):
        producer.produce(changelog, key=b"c|card_%06d" % (i % 20_000), value=b"v%d" % i,
                         partition=0)
    producer.produce(changelog, key=b"c|card_000003", value=None, partition=0)  # deleted
    producer.flush(60)
    db = Rdict(str(tmp_path / "state-0.db"), Options(raw_mode=True))
    config = {"bootstrap.servers": broker.bootstrap, "group.id": "restore-test",
              "enable.auto.commit": False}

    applied = restore.restore_partition(db, OFFSET_KEY, config, changelog, 0, idle_s=0.5)

    assert applied == n + 1
    assert db.get(b"c|card_000003") is None
    assert db.get(b"c|card_000004") == b"v%d" % (20_000 + 4)  # the later write wins
    assert db.get(b"c|card_019999") == b"v19999"
    assert int(db.get(OFFSET_KEY)) == n  # the last offset applied: Faust goes on from there
    # Nothing new since: a second run leaves it to Faust's own recovery.
    assert restore.restore_partition(db, OFFSET_KEY, config, changelog, 0, idle_s=0.5) == 0
    db.close()


def _produce(broker, topic: str, records: list[tuple[bytes, bytes]]) -> None:
    producer = Producer({"bootstrap.servers": broker.bootstrap, "linger.ms": 20})
    for key, value in records:
        producer.produce(topic, key=key, value=value, partition=0)
    producer.flush(15)


def _config(broker) -> dict:
    return {"bootstrap.servers": broker.bootstrap, "group.id": "restore-test",
            "enable.auto.commit": False}


def test_a_changelog_made_again_is_read_from_its_start_over_the_local_store(
        broker, changelog, tmp_path, monkeypatch):
    """A broker that lost its data: the store had applied offsets its changelog no longer
    has, and the records written since sit at offsets it would seek past."""
    db = Rdict(str(tmp_path / "state-0.db"), Options(raw_mode=True))
    db[b"c|card_000001"] = b"before the loss"
    db[b"c|card_000002"] = b"before the loss"
    db[OFFSET_KEY] = b"500"  # applied up to 500 on the broker that was lost
    _produce(broker, changelog, [(b"c|card_000001", b"after"), (b"d|phone", b"after")])

    # Too few records for a bulk read: Faust's recovery is told to start at the first.
    assert restore.restore_partition(db, OFFSET_KEY, _config(broker), changelog, 0,
                                     idle_s=0.5) == 0
    assert int(db.get(OFFSET_KEY)) == -1
    monkeypatch.setattr(restore, "MIN_RECORDS", 1)
    db[OFFSET_KEY] = b"500"
    assert restore.restore_partition(db, OFFSET_KEY, _config(broker), changelog, 0,
                                     idle_s=0.5) == 2
    assert db.get(b"c|card_000001") == b"after" and db.get(b"d|phone") == b"after"
    assert db.get(b"c|card_000002") == b"before the loss"  # nothing said otherwise since
    assert int(db.get(OFFSET_KEY)) == 1
    db.close()


def test_a_store_at_the_end_of_its_changelog_is_not_taken_for_one_made_again(
        broker, changelog, tmp_path, monkeypatch):
    """The embedded broker reports the base offset of the last record batch as the end: a
    store that applied the whole batch is past that end, yet nothing was lost."""
    monkeypatch.setattr(restore, "MIN_RECORDS", 1)
    _produce(broker, changelog, [(b"c|card_%06d" % i, b"v") for i in range(10)])
    consumer = Consumer({**_config(broker), "enable.partition.eof": True})
    _low, high = consumer.get_watermark_offsets(TopicPartition(changelog, 0), 15.0)
    assert high < 10  # what makes the check needed (one batch: 1)
    assert restore.holds_offset(consumer, changelog, 0, 9)
    assert not restore.holds_offset(consumer, changelog, 0, 10)  # the end: nothing there
    consumer.close()
    db = Rdict(str(tmp_path / "state-0.db"), Options(raw_mode=True))
    db[OFFSET_KEY] = b"9"
    assert restore.restore_partition(db, OFFSET_KEY, _config(broker), changelog, 0,
                                     idle_s=0.5) == 0
    assert int(db.get(OFFSET_KEY)) == 9
    db.close()
