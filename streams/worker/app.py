"""The one wiring place: builds the Faust app, topics, state, scorer and sinks from
:class:`fraudstream.streams.settings.Settings`.

Records of ``transactions`` reach :func:`build_worker`'s ``handle`` in whole fetched
batches (:mod:`fraudstream.streams.worker.batching`, at most ``FRAUDSTREAM_WORKER_BATCH_MAX``
records each);
:class:`fraudstream.streams.pipeline.Pipeline` decides the batch and
:class:`fraudstream.streams.worker.delivery.BatchCommitter` writes the results (its docstring has
the commit
order). Faust keeps the group membership, partition assignment, the dedupe table
(RocksDB + changelog, :mod:`fraudstream.streams.worker.table_state`) and the offset commits.
"""

from __future__ import annotations

import asyncio
import faulthandler
import logging
import ssl
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import faust
from faust.transport.drivers import aiokafka as faust_aiokafka

from fraudstream.schemas.codec import Codecs, decode_json, make_registry
from fraudstream.schemas.fx import Rates
from fraudstream.scorers.cascade import ModelStage
from fraudstream.scorers.drift import DriftConfig
from fraudstream.scorers.online import OnlineStage
from fraudstream.scorers.registry import Registry
from fraudstream.scorers.rules import RuleSet
from fraudstream.state.engine import FeatureEngine, StateStore, warm_up
from fraudstream.state.features import FeatureConfig
from fraudstream.state.kernel_aot import ensure as ensure_aot_kernel
from fraudstream.state.kernel_cache import configure as configure_kernel
from fraudstream.state.kernel_cache import kernel
from fraudstream.streams.control.follow import ControlFollower
from fraudstream.streams.errors import StartError
from fraudstream.streams.health import Probes
from fraudstream.streams.pipeline import DAY_MS, Limits, Pipeline, RawRecord
from fraudstream.streams.settings import KafkaSettings, Settings
from fraudstream.streams.worker import batching, renewing_producer, restore
from fraudstream.streams.worker.align import Aligner, record_times
from fraudstream.streams.worker.delivery import BatchCommitter, KafkaSink
from fraudstream.streams.worker.feature_store import TableFeatureStore, forget_on_rebalance
from fraudstream.streams.worker.metrics import WorkerMetrics
from fraudstream.streams.worker.models_watch import ModelWatcher
from fraudstream.streams.worker.probes import Heartbeat, add_worker_checks
from fraudstream.streams.worker.progress import OutOfRangeLog, ProgressWatchdog
from fraudstream.streams.worker.replica import EntityReplica, install_replica
from fraudstream.streams.worker.sizing import BatchSizer
from fraudstream.streams.worker.startup import group_instance_id, skip_table_manager_sleep
from fraudstream.streams.worker.status import WorkerStatus
from fraudstream.streams.worker.table_state import FaustTableState, rocksdb_options

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


def _tolerate_revoked_seek() -> None:
    """A rebalance can revoke a partition while Faust's recovery seeks the stream
    partitions to their committed offsets; aiokafka then raises IllegalStateError ("No
    current assignment") and the worker stopped. Measured: the second worker of a
    scale-out died in 1 of 2 runs. The revoked partition needs no seek, and the rebalance
    under way seeks the new assignment again, so the error is logged and let go."""
    from aiokafka.errors import IllegalStateError

    cls = faust_aiokafka.AIOKafkaConsumerThread
    if getattr(cls, "_fraudstream_seek_patched", False):
        return
    original = cls.seek_to_committed

    async def seek_to_committed(self: Any) -> Any:
        try:
            return await original(self)
        except IllegalStateError as exc:
            log.warning("seek to committed offsets skipped, the assignment changed: %s", exc)
            return {}

    cls.seek_to_committed = seek_to_committed
    cls._fraudstream_seek_patched = True


def source_partitions(settings: Settings) -> int:
    """Partition count of the transactions topic (tables must match it)."""
    from fraudstream.streams.topics import connect  # a refused or unreachable broker: one line

    admin = connect(settings.kafka)
    meta = admin.list_topics(settings.topics.transactions, timeout=15.0)
    topic = meta.topics.get(settings.topics.transactions)
    if topic is None or topic.error is not None or not topic.partitions:
        return settings.kafka.partitions
    return len(topic.partitions)


