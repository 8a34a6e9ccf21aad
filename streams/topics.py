"""Create the service's topics (idempotent): ``fraudstream topics``."""

from __future__ import annotations

from confluent_kafka import Consumer, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from streams.settings import Settings


def ensure_topics(settings: Settings, timeout_s: float = 15.0,
                  names: list[str] | None = None) -> dict[str, int]:
    """Create every topic of ``settings.topics`` (or ``names``) that does not exist yet.

    Returns topic -> partition count as the broker reports it afterwards. A topic that
    already exists is left as it is (its partition count is not changed).
    """
    admin = AdminClient(settings.kafka.client_config())
    existing = admin.list_topics(timeout=timeout_s).topics
    names = settings.topics.all() if names is None else names
    wanted = [t for t in names if t not in existing]
    if wanted:
        futures = admin.create_topics(
            [
                NewTopic(
                    t,
                    num_partitions=settings.kafka.partitions,
                    replication_factor=settings.kafka.replication_factor,
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
