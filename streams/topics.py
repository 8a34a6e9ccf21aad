"""Create the service's topics (idempotent): ``fraudstream topics``."""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterator

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from fraudstream.streams.errors import CONFIG_EXIT, UNREACHABLE_EXIT, StartError
from fraudstream.streams.settings import KafkaSettings, Settings

#: librdkafka logs every failed connection attempt (about every 50 ms on a refused SASL
#: handshake); :func:`connect` says what went wrong once, in its error.
_quiet = logging.getLogger("fraudstream.kafka.connect")
_quiet.addHandler(logging.NullHandler())
_quiet.propagate = False


def connect(kafka: KafkaSettings, timeout_s: float | None = None) -> AdminClient:
    """An admin client that has talked to the cluster, or :class:`StartError` with one
    line: the broker refused SASL authentication (at its first refusal: credentials do
    not fix themselves, and librdkafka would retry every 50 ms forever), or it could not
    be reached within ``timeout_s`` (default ``FRAUDSTREAM_KAFKA_CONNECT_TIMEOUT_S``)."""
    timeout_s = kafka.connect_timeout_s if timeout_s is None else timeout_s
    if kafka.security_protocol in ("SSL", "SASL_SSL"):
        for name in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
            path = getattr(kafka, name)
            try:
                if path:
                    open(path, "rb").close()
            except OSError as exc:
                raise StartError(f"FRAUDSTREAM_KAFKA_{name.upper()}={path}: cannot read it: "
                                 f"{exc.strerror or exc}") from exc
    errors: list[KafkaError] = []
    try:
        admin = AdminClient({**kafka.client_config(), "error_cb": errors.append,
                             "logger": _quiet})
    except KafkaException as exc:  # e.g. a CA file that is not PEM
        raise StartError(f"the Kafka client refused the FRAUDSTREAM_KAFKA_* settings: "
                         f"{_reason(exc.args[0] if exc.args else exc)}") from exc
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            admin.list_topics(timeout=max(0.1, min(0.25, deadline - time.monotonic())))
            return admin
        except KafkaException as exc:
            last = exc.args[0] if exc.args else exc
        admin.poll(0)  # serves error_cb
        refused = [e for e in errors if e.code() == KafkaError._AUTHENTICATION]
        if refused:
            raise StartError(
                f"Kafka at {kafka.bootstrap} refused SASL authentication (mechanism "
                f"{kafka.sasl_mechanism}, user {kafka.sasl_username!r}): "
                f"{_reason(refused[-1])}; check FRAUDSTREAM_KAFKA_SASL_MECHANISM, "
                "FRAUDSTREAM_KAFKA_SASL_USERNAME and FRAUDSTREAM_KAFKA_SASL_PASSWORD",
                CONFIG_EXIT)
        if time.monotonic() >= deadline:
            seen = [e for e in errors if e.code() != KafkaError._ALL_BROKERS_DOWN]
            why = _reason(seen[-1] if seen else last)
            raise StartError(
                f"cannot reach Kafka at {kafka.bootstrap} (FRAUDSTREAM_KAFKA_BOOTSTRAP, "
                f"{kafka.security_protocol}) within {timeout_s:g} s: {why}",
                UNREACHABLE_EXIT)


def _reason(error: object) -> str:
    """librdkafka's error text without the broker name prefix and timing suffix."""
    text = error.str() if isinstance(error, KafkaError) else str(error)
    text = re.sub(r"^\S+/(bootstrap|\d+): ", "", text)
    return re.sub(r" \(after \d+ms in state \w+\)$", "", text)


def ensure_topics(settings: Settings, timeout_s: float = 15.0,
                  names: list[str] | None = None) -> dict[str, int]:
    """Create every topic of ``settings.topics`` (or ``names``) that does not exist yet.

    Returns topic -> partition count as the broker reports it afterwards. A topic that
    already exists is left as it is (its partition count is not changed). A broker that
    cannot be reached or refuses the credentials is a :class:`StartError`.
    """
    admin = connect(settings.kafka)
    existing = admin.list_topics(timeout=timeout_s).topics
    names = settings.topics.all() if names is None else names
    wanted = [t for t in names if t not in existing]
    if wanted:
        control = (settings.topics.control, settings.topics.artifacts,
                   settings.topics.autopilot)
        futures = admin.create_topics(
            [
                NewTopic(
                    t,
                    # the control plane: one partition (one order of changes), compacted
                    # (the latest state, every audit record, every artifact chunk and every
                    # autopilot event, each under a key of its own, stay)
                    num_partitions=1 if t in control else settings.kafka.partitions,
                    replication_factor=settings.kafka.replication_factor,
                    config={"cleanup.policy": "compact"} if t in control else {},
                )
                for t in wanted
            ],
            operation_timeout=timeout_s,
        )
        for fut in futures.values():
            try:
                fut.result()
            except KafkaException as exc:
                if "TOPIC_ALREADY_EXISTS" not in str(exc):
                    raise
    meta = admin.list_topics(timeout=timeout_s).topics
    return {t: len(meta[t].partitions) for t in names if t in meta}