@dataclass
class Worker:
    app: faust.App
    pipeline: Pipeline
    committer: BatchCommitter
    state: FaustTableState
    sink: KafkaSink
    features: StateStore


def build_worker(settings: Settings) -> Worker:
    w = settings.worker
    partitions = source_partitions(settings)
    _set_fetch_max_wait(settings.kafka.fetch_max_wait_ms)
    _tolerate_revoked_seek()
    skip_table_manager_sleep()
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
        consumer_group_instance_id=group_instance_id(settings),
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
    # The rules in force: the latest published on the control topic, else the file's;
    # later publications are swapped in between two batches (streams/control/follow.py).
    follower = ControlFollower(settings)
    scorer = follower.initial(RuleSet.load(settings.scoring.rules_path),
                              Rates.load(w.rates_path))
    table = app.Table(
        "state",
        default=None,
        key_type=bytes,
        value_type=bytes,
        partitions=partitions,
        options=rocksdb_options(w),
    )
    decided = settings.topics.by_card if w.repartition else settings.topics.transactions
    restoring = None
    if w.store == "rocksdb":
        restoring = restore.install(app, table, decided,
                                    settings.kafka.consumer_config(f"{w.app_id}-restore"))
    sink = KafkaSink(settings.kafka.client_config())
    state = FaustTableState(table, decided, sink, end_marker=settings.kafka.embedded,
                            wal=w.rocksdb_wal)
    fs = settings.features
    metrics = WorkerMetrics()
    probes = Probes()
    probes.ready.append(("start", lambda: "the worker is starting"))
    replica: EntityReplica | None = None
    feature_store: StateStore
    if fs.backend == "redis":
        from fraudstream.streams.worker.redis_store import RedisStore

        feature_store = RedisStore.from_settings(fs, partitions)
    else:
        if fs.replica:
            replica = install_replica(app, settings, table.changelog_topic.get_topic_name(),
                                      partitions, metrics)
        feature_store = TableFeatureStore(state, owned=lambda: _owned(app, settings),
                                          cache_mb=fs.cache_mb, replica=replica,
                                          partitions=partitions, presence=fs.presence,
                                          recovering=lambda: getattr(app, "in_recovery", False))
        forget_on_rebalance(app, feature_store)
    engine = FeatureEngine(
        FeatureConfig(allowed_lateness_ms=int(fs.allowed_lateness_s * 1000),
                      label_delay_ms=int(fs.label_delay_s * 1000)),
        feature_store,
    )
    configure_kernel(fs.kernel)
    if fs.kernel != "jit":
        # Built in a child process, so this one never maps numba's LLVM (~130 MB).
        built, how = ensure_aot_kernel()
        if built is None and fs.kernel == "aot":
            raise StartError(f"FRAUDSTREAM_FEATURES_KERNEL=aot: no ahead-of-time build ({how})")
        if built is None:
            log.warning("feature kernel: no ahead-of-time build (%s); compiling it in the "
                        "worker instead", how)
    took = warm_up(engine.config)
    log.warning("feature kernel (%s) ready in %.1f s", kernel()[1], took)
    from fraudstream.streams.worker.preflight import serve_metrics

    # a taken port stops the worker, unless METRICS_PORT_BUSY=warn
    serve_metrics(metrics, w, probes)
    registry = Registry(settings.scoring.models_dir)
    sc = settings.scoring
    models = ModelStage(drift=DriftConfig(sc.drift_window, sc.drift_psi_threshold,
                                          sc.drift_js_threshold))
    # The rates table in force: the latest accepted on the control topic, else the file's.
    limits = replace(Limits.from_settings(settings), rates=follower.rates)
    watcher = ModelWatcher(registry, models, metrics,
                           (engine.config.label_delay_ms, engine.config.allowed_lateness_ms),
                           limits.rates)
    watcher.check()
    log.warning("amounts in %s, rates table %s (%d currencies)", limits.rates.reference,
                limits.rates.version, len(limits.rates.units_per_ref))
    pipeline = Pipeline(
        codecs,
        scorer,
        limits,
        input_format=settings.codec.input_format,
        features=engine,
        log_features=fs.log,
        models=models,
        budget_ms=settings.scoring.budget_ms,
        model_timeout_ms=settings.scoring.model_timeout_ms,
        model_timeout_rows=w.batch_max,
        online=OnlineStage(feature_store, settings.scoring.online_max_weight)
        if settings.scoring.online else None,
    )
    committer = BatchCommitter(state, sink, settings.topics.decisions, settings.topics.dlq,
                               features=feature_store, features_topic=settings.topics.features,
                               by_card_topic=settings.topics.by_card,
                               shadow_topic=settings.topics.decisions_shadow,
                               drift_topic=settings.topics.drift,
                               encode_drift=codecs.drift_event.encode,
                               dead_letters=pipeline.dead_letters,
                               on_lost=lambda why: metrics.dead_letters_lost.labels(
                                   why.split(":", 1)[0]).inc())
    source, labels, by_card = (
        app.topic(name, key_type=bytes, value_type=bytes, key_serializer="raw",
                  value_serializer="raw", partitions=partitions)
        for name in (settings.topics.transactions, settings.topics.labels,
                     settings.topics.by_card)
    )
    status = WorkerStatus()
    labels_topic = settings.topics.labels
    seen = {"learned": 0, "unjoined": 0}

    def online_counts(online: OnlineStage | None) -> None:
        """Learned / unjoined labels since the last batch, into their counter."""
        if online is None:
            return
        for result in ("learned", "unjoined"):
            now = getattr(online, result)
            if now > seen[result]:
                metrics.online_labels.labels(result).inc(now - seen[result])
                seen[result] = now
        for partition, quality in online.quality.items():
            for name, value in quality.items():
                if value == value:  # not NaN
                    metrics.online_quality.labels(str(partition), name).set(value)
    metrics.set_rules(scorer.ruleset.version)
    metrics.set_rates(limits.rates)
    refused_seen: dict[str, int] = {}

    def control_counts() -> None:
        """Control records refused since the last call, into their counter."""
        for kind, n in list(follower.refused.items()):
            if n > refused_seen.get(kind, 0):
                metrics.control_refused.labels(kind).inc(n - refused_seen.get(kind, 0))
                refused_seen[kind] = n

    # Repartition mode: transactions are only re-keyed by card_id; decisions are taken on
    # the by-card topic, whose partitions hold each card's events and state.
    forward_topic = settings.topics.transactions if w.repartition else None

    store_available = getattr(feature_store, "available", lambda: True)

    def labels_again(batch: Sequence[tuple[Any, Sequence[Any]]], n: int) -> set[Any]:
        """The labels partitions of ``batch``, whose ``n`` labels are to come again."""
        metrics.online_labels.labels("again").inc(n)
        status.labels_again += n
        return {tp for tp, _ in batch if tp.topic == labels_topic}

    sizer = BatchSizer(settings.scoring.budget_ms, w.batch_share, w.batch_min, w.batch_max,
                       backlog_batches=w.backlog_batches, backlog_maximum=w.backlog_batch_max)

    async def handle(batch: Sequence[tuple[Any, Sequence[Any]]], arrived: float
                     ) -> set[Any] | None:
        """Decide a fetched batch (``arrived``: when the fetch returned it) and commit;
        returns the labels partitions to deliver again (the state store did not take
        their labels)."""
        now_ms = int(time.time() * 1000)  # for records without a Kafka timestamp
        records: list[RawRecord] = []
        label_records: list[RawRecord] = []
        forwards: list[RawRecord] = []
        for tp, recs in batch:
            into = (label_records if tp.topic == labels_topic
                    else forwards if tp.topic == forward_topic else records)
            into.extend(
                RawRecord(
                    topic=r.topic,
                    partition=r.partition,
                    offset=r.offset,
                    key=r.key,
                    value=r.value,
                    timestamp_ms=r.timestamp if r.timestamp is not None and r.timestamp >= 0
                    else now_ms,
                )
                for r in recs
            )
        if forwards:
            await committer.commit(pipeline.forward(forwards))
        waiting = None
        if label_records and not store_available():
            # Known down until its next try: the labels wait for it, not even decoded.
            status.labels += len(label_records)
            waiting, label_records = labels_again(batch, len(label_records)), []
        if not records and not label_records:
            return waiting
        if isinstance(feature_store, TableFeatureStore):
            feature_store.refresh()
        rules = follower.take()
        if rules is not None:
            pipeline.scorer = rules
            metrics.set_rules(rules.ruleset.version)
        rates = follower.take_rates()
        if rates is not None:
            pipeline.limits = replace(pipeline.limits, rates=rates)
            watcher.rates_changed(rates)
            metrics.set_rates(rates)
        canary = follower.take_canary()
        if canary is not None:
            models.rollout, models.canary = canary
            metrics.set_canary(canary[0])
        control_counts()
        started = time.perf_counter()
        result = pipeline.process(records, state.lookup, label_records, arrived=arrived)
        t0 = time.perf_counter()
        sizer.observe(len(records) + len(label_records), t0 - started)
        metrics.batch_target.set(sizer.size())
        await committer.commit(result)
        done = time.perf_counter()
        own_s = done - arrived
        status.add(len(records), len(label_records), result, own_s * 1000.0)
        metrics.observe(result, len(records), len(label_records), done - t0, own_s)
        monitor = models.drift
        if result.drift_events:
            metrics.set_drift(monitor.last if monitor is not None else {},
                              result.drift_events)
        lost, committer.lost_feature_writes = committer.lost_feature_writes, 0
        if lost:
            metrics.state_writes_lost.inc(lost)
        online_counts(pipeline.online)
        again = waiting
        if label_records and (result.labels_again or lost):
            # The store did not take them (or lost what they changed): not acknowledged,
            # they come again, and what was taken of them is skipped by offset then.
            again = labels_again(batch, len(label_records))
        for tp, recs in batch:
            try:
                end = app.consumer.highwater(tp)
            except Exception:  # not assigned any more (a rebalance): no reading
                continue
            if end is not None and recs:
                lag = max(0, end - recs[-1].offset - 1)
                metrics.lag.labels(tp.topic, str(tp.partition)).set(lag)
                status.set_lag(tp.topic, tp.partition, lag)
                sizer.set_lag(tp, lag)
        return again

    topics = {settings.topics.transactions, labels_topic}
    if w.repartition:
        topics.add(settings.topics.by_card)
    watchdog = ProgressWatchdog(app, topics, w.stall_s, metrics)
    OutOfRangeLog(watchdog).install()
    renewing_producer.install(sink, settings.kafka.client_config(), w.producer_stuck_s,
                              on_renew=lambda _n: metrics.producer_renewals.inc())
    aligner = None
    if w.align_wait_ms > 0 and not w.repartition:
        avro = settings.codec.input_format == "avro"
        aligner = Aligner(settings.topics.transactions, labels_topic, record_times(
            codecs.transaction.decode if avro else decode_json,
            codecs.label.decode if avro else decode_json, settings.topics.transactions,
            engine.config.label_delay_ms, codecs.transaction.event_time if avro else None),
            max_wait_s=w.align_wait_ms / 1000.0)
        log.warning("event-time alignment: on (waits at most %.0f ms for a partition)",
                    w.align_wait_ms)
    batching.install(app, topics, handle, w.batch_max, progress=watchdog, sizer=sizer,
                     aligner=aligner)
    heartbeat = Heartbeat(loop=lambda: app.loop)
    add_worker_checks(probes, app, heartbeat, watchdog, restoring, replica, watcher,
                      w.liveness_s)

    @app.timer(interval=watchdog.interval_s)
    async def watch_progress() -> None:
        """Stalled input partitions and read positions past the end (streams/worker/progress.py)."""
        status.stalled = len(await watchdog.check())
        for (topic, partition), lag in watchdog.lag.items():
            status.set_lag(topic, partition, lag)

    if isinstance(feature_store, TableFeatureStore):
        table_store = feature_store

        @app.timer(interval=fs.expiry_interval_s)
        async def expire_features() -> None:
            """Delete the records of cards, merchants, devices and IPs idle for 31 days of
            event time: 31 days before the newest event_time this worker decided on their
            partition (:attr:`Pipeline.event_time_hwm`), not the wall clock, so history
            replayed into a worker keeps the state that is current for it. Nothing is
            deleted on a partition before a first transaction of it was decided. (Redis
            expires by TTL from the last write, which never deletes sooner.)"""
            newest = dict(pipeline.event_time_hwm)
            if not newest:
                return
            removed = await table_store.expire_idle(
                newest, log_days=settings.scoring.feature_log_days)
            if removed:
                log.info("features: expired %d idle entity records", removed)

    @app.timer(interval=w.status_interval_s)
    async def log_status() -> None:
        """One status line at the default log level: rates, lag, model share, fallbacks,
        the worker's own batch time."""
        status.report()
        control_counts()  # also while no batch comes

    @app.timer(interval=settings.scoring.reload_interval_s)
    async def reload_models() -> None:
        """Pick up a promotion (or a new shadow) without a restart; loading runs off the
        event loop, and the swap happens between two batches."""
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, watcher.check)

    @app.timer(interval=w.dedupe_expiry_interval_s)
    async def expire_dedupe() -> None:
        """Forget transaction_ids older than the retention in event time: the entries of
        event days before (newest event_time decided on the partition - retention). A
        copy sent later than that is decided afresh. Measured from the partition's
        event-time high-water mark (:attr:`Pipeline.event_time_hwm`), not the wall clock:
        a worker replaying history remembers ids for the retention of *that* history. A
        partition with nothing decided since the worker started expires nothing."""
        newest = dict(pipeline.event_time_hwm)
        if not newest:
            return
        before = {p: int(t / DAY_MS - w.dedupe_retention_days) for p, t in newest.items()}
        removed = await state.expire(before)
        if removed:
            log.info("dedupe: expired %d entries of event days before %s (by partition)",
                     removed, dict(sorted(before.items())))

    @app.agent(source, name="score")
    async def score(stream: Any) -> None:
        """Declares the subscription; the batch consumer hands every record of this topic
        to ``handle`` in whole fetched batches, so nothing reaches this loop."""
        async for _event in stream:  # pragma: no cover - records never arrive here
            log.error("a transactions record bypassed the batch consumer")

    if w.repartition:
        @app.agent(by_card, name="score-by-card")
        async def score_by_card(stream: Any) -> None:
            """Declares the by-card subscription (repartition mode)."""
            async for _event in stream:  # pragma: no cover - records never arrive here
                log.error("a by-card record bypassed the batch consumer")

    @app.agent(labels, name="labels")
    async def learn(stream: Any) -> None:
        """Declares the labels subscription (co-partitioned with transactions: both are
        keyed by card_id); its records reach ``handle`` with the transactions."""
        async for _event in stream:  # pragma: no cover - records never arrive here
            log.error("a labels record bypassed the batch consumer")

    follower.start()
    return Worker(app=app, pipeline=pipeline, committer=committer, state=state, sink=sink,
                  features=feature_store)


