"""``fraudstream tail TOPIC``: print decoded records of one of the service's topics."""

from __future__ import annotations

import argparse
import sys
import uuid
from datetime import datetime

import orjson
from confluent_kafka import OFFSET_BEGINNING, OFFSET_END, Consumer

from schemas.codec import Codecs, DecodeError, make_registry
from streams.settings import Settings
from streams.topics import assign_all


def _default(value: object) -> object:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    raise TypeError


def main(args: argparse.Namespace, settings: Settings) -> int:
    topics = settings.topics
    codecs = Codecs(
        make_registry(settings.codec.registry_url, settings.codec.registry_username,
                      settings.codec.registry_password),
        topics,
    )
    by_topic = {
        topics.transactions: codecs.transaction,
        topics.labels: codecs.label,
        topics.decisions: codecs.decision,
        topics.decisions_shadow: codecs.decision,
        topics.dlq: codecs.dead_letter,
        topics.drift: codecs.drift_event,
    }
    codec = by_topic.get(args.topic)
    if codec is None:
        print(f"unknown topic {args.topic!r}; one of {', '.join(by_topic)}", file=sys.stderr)
        return 2
    consumer = Consumer(settings.kafka.consumer_config(f"fraudstream-tail-{uuid.uuid4().hex[:8]}"))
    try:
        assign_all(consumer, [args.topic], OFFSET_BEGINNING if args.from_beginning else OFFSET_END)
    except LookupError as exc:
        print(exc, file=sys.stderr)
        return 2
    seen = 0
    try:
        while args.count == 0 or seen < args.count:
            msg = consumer.poll(1.0)
            if msg is None or msg.error():
                continue
            try:
                record = codec.decode(msg.value())
            except DecodeError as exc:
                record = {"undecodable": exc.reason}
            sys.stdout.write(orjson.dumps(record, default=_default).decode() + "\n")
            sys.stdout.flush()
            seen += 1
    except KeyboardInterrupt:
        pass
    finally:
        consumer.close()
    return 0
