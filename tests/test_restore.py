"""Bulk recovery of the state table (streams/worker/restore.py) against the embedded broker."""

from __future__ import annotations

import uuid

import pytest
from confluent_kafka import Producer
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