def offsets_at(consumer: Consumer, topic: str, partitions: list[int], time_ms: int,
               ends: dict[int, int] | None = None) -> dict[int, int]:
    """Per partition, where reading from ``time_ms`` (a Kafka timestamp) starts: its first
    record at or after the time, else the partition's end offset (``ends``, or read here
    before the lookup, so that records arriving meanwhile are read: they are newer). The
    embedded broker answers the lookup coarsely (it may give an earlier offset): readers
    skip older records as they read them."""
    if ends is None:
        ends = {p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
                for p in partitions}
    found = consumer.offsets_for_times(
        [TopicPartition(topic, p, time_ms) for p in partitions], timeout=10)
    return {tp.partition: tp.offset if tp.offset >= 0 else ends[tp.partition] for tp in found}


def read_since(consumer: Consumer, topic: str, partitions: list[int], since_ms: int,
               embedded: bool, idle_s: float = 2.0) -> Iterator[Message]:
    """The records of ``partitions`` with a Kafka timestamp from ``since_ms`` up to where
    the topic ended when the read started: the end offsets then, where the broker reports
    them right; on the embedded broker, which understates them by its last batch, a
    partition is read until a record written after the read started, until a read comes
    back short after the last batch's first record (see :func:`last_batch_in`), or until
    the topic stays idle for ``idle_s`` (on a live topic records keep coming: "until idle"
    alone would never end). Assigns ``partitions`` to ``consumer``."""
    until_ms = int(time.time() * 1000)
    ends = {p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
            for p in partitions}
    first = offsets_at(consumer, topic, partitions, since_ms, ends)
    consumer.assign([TopicPartition(topic, p, first[p]) for p in partitions])
    reading = set(partitions) if embedded else {p for p in partitions if first[p] < ends[p]}
    idle_since = time.monotonic()
    last_batch_read: set[int] = set()
    while reading and time.monotonic() - idle_since < idle_s:
        # once every partition's last batch is reached, the rest of it is queued: a read
        # that does not wait tells the end
        msgs = consumer.consume(1000, 0.0 if embedded and reading <= last_batch_read else 0.5)
        if msgs:
            idle_since = time.monotonic()
        for m in msgs:
            p = m.partition()
            if m.error() or p not in reading:
                continue
            ts = m.timestamp()[1]
            if ts >= until_ms:
                reading.discard(p)
                continue
            if m.offset() + 1 >= ends[p]:
                if embedded:
                    last_batch_read.add(p)
                else:
                    reading.discard(p)
            if ts >= since_ms:
                yield m
        if embedded and last_batch_in(len(msgs), 1000):
            reading -= last_batch_read


def last_batch_in(got: int, asked: int) -> bool:
    """Whether a ``consume(asked, timeout)`` that returned ``got`` records emptied the
    client's queue, so that every partition whose last batch's first record has been
    read has been read to that batch's end. The embedded broker reports a partition's end
    offset as its last record batch's first offset plus one. The client puts the records
    of one fetched batch on its queue together (librdkafka concatenates a fetch
    response's records onto the partition's queue at once), and a consume that comes back
    short has taken everything queued: the rest of that batch came with it."""
    return got < asked


def take_available(consumer: Consumer, wait_s: float, most: int) -> list[Message]:
    """Wait up to ``wait_s`` for one record, then take what else has come (up to
    ``most``) without waiting; [] when nothing came. ``consume(n, timeout)`` alone waits
    for n records or the whole timeout: on a quiet topic, always the timeout."""
    first = consumer.poll(wait_s)
    return [] if first is None else [first, *consumer.consume(most, 0)]


def assign_all(consumer: Consumer, topics: list[str], offset: int) -> None:
    """Assign every partition of ``topics`` to ``consumer``, starting at ``offset``
    (e.g. OFFSET_BEGINNING): no group join to wait for, no committed offsets used.
    Raises LookupError naming a topic the broker does not have."""
    parts: list[TopicPartition] = []
    for topic in topics:
        meta = consumer.list_topics(topic, timeout=10).topics.get(topic)
        if meta is None or meta.error is not None or not meta.partitions:
            raise LookupError(f"topic {topic!r} not found")
        parts += [TopicPartition(topic, p, offset) for p in meta.partitions]
    consumer.assign(parts)
