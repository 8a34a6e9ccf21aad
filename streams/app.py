"""The one wiring place: builds the Faust app, topics, state, scorer and sinks from
:class:`streams.settings.Settings`.

The scoring agent takes micro-batches from ``transactions`` (up to
``FRAUDSTREAM_WORKER_BATCH_MAX`` records or ``FRAUDSTREAM_WORKER_BATCH_WAIT_MS`` of waiting),
runs :class:`streams.pipeline.Pipeline` on the whole batch, and writes the results with
:class:`streams.delivery.BatchCommitter` (see its docstring for the commit order). Faust
keeps the group membership, partition assignment, the dedupe table (RocksDB + changelog)
and the offset commits.
"""

from __future__ import annotations

import logging
import ssl
import time
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import faust
import faust.streams
from confluent_kafka.admin import AdminClient
from faust.transport.drivers import aiokafka as faust_aiokafka

from schemas.codec import Codecs, make_registry
from scorers.rules import RuleSet, RulesScorer
from streams.delivery import BatchCommitter, KafkaSink
from streams.pipeline import Limits, Pipeline, RawRecord
from streams.settings import KafkaSettings, Settings

log = logging.getLogger("fraudstream.worker")

#: Changelog key of the embedded-broker end marker; never a transaction_id (NUL byte).
END_MARKER = b"\x00fraudstream:end-marker"


def faust_credentials(kafka: KafkaSettings) -> Any:
    """Faust/aiokafka credentials for the same cluster settings librdkafka gets."""
    context = None
    if kafka.security_protocol in ("SSL", "SASL_SSL"):
        context = ssl.create_default_context(cafile=kafka.ssl_cafile or None)
        if kafka.ssl_certfile:
            context.load_cert_chain(kafka.ssl_certfile, kafka.ssl_keyfile or None)
    if kafka.security_protocol.startswith("SASL"):
        return faust.SASLCredentials(
            username=kafka.sasl_username,
            password=kafka.sasl_password,
            ssl_context=context,
            mechanism=kafka.sasl_mechanism,
        )
    if context is not None:
        return faust.SSLCredentials(context)
    return None


def _set_fetch_max_wait(wait_ms: int) -> None:
    """Faust hard-codes a 1500 ms fetch wait for its aiokafka consumer; use ours.

    On Apache Kafka a fetch returns as soon as data arrives, so the wait hardly matters;
    the embedded broker (Tansu) holds every fetch for the whole wait, which would add up
    to 1.5 s of latency per event.
    """
    cls = faust_aiokafka.AIOKafkaConsumerThread
    original = getattr(cls, "_fraudstream_original_create", cls._create_worker_consumer)

    def create(self: Any, transport: Any) -> Any:
        consumer = original(self, transport)
        consumer._fetch_max_wait_ms = wait_ms  # read when the consumer starts its fetcher
        return consumer

    cls._fraudstream_original_create = original
    cls._create_worker_consumer = create


def source_partitions(settings: Settings) -> int:
    """Partition count of the transactions topic (tables must match it)."""
    admin = AdminClient(settings.kafka.client_config())
    meta = admin.list_topics(settings.topics.transactions, timeout=15.0)
    topic = meta.topics.get(settings.topics.transactions)
    if topic is None or topic.error is not None or not topic.partitions:
        return settings.kafka.partitions
    return len(topic.partitions)


@contextmanager
def _as_event(event: Any) -> Iterator[None]:
    """Make Faust's table code see ``event`` as the current one.

    Faust picks a table's store partition and changelog partition from the current
    event. A micro-batch mixes partitions, so each partition's table operations run
    under one of that partition's own events.
    """
    token = faust.streams._current_event.set(weakref.ref(event))
    try:
        yield
    finally:
        faust.streams._current_event.reset(token)


class FaustDedupeState:
    """transaction_id -> first decision bytes, in a Faust table (store + changelog).

    ``end_marker`` (embedded broker only): Tansu reports a partition's end offset as the
    base offset of its last record batch + 1, so Faust's recovery would stop before the
    last batch's other records and forget them. After each flush we append one tombstone
    for :data:`END_MARKER` to every changelog partition written, in a batch of its own:
    the reported end then lies past every real entry. One extra round trip per batch.
    """

    def __init__(self, app: faust.App, table: Any, end_marker: bool = False) -> None:
        self.app = app
        self.table = table
        self.end_marker = end_marker
        self._events: dict[int, Any] = {}
        self._touched: set[int] = set()

    def bind(self, events: Sequence[Any]) -> None:
        self._events = {e.message.partition: e for e in events}

    def lookup(self, partition: int, keys: list[bytes]) -> list[bytes | None]:
        get = self.table.get
        with _as_event(self._events[partition]):
            return [get(k) for k in keys]

    def record(self, entries: Sequence[tuple[int, bytes, bytes]]) -> None:
        by_partition: dict[int, list[tuple[bytes, bytes]]] = {}
        for partition, key, value in entries:
            by_partition.setdefault(partition, []).append((key, value))
        for partition, items in by_partition.items():
            with _as_event(self._events[partition]):
                for key, value in items:
                    self.table[key] = value
        self._touched.update(by_partition)

    async def flush(self) -> None:
        await self.app.producer.flush()
        if self.end_marker and self._touched:
            for partition in self._touched:
                self.table.send_changelog(partition, END_MARKER, None)
            await self.app.producer.flush()
        self._touched.clear()


