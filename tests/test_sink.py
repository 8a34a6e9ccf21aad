"""The worker's producer path (KafkaSink through its RenewingProducer) on a real broker:
each changelog send reports every partition's last offset (where recovery starts next
time), every record arrives once, and a record the broker cannot take fails its batch,
except a dead letter, which is reported so that it can be sent again without its value."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from confluent_kafka.admin import AdminClient, NewTopic

from fraudstream.streams.embedded.broker import EmbeddedBroker
from fraudstream.streams.settings import Settings
from fraudstream.streams.worker import renewing_producer
from fraudstream.streams.worker.delivery import DeliveryError, KafkaSink
from tests.conftest import consume_all


def test_the_worker_producer_path_reports_offsets_delivers_all_and_refuses_loudly(
        broker: EmbeddedBroker) -> None:
    uid = uuid.uuid4().hex[:6]
    changelog, decisions = f"sink-{uid}-changelog", f"sink-{uid}-decisions"
    admin = AdminClient({"bootstrap.servers": broker.bootstrap})
    for fut in admin.create_topics([NewTopic(changelog, 4, 1),
                                    NewTopic(decisions, 4, 1)]).values():
        fut.result(15)
    config = {"bootstrap.servers": broker.bootstrap}
    sink = KafkaSink(config)
    renewing_producer.install(sink, config, 10.0)  # as the worker runs it
    loop = asyncio.new_event_loop()
    try:
        last = loop.run_until_complete(sink.send(
            (changelog, i % 4, b"c|%d" % i, b"state %d" % i) for i in range(40)))
        assert last == {(changelog, p): 9 for p in range(4)}  # 10 records each, from 0
        refused = loop.run_until_complete(sink.publish(
            [(decisions, [(b"txn-%d" % i, b"decision %d" % i) for i in range(30)])],
            tolerant=(decisions,)))
        assert refused == []
        settings = Settings.from_env().replace(kafka={"bootstrap": broker.bootstrap})
        got = consume_all(settings, changelog, 40)
        assert sorted((m.partition(), m.key(), m.value()) for m in got) == sorted(
            (i % 4, b"c|%d" % i, b"state %d" % i) for i in range(40))
        got = consume_all(settings, decisions, 30)
        assert sorted(m.key() for m in got) == sorted(b"txn-%d" % i for i in range(30))

        huge = b"x" * 2_000_000  # over the producer's message.max.bytes
        refused = loop.run_until_complete(sink.publish(
            [(decisions, [(b"ok", b"small"), (b"big", huge)])], tolerant=(decisions,)))
        assert [(topic, index) for topic, index, _why in refused] == [(decisions, 1)]
        assert "MSG_SIZE_TOO_LARGE" in refused[0][2]
        with pytest.raises(DeliveryError, match="MSG_SIZE_TOO_LARGE"):
            loop.run_until_complete(sink.send(iter([(changelog, 0, b"big", huge)])))
    finally:
        loop.close()
