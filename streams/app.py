"""The one wiring place: builds the Faust app, topics, state, scorer and sinks from
:class:`streams.settings.Settings`.

Records of ``transactions`` reach :func:`build_worker`'s ``handle`` in whole fetched
batches (:mod:`streams.batching`, at most ``FRAUDSTREAM_WORKER_BATCH_MAX`` records each);
:class:`streams.pipeline.Pipeline` decides the batch and
:class:`streams.delivery.BatchCommitter` writes the results (its docstring has the commit
order). Faust keeps the group membership, partition assignment, the dedupe table
(RocksDB + changelog, :mod:`streams.table_state`) and the offset commits.
"""

from __future__ import annotations

import logging
import ssl
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import faust
from confluent_kafka.admin import AdminClient
from faust.transport.drivers import aiokafka as faust_aiokafka

from schemas.codec import Codecs, make_registry
from scorers.rules import RuleSet, RulesScorer
from streams import batching
from streams.delivery import BatchCommitter, KafkaSink
from streams.pipeline import Limits, Pipeline, RawRecord
from streams.settings import KafkaSettings, Settings
from streams.table_state import FaustTableState

log = logging.getLogger("fraudstream.worker")


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
    state: FaustTableState
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
    sink = KafkaSink(settings.kafka.client_config())
    state = FaustTableState(table, settings.topics.transactions, sink,
                            end_marker=settings.kafka.embedded)
    committer = BatchCommitter(state, sink, settings.topics.decisions, settings.topics.dlq)
    source = app.topic(
        settings.topics.transactions,
        key_type=bytes,
        value_type=bytes,
        key_serializer="raw",
        value_serializer="raw",
        partitions=partitions,
    )
    stats = BatchStats()

    async def handle(batch: Sequence[tuple[Any, Sequence[Any]]]) -> None:
        now_ms = int(time.time() * 1000)  # for records without a Kafka timestamp
        records = [
            RawRecord(
                topic=r.topic,
                partition=r.partition,
                offset=r.offset,
                key=r.key,
                value=r.value,
                timestamp_ms=r.timestamp if r.timestamp is not None and r.timestamp >= 0
                else now_ms,
            )
            for _tp, recs in batch
            for r in recs
        ]
        result = pipeline.process(records, state.lookup)
        t0 = time.perf_counter()
        await committer.commit(result)
        stats.add(len(records), result, (time.perf_counter() - t0) * 1000.0)

    batching.install(app, {settings.topics.transactions}, handle, w.batch_max)

    @app.timer(interval=w.dedupe_expiry_interval_s)
    async def expire_dedupe() -> None:
        """Forget transaction_ids older than the retention: a copy sent later than that
        is decided afresh."""
        before = int((time.time() / 86_400.0) - w.dedupe_retention_days)
        removed = await state.expire(before)
        if removed:
            log.info("dedupe: expired %d entries of event days before %d", removed, before)

    @app.agent(source, name="score")
    async def score(stream: Any) -> None:
        """Declares the subscription; the batch consumer hands every record of this topic
        to ``handle`` in whole fetched batches, so nothing reaches this loop."""
        async for _event in stream:  # pragma: no cover - records never arrive here
            log.error("a transactions record bypassed the batch consumer")

    return Worker(app=app, pipeline=pipeline, committer=committer, state=state, sink=sink)


def run_worker(settings: Settings, loglevel: str = "warning") -> None:
    """``fraudstream worker``: run until SIGINT/SIGTERM (Faust handles the signals)."""
    worker = build_worker(settings)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    faust.Worker(worker.app, loglevel=loglevel, quiet=True).execute_from_commandline()
