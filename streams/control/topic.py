"""Writing and reading the control topic (``FRAUDSTREAM_TOPICS_CONTROL``).

A change is published as two records (:mod:`fraudstream.schemas.control`): the audit
record under its own key, then the state record under its kind. Readers assign every
partition and read from the start: the topic is small (compacted where the broker
compacts; the embedded broker keeps everything) and holds no consumer group. They replay
the audit records through :class:`~fraudstream.schemas.control.Heads`; a fenced change is
read back after it is written, so its publisher learns whether it is in force
(:class:`Superseded` when another change came first).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, Message, Producer

from fraudstream.schemas.control import (
    APPLIED,
    SUPERSEDED,
    ControlError,
    ControlRecord,
    Heads,
    decode,
    is_audit,
)
from fraudstream.streams.settings import Settings
from fraudstream.streams.topics import assign_all, ensure_topics

#: A reader has reached the end when it is past the end offset and nothing came for this
#: long (the embedded broker understates end offsets by its last batch).
IDLE_S = 0.5


#: The exit code of a command whose change was superseded: read again, then try again.
SUPERSEDED_EXIT = 4


class Superseded(RuntimeError):
    """A fenced change was written, but another change of its kind came first: it is not
    in force anywhere. Read the state again and decide again."""

    def __init__(self, record: ControlRecord, head: ControlRecord | None) -> None:
        self.record, self.head = record, head
        first = (f"{head.version} by {head.published_by} ({head.reason})" if head is not None
                 else "none")
        super().__init__(f"the {record.kind} state changed while this change was made (now "
                         f"in force: {first}); nothing of this change is applied: read "
                         "the state again and publish again if it still should be")


def publish(settings: Settings, record: ControlRecord, timeout_s: float = 15.0) -> None:
    """The record, acknowledged by the broker (acks=all); creates the topic if needed.
    A fenced record (``prev`` set) is then read back: :class:`Superseded` when another
    change of its kind came first. Raises RuntimeError naming what failed."""
    value = record.encode()
    write_acked(settings, settings.topics.control,
                ((key, value) for key in (record.audit_key(), record.state_key())),
                timeout_s, linger_ms=0)
    if record.prev is not None:
        confirm(settings, record, 30.0)


def confirm(settings: Settings, record: ControlRecord, timeout_s: float) -> None:
    """Read the topic back up to ``record``: returns when it is in force there,
    :class:`Superseded` when another change of its kind came first."""
    heads = Heads()
    mine = record.audit_key()
    consumer = control_consumer(settings, f"confirm-{time.time_ns()}")
    try:
        for msg in read_to_end(consumer, timeout_s):
            rec = _audit_record(msg)
            if rec is None:
                continue
            verdict = heads.offer(rec)
            if msg.key() == mine:
                if verdict == SUPERSEDED:
                    raise Superseded(record, heads.get(record.kind))
                return
    finally:
        consumer.close()
    raise RuntimeError(f"the {record.kind} change was written but not read back within "
                       f"{timeout_s:g} s: whether it is in force is unknown (see history)")


def _audit_record(msg: Message) -> ControlRecord | None:
    if not is_audit(msg.key()):
        return None
    try:
        return decode(msg.value())
    except ControlError:
        return None


def heads(settings: Settings) -> Heads:
    """The state of every kind in force on the control topic (none: nothing published)."""
    return changes(settings)[0]


def changes(settings: Settings) -> tuple[Heads, list[ControlRecord]]:
    """The state of every kind in force on the control topic, and every change applied
    (not superseded, not repeated), in order."""
    found, applied = Heads(), []
    try:
        consumer = control_consumer(settings, f"state-{time.time_ns()}")
    except LookupError:
        return found, applied
    try:
        for msg in read_to_end(consumer, 30.0):
            rec = _audit_record(msg)
            if rec is not None and found.offer(rec) == APPLIED:
                applied.append(rec)
    finally:
        consumer.close()
    return found, applied


def write_acked(settings: Settings, topic: str, records: Iterable[tuple[bytes, bytes]],
                timeout_s: float, linger_ms: int = 20, max_bytes: int | None = None
                ) -> list[int]:
    """``records`` (key, value) to ``topic``, in order, each acknowledged by the broker
    (acks=all, idempotent); creates the topic if needed. Their offsets, in the order
    written; raises RuntimeError naming what failed."""
    ensure_topics(settings, names=[topic])
    config = {**settings.kafka.client_config(), "acks": "all", "enable.idempotence": True,
              "linger.ms": linger_ms}
    if max_bytes is not None:
        config["message.max.bytes"] = max_bytes
    producer = Producer(config)
    errors: list[str] = []
    offsets: list[int] = []

    def delivered(err: KafkaError | None, msg: Message) -> None:
        if err is not None:
            errors.append(err.str())
        else:
            offsets.append(msg.offset())

    for key, value in records:
        producer.produce(topic, key=key, value=value, on_delivery=delivered)
        producer.poll(0)
    left = producer.flush(timeout_s)
    if left or errors:
        raise RuntimeError(f"not written to {topic}: "
                           f"{'; '.join(errors) or f'{left} record(s) undelivered'}")
    return offsets


def control_consumer(settings: Settings, name: str, topic: str | None = None) -> Consumer:
    """A consumer of every partition of the control topic (or ``topic``), from the start.
    Raises LookupError when the topic does not exist."""
    consumer = Consumer({**settings.kafka.consumer_config(f"{settings.worker.app_id}-{name}"),
                         "enable.auto.commit": False, "fetch.message.max.bytes": 4 << 20})
    try:
        assign_all(consumer, [topic or settings.topics.control], OFFSET_BEGINNING)
    except LookupError:
        consumer.close()
        raise
    return consumer


def latest(settings: Settings, kind: str) -> ControlRecord | None:
    """The state of ``kind`` in force on the control topic (None: none published); a
    change to it is made ``.after()`` this."""
    return heads(settings).get(kind)


def read_to_end(consumer: Consumer, timeout_s: float) -> Iterator[Message]:
    """The records from the consumer's position to the end of every partition it holds
    (or until ``timeout_s``)."""
    deadline = time.monotonic() + timeout_s
    last = time.monotonic()
    while time.monotonic() < deadline:
        msgs = consumer.consume(500, 0.1)
        for m in msgs:
            if m.error() is None:
                yield m
        if msgs:
            last = time.monotonic()
        elif time.monotonic() - last >= IDLE_S and _at_end(consumer):
            return


def _at_end(consumer: Consumer) -> bool:
    for tp in consumer.position(consumer.assignment()):
        _low, high = consumer.get_watermark_offsets(tp, timeout=5, cached=False)
        if tp.offset < 0 and high > 0 or 0 <= tp.offset < high:
            return False
    return True