class BatchStats:
    """Logs, every ``every_s`` seconds, what the batches looked like (until /metrics)."""

    def __init__(self, every_s: float = 10.0) -> None:
        self.every_s = every_s
        self._reset(time.monotonic())

    def _reset(self, now: float) -> None:
        self.since = now
        self.batches = self.events = self.dead = 0
        self.process_ms = self.commit_ms = 0.0

    def add(self, size: int, result: Any, commit_ms: float) -> None:
        self.batches += 1
        self.events += size
        self.dead += len(result.dead_letters)
        self.process_ms += result.timings_ms.get("total", 0.0)
        self.commit_ms += commit_ms
        now = time.monotonic()
        if now - self.since >= self.every_s:
            n = self.batches
            log.info(
                "%.0f events/s, %d batches (mean size %.1f), mean process %.2f ms, "
                "mean commit %.2f ms, %d dead letters",
                self.events / (now - self.since), n, self.events / n, self.process_ms / n,
                self.commit_ms / n, self.dead,
            )
            self._reset(now)


@dataclass
class Worker:
    app: faust.App
    pipeline: Pipeline
    committer: BatchCommitter
    state: FaustDedupeState
    sink: KafkaSink


def build_worker(settings: Settings) -> Worker:
    w = settings.worker
    partitions = source_partitions(settings)
    _set_fetch_max_wait(settings.kafka.fetch_max_wait_ms)
    app = faust.App(
        w.app_id,
        broker=[f"kafka://{host}" for host in settings.kafka.bootstrap.split(",")],
        broker_credentials=faust_credentials(settings.kafka),
        store="rocksdb://" if w.store == "rocksdb" else "memory://",
        datadir=str(w.data_dir),
        topic_partitions=partitions,
        topic_replication_factor=settings.kafka.replication_factor,
        broker_session_timeout=settings.kafka.session_timeout_ms / 1000.0,
        broker_heartbeat_interval=max(0.5, settings.kafka.session_timeout_ms / 1000.0 / 6),
        broker_commit_interval=w.commit_interval_s,
        consumer_auto_offset_reset="earliest",
        producer_acks=-1,
        web_enabled=False,
        stream_wait_empty=False,
        recovery_consistency_check=not settings.kafka.embedded,
    )
    registry = make_registry(
        settings.codec.registry_url, settings.codec.registry_username,
        settings.codec.registry_password,
    )
    codecs = Codecs(registry, settings.topics)
    scorer = RulesScorer(RuleSet.load(settings.scoring.rules_path))
    pipeline = Pipeline(
        codecs,
        scorer,
        Limits(
            max_record_bytes=settings.codec.max_record_bytes,
            max_future_ms=w.max_future_ms,
            max_amount=w.max_amount,
        ),
        input_format=settings.codec.input_format,
    )
    table = app.Table(
        "dedupe",
        default=None,
        key_type=bytes,
        value_type=bytes,
        partitions=partitions,
    )
    state = FaustDedupeState(app, table, end_marker=settings.kafka.embedded)
    sink = KafkaSink(settings.kafka.client_config())
    committer = BatchCommitter(state, sink, settings.topics.decisions, settings.topics.dlq)
    source = app.topic(
        settings.topics.transactions,
        key_type=bytes,
        value_type=bytes,
        key_serializer="raw",
        value_serializer="raw",
        partitions=partitions,
    )
    batch_max, within = w.batch_max, w.batch_wait_ms / 1000.0
    stats = BatchStats()

    @app.agent(source, name="score")
    async def score(stream: Any) -> None:
        async for events in stream.take_events(batch_max, within=within):
            records = [
                RawRecord(
                    topic=m.topic,
                    partition=m.partition,
                    offset=m.offset,
                    key=m.key,
                    value=m.value,
                    timestamp_ms=int(m.timestamp * 1000),
                )
                for m in (e.message for e in events)
            ]
            state.bind(events)
            result = pipeline.process(records, state.lookup)
            t0 = time.perf_counter()
            await committer.commit(result)
            stats.add(len(records), result, (time.perf_counter() - t0) * 1000.0)

    return Worker(app=app, pipeline=pipeline, committer=committer, state=state, sink=sink)


def run_worker(settings: Settings, loglevel: str = "warning") -> None:
    """``fraudstream worker``: run until SIGINT/SIGTERM (Faust handles the signals)."""
    worker = build_worker(settings)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    faust.Worker(worker.app, loglevel=loglevel, quiet=True).execute_from_commandline()