def _owned(app: faust.App, settings: Settings) -> list[int]:
    """The decided topic's partitions assigned to this worker (their partial merchant,
    device and IP records are the ones it can read with the RocksDB backend)."""
    topic = settings.topics.by_card if settings.worker.repartition else settings.topics.transactions
    return [tp.partition for tp in app.assignor.assigned_actives() if tp.topic == topic]


def tune_gc(gen0_threshold: int) -> None:
    """Fewer collector pauses in the batch loop. With Python's defaults the worker ran 2-3
    full collections a second, each walking every object the process holds (models,
    libraries, Faust) for up to 150 ms, while a batch waited: the spikes of its own p99
    and most deadline fallbacks. What was built at start-up lives as long as the process,
    so it is frozen out of the collector's walks, and young collections run after
    ``gen0_threshold`` allocations instead of 700 (0 keeps Python's defaults)."""
    import gc

    if gen0_threshold <= 0:
        return
    gc.collect()
    gc.freeze()
    _gen0, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(gen0_threshold, gen1, gen2)


def run_worker(settings: Settings, loglevel: str = "warning") -> None:
    """``fraudstream worker``: run until SIGINT/SIGTERM (Faust handles the signals)."""
    # A fault in native code under a Python thread, or SIGABRT (a hung worker), writes
    # every thread's stack to fd 2 (the log). librdkafka's threads block all signals: a
    # fault there leaves only the kernel's line ("rdk:main[...]: segfault").
    if sys.__stderr__ is not None:  # a process started with its stderr closed has none
        faulthandler.enable(file=sys.__stderr__, all_threads=True)
    worker = build_worker(settings)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    tune_gc(settings.worker.gc_gen0_threshold)
    faust.Worker(worker.app, loglevel=loglevel, quiet=True).execute_from_commandline()
