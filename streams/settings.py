"""One typed, frozen settings object, read from ``FRAUDSTREAM_*`` environment variables.

This is the only module that reads the environment. Every other module receives a
:class:`Settings` (or one of its sections) from :mod:`fraudstream.streams.worker.app` or the CLI.
Each field's environment variable is ``FRAUDSTREAM_<SECTION>_<FIELD>`` in upper case,
e.g. ``FRAUDSTREAM_KAFKA_BOOTSTRAP``; :func:`describe` lists them all (the README table
is generated from it: ``fraudstream settings``).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

PREFIX = "FRAUDSTREAM_"


class SettingsError(ValueError):
    """A setting has a value that cannot be used; the message names the variable."""


@dataclass(frozen=True)
class KafkaSettings:
    """Where the broker is and how to talk to it. Only this changes between the embedded
    broker and an Apache Kafka cluster."""

    bootstrap: str = "127.0.0.1:9092"
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = "PLAIN"
    sasl_username: str = ""
    sasl_password: str = ""
    ssl_cafile: str = ""
    ssl_certfile: str = ""
    ssl_keyfile: str = ""
    session_timeout_ms: int = 10_000
    #: How long a fetch may wait for data. Apache Kafka answers as soon as data arrives;
    #: the embedded broker always waits this long, so it bounds the added latency there.
    fetch_max_wait_ms: int = 10
    partitions: int = 4
    replication_factor: int = 1
    #: True when the broker is the embedded Tansu. It reports a partition's end offset as
    #: the base offset of the last record batch + 1 (Kafka: last offset + 1), which breaks
    #: Faust's table recovery; the worker then works around it (see streams/worker/app.py).
    embedded: bool = False
    #: How long a command waits at start for the broker (and the worker for the schema
    #: registry) before it stops with one line saying which one it could not reach.
    connect_timeout_s: float = 15.0

    def client_config(self) -> dict[str, Any]:
        """librdkafka (confluent-kafka) configuration for this cluster."""
        conf: dict[str, Any] = {
            "bootstrap.servers": self.bootstrap,
            "security.protocol": self.security_protocol,
        }
        if self.security_protocol.startswith("SASL"):
            conf.update(
                {
                    "sasl.mechanism": self.sasl_mechanism,
                    "sasl.username": self.sasl_username,
                    "sasl.password": self.sasl_password,
                }
            )
        if self.security_protocol in ("SSL", "SASL_SSL"):
            for key, value in (
                ("ssl.ca.location", self.ssl_cafile),
                ("ssl.certificate.location", self.ssl_certfile),
                ("ssl.key.location", self.ssl_keyfile),
            ):
                if value:
                    conf[key] = value
        return conf

    def consumer_config(self, group_id: str) -> dict[str, Any]:
        """librdkafka consumer configuration: no auto-commit, our fetch wait, and a
        partition whose local queue was full fetched again 10 ms after, not librdkafka's
        1 s: a reader that takes its queue in under a second (a recovery, the entity
        replica, a replay) otherwise sat idle the rest of it. A reader doing 8 us of work
        per record went from 47k to 110k records/s."""
        return {
            **self.client_config(),
            "group.id": group_id,
            "enable.auto.commit": False,
            "fetch.wait.max.ms": self.fetch_max_wait_ms,
            "fetch.queue.backoff.ms": 10,
        }


@dataclass(frozen=True)
class TopicSettings:
    """Topic names (the defaults are the documented ones)."""

    transactions: str = "transactions"
    labels: str = "labels"
    decisions: str = "decisions"
    decisions_shadow: str = "decisions.shadow"
    #: The stand-ins `fraudstream api` answered with (no streamed decision in time): what
    #: the caller acted on, next to the streamed decision on `decisions`.
    decisions_standins: str = "decisions.standins"
    drift: str = "drift"
    dlq: str = "transactions.dlq"
    #: Feature vectors per transaction_id, when FRAUDSTREAM_FEATURES_LOG is true.
    features: str = "features"
    #: Transactions re-keyed by card_id, when FRAUDSTREAM_WORKER_REPARTITION is true.
    by_card: str = "transactions.by-card"
    #: The control plane: rules and blocklists in force, with their audit trail (one
    #: partition, compacted).
    control: str = "fraudstream.control"
    #: Model versions' files in chunks, for workers without a shared models folder (one
    #: partition, compacted).
    artifacts: str = "fraudstream.artifacts"
    #: What `fraudstream autopilot` did and why: triggers, trainings, comparisons,
    #: rollouts (JSON, one partition).
    autopilot: str = "fraudstream.autopilot"

    def all(self) -> list[str]:
        return [getattr(self, f.name) for f in fields(self)]

    @classmethod
    def suffixed(cls, suffix: str) -> TopicSettings:
        """The default names with ``-<suffix>``: topics of their own on a shared broker
        (a benchmark run, a test)."""
        return cls(**{f.name: f"{f.default}-{suffix}" for f in fields(cls)})


@dataclass(frozen=True)
class CodecSettings:
    """How bytes on the topics are read and written."""

    input_format: Literal["avro", "json"] = "avro"
    registry_url: str = "http://127.0.0.1:8081"
    registry_username: str = ""
    registry_password: str = ""
    max_record_bytes: int = 64 * 1024
    #: A dead letter keeps at most this much of the refused record's value (masked); it
    #: records the original size and sha256. Keep it well under the producer's
    #: message.max.bytes (1,000,000): a dead letter the broker refuses is sent again
    #: without the value.
    dead_letter_max_bytes: int = 64 * 1024


@dataclass(frozen=True)
class WorkerSettings:
    """The Faust worker: identity, batching, state, delivery."""

    app_id: str = "fraudstream"
    data_dir: Path = Path("data")
    store: Literal["rocksdb", "memory"] = "rocksdb"
    #: Most records in one micro-batch. The worker sizes batches below it so that one is
    #: decided within ``batch_share`` of the scoring budget (streams/worker/sizing.py).
    batch_max: int = 500
    #: Fewest records a batch is sized down to (a larger fetch is never split finer).
    batch_min: int = 32
    #: Share of the scoring budget one batch may take from its arrival to its decisions.
    batch_share: float = 0.5
    #: Batches take batch_max records while the input holds more than this many
    #: budget-sized batches (a backlog); below it they keep to their size.
    backlog_batches: float = 1.0
    #: Batches take this many records while more than this many wait (a long backlog).
    #: Those records are late already; a batch pays a fixed wait for the broker's
    #: acknowledgements, which larger batches share.
    backlog_batch_max: int = 2000
    #: Event-time alignment: hand the partitions of transactions (and labels) on merged in
    #: event time, waiting at most this long for a partition that may hold earlier
    #: records (0: off, records go on as fetched).
    align_wait_ms: float = 2000.0
    max_future_ms: int = 5 * 60 * 1000
    #: Larger amounts (in the rates table's reference currency) go to the DLQ as absurd.
    max_amount: float = 1_000_000.0
    #: Exchange rates into the reference currency (EUR): every amount the features, rules
    #: and models use is converted with it while no table is published on the control
    #: topic (``fraudstream rates publish``); a currency the table in force lacks goes to
    #: the DLQ.
    rates_path: Path = Path(__file__).resolve().parent.parent / "schemas" / "rates.toml"
    commit_interval_s: float = 1.0
    dedupe_retention_days: float = 7.0
    dedupe_expiry_interval_s: float = 600.0
    #: The transactions topic is not keyed by card_id: re-key it through the by_card
    #: topic first, so that a card's events (and its state) stay in one partition.
    repartition: bool = False
    #: Young collections of the garbage collector after this many allocations (Python:
    #: 700); start-up objects are frozen out of its walks. 0 keeps Python's defaults.
    gc_gen0_threshold: int = 50_000
    #: How often the worker logs its one-line status (rates, lag, model share, latency).
    status_interval_s: float = 10.0
    #: Port of the worker's Prometheus /metrics (0: none). One per worker process.
    metrics_port: int = 9464
    #: Address /metrics listens on: all interfaces by default, so that a Prometheus on
    #: another host can scrape it; 127.0.0.1 keeps it on the machine.
    metrics_address: str = "0.0.0.0"
    #: The metrics port is taken by another process: stop the worker (fail), or run
    #: without /metrics and log a warning (warn).
    metrics_port_busy: Literal["fail", "warn"] = "fail"
    #: The worker's static group membership id (Kafka's group.instance.id): a worker
    #: started again under the same id gets its partitions back at once instead of
    #: after the dead one's session. Empty: derived from the app id, the host name and
    #: the data dir (stable across restarts, one per worker); "none": dynamic membership.
    instance_id: str = ""
    #: RocksDB memory per table partition: block cache, and write buffer (two of them).
    rocksdb_block_cache_mb: int = 32
    rocksdb_write_buffer_mb: int = 16
    #: RocksDB's write-ahead log for the state table. Off: the changelog topic is what
    #: the table is recovered from; a crash replays it from the last flushed offset.
    rocksdb_wal: bool = False
    #: An input partition with records waiting and nothing handled for this long is
    #: stalled: an error line, fraudstream_stalled_partitions, an alert.
    stall_s: float = 60.0
    #: A producer with records queued and no acknowledgement for this long is replaced
    #: and the records sent again (0: never; the batch then fails after 60 s).
    producer_stuck_s: float = 10.0
    #: /healthz fails when the event loop has not ticked, or one batch has been in hand,
    #: for this long (or an input partition is stalled, STALL_S).
    liveness_s: float = 30.0


@dataclass(frozen=True)
class FeatureSettings:
    """Velocity features: where their state lives, event-time rules, the feature log."""

    #: rocksdb: the worker's Faust table (FRAUDSTREAM_WORKER_STORE: RocksDB, or memory in
    #: tests), with its changelog; redis: a redis-server shared by every worker.
    backend: Literal["rocksdb", "redis"] = "rocksdb"
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_prefix: str = "fraudstream"
    #: Per-command timeout; past it the batch goes on with features flagged degraded.
    redis_timeout_ms: int = 200
    #: After a failure, how long to decide without Redis before trying it again.
    redis_retry_s: float = 1.0
    #: An event older than its card's latest event by more than this is still decided
    #: and counted, but flagged event_too_late.
    allowed_lateness_s: float = 3600.0
    #: A label counts in merchant fraud features from label_time + this delay on.
    label_delay_s: float = 0.0
    #: Publish every decided transaction's feature vector to the features topic.
    log: bool = False
    #: How often idle entities (no event for 31 days) are deleted.
    expiry_interval_s: float = 600.0
    #: RocksDB backend: feature records kept in memory between batches (and the keys known
    #: to have none), up to about this many MB; emptied at every rebalance. 0: off.
    cache_mb: float = 32.0
    #: RocksDB backend: every worker keeps a local replica of the merchant, device and IP
    #: partials of every partition, tailed from the state changelog, so those features
    #: count every partition's events whichever worker decides (false: only the
    #: partitions this worker holds).
    replica: bool = True
    #: RocksDB backend: read a device's or an IP's partials only from the partitions
    #: that may hold one (an index of up to 32 MB, built from the store at each assignment
    #: and by the replica); false reads every partition's. Used with 3 to 64 partitions.
    presence: bool = True
    #: RocksDB block cache of that replica (its records live on disk).
    replica_cache_mb: int = 64
    #: At a rebalance, how long a worker waits for its replica to read the changelog to
    #: its end before it recovers its partitions and decides (past it: it decides, with
    #: a warning; /readyz fails until the replica caught up).
    replica_wait_s: float = 300.0
    #: Which build of the feature kernel runs: auto (the ahead-of-time build, compiled in a
    #: child process at start when missing; the JIT when that fails), aot (that build or
    #: stop), jit (numba in the worker: ~130 MB more RSS, no C compiler needed).
    kernel: Literal["auto", "aot", "jit"] = "auto"


@dataclass(frozen=True)
class ScoringSettings:
    """The scoring cascade: rules, then the registry's active model within a budget."""

    rules_path: Path = Path(__file__).resolve().parent.parent / "scorers" / "rules" / "default.toml"
    #: The model registry (fraudstream train writes there; ACTIVE / SHADOW pointers).
    models_dir: Path = Path("models")
    #: Time from a batch's arrival at the worker to its decisions. Batches are sized to
    #: meet it; a decision made later still comes from the model and carries late_ms.
    budget_ms: float = 50.0
    #: The least time a model call on a batch of up to the worker's batch_max records
    #: gets, even past the budget; a larger batch (a backlog's) gets as much per record.
    #: A model slower than both is abandoned and the rules decide (fallback timeout).
    model_timeout_ms: float = 25.0
    #: How often the worker checks the registry's pointers (a promotion needs no restart).
    reload_interval_s: float = 2.0
    #: River online learners taught by labels, blended with the model as labels accrue.
    online: bool = True
    #: The most an online learner's blend weight can be; each earns a share of it on
    #: evidence (its blend against the ensemble on the labels), 0 when it does not help.
    online_max_weight: float = 0.3
    #: How long decided transactions' features are kept for their labels (feature log).
    feature_log_days: float = 30.0
    #: Drift against the active model's reference: tumbling windows of this many events.
    drift_window: int = 5000
    drift_psi_threshold: float = 0.2
    drift_js_threshold: float = 0.1


@dataclass(frozen=True)
class CanarySettings:
    """Canary rollouts: the defaults of `fraudstream model canary` and the controller."""

    #: Percent of cards per step, each optionally PERCENT:SECONDS; the last is 100.
    steps: str = "5,25,50,100"
    step_duration_s: float = 600.0
    #: Each gate's limit (scorers/canary.py); `model canary --gate NAME=VALUE` overrides.
    min_decisions: int = 500
    max_fallback_delta: float = 0.01
    max_latency_ratio: float = 1.5
    latency_slack_ms: float = 5.0
    min_batches: int = 100
    max_rate_delta: float = 0.02
    rate_z: float = 3.0
    max_psi: float = 0.25
    min_labelled: int = 50
    max_precision_drop: float = 0.05
    #: Where `fraudstream controller` serves its /metrics (0: a free port).
    controller_metrics_port: int = 9465
    #: One controller acts among its replicas (a lease through a Kafka group): a standby
    #: takes over this long after the holder died (once the group rebalanced when it
    #: stopped cleanly).
    controller_lease_session_s: float = 10.0


@dataclass(frozen=True)
class AutopilotSettings:
    """Closed-loop retraining: when `fraudstream autopilot` retrains, and what a challenger
    must show to replace the champion (scorers/retraining.py)."""

    #: Retrain this often whatever else happens (0: no schedule).
    interval_s: float = 7 * 86_400.0
    #: Drift events of the champion at this severity or above (info, warning, critical;
    #: empty: drift never triggers) ...
    drift_severity: str = "critical"
    #: ... this many since the last training.
    drift_events: int = 3
    #: The online learners' error rose (ADWIN warnings on online_error) this many times
    #: since the last training (0: off).
    error_rises: int = 3
    #: This many new labels since the last training (0: off).
    new_labels: int = 50_000
    #: Guards: labels and fraud labels in the training window, else no training (or a
    #: challenger rejected); pauses after a rollout ended and after a failed training.
    min_labels: int = 1_000
    min_frauds: int = 100
    cooldown_s: float = 86_400.0
    failure_backoff_s: float = 3_600.0
    #: Training window: this many seconds of `transactions` (Kafka time) ...
    window_s: float = 30 * 86_400.0
    #: ... ending this long ago: labels take time (chargebacks), and the held-out window
    #: at its end is only worth comparing on once they have come.
    label_wait_s: float = 3 * 86_400.0
    #: Shares of the window for validation and for the held-out test (the comparison).
    valid_frac: float = 0.2
    test_frac: float = 0.2
    trees: int = 300
    #: Share of the training window's unlabelled transactions kept, each weighing 1/share
    #: (every labelled one is kept; validation and test keep all): a long window in less
    #: memory. 1 keeps every one.
    genuine_sample: float = 1.0
    #: Promotion: the challenger's average precision and card precision@100/day on the
    #: replayed test window at least this much above the champion's ...
    margin_ap: float = 0.01
    margin_card_precision: float = 0.0
    #: ... and its share of labelled-genuine transactions declined at most this much above.
    max_false_decline_increase: float = 0.001
    #: Shadow stage: this long, at least this many shadow decisions, before the canary.
    shadow_s: float = 600.0
    min_shadow_decisions: int = 500
    #: Canary steps of the rollout the autopilot starts (empty: the canary section's).
    canary_steps: str = ""
    #: Seconds between two looks at the topics.
    poll_s: float = 5.0
    #: Where `fraudstream autopilot` keeps its challengers (a model registry folder).
    models_dir: Path = Path("autopilot-models")
    #: Where it serves its /metrics (0: a free port).
    metrics_port: int = 9466
    #: One autopilot acts among replicas (a lease through a Kafka group): a standby takes
    #: over this long after the holder died, and resumes from its events.
    lease_session_s: float = 10.0


@dataclass(frozen=True)
class ApiSettings:
    """`fraudstream api`: the synchronous scoring endpoint (POST /v1/decisions)."""

    host: str = "127.0.0.1"
    port: int = 8080
    #: Bearer tokens callers present, comma-separated; or one per line in TOKENS_FILE
    #: (both may be set). With neither, the API refuses to start unless ANONYMOUS is true.
    tokens: str = ""
    tokens_file: str = ""
    anonymous: bool = False
    #: How long a caller waits for the streamed decision when its request names no
    #: deadline (header X-Fraudstream-Timeout-Ms), and the most a request may name.
    timeout_ms: float = 250.0
    max_timeout_ms: float = 10_000.0
    #: Requests in flight at once; past it, 429 with Retry-After (never an unbounded queue).
    max_pending: int = 2_000
    retry_after_s: int = 1
    #: Answers remembered for retries (by transaction_id); older retries are answered
    #: from the workers' dedupe state through the stream.
    remember: int = 100_000
    #: How far back a starting instance reads ``decisions.standins``: a retry sent here
    #: of a transaction another instance answered with a stand-in in that time gets that
    #: stand-in (each instance reads every stand-in as it is published, too).
    standins_lookback_s: float = 900.0
    #: How long the decisions reader's fetch may wait at the broker (the embedded broker
    #: always waits this long: it bounds the API's added latency there).
    fetch_max_wait_ms: int = 2
    #: TLS for a direct deployment (both set: HTTPS only).
    tls_certfile: str = ""
    tls_keyfile: str = ""
    #: Where /metrics, /healthz and /readyz are served besides the API port (0: a free port).
    metrics_port: int = 9467


@dataclass(frozen=True)
class Settings:
    kafka: KafkaSettings = field(default_factory=KafkaSettings)
    topics: TopicSettings = field(default_factory=TopicSettings)
    codec: CodecSettings = field(default_factory=CodecSettings)
    worker: WorkerSettings = field(default_factory=WorkerSettings)
    features: FeatureSettings = field(default_factory=FeatureSettings)
    scoring: ScoringSettings = field(default_factory=ScoringSettings)
    canary: CanarySettings = field(default_factory=CanarySettings)
    autopilot: AutopilotSettings = field(default_factory=AutopilotSettings)
    api: ApiSettings = field(default_factory=ApiSettings)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Build settings from ``env`` (default: the process environment).

        Unknown ``FRAUDSTREAM_*`` variables are an error, so a typo never goes unnoticed.
        """
        env = os.environ if env is None else env
        known: set[str] = set()
        sections: dict[str, Any] = {}
        for section in fields(cls):
            section_cls = section.default_factory  # type: ignore[misc]
            hints = get_type_hints(section_cls)
            values: dict[str, Any] = {}
            for f in fields(section_cls):
                name = f"{PREFIX}{section.name}_{f.name}".upper()
                known.add(name)
                if name in env:
                    values[f.name] = _coerce(name, env[name], hints[f.name])
                    _check_range(name, env[name], values[f.name])
            sections[section.name] = section_cls(**values)
        unknown = sorted(k for k in env if k.startswith(PREFIX) and k not in known)
        if unknown:
            raise SettingsError(f"unknown setting(s): {', '.join(unknown)}")
        return cls(**sections)

    def replace(self, **sections: Mapping[str, Any]) -> Settings:
        """A copy with some fields of some sections changed: ``s.replace(kafka={...})``."""
        changed = {
            name: dataclasses.replace(getattr(self, name), **values)
            for name, values in sections.items()
        }
        return dataclasses.replace(self, **changed)

    def to_env(self) -> dict[str, str]:
        """The environment variables that reproduce these settings in a child process."""
        out: dict[str, str] = {}
        for section in fields(self):
            obj = getattr(self, section.name)
            for f in fields(obj):
                out[f"{PREFIX}{section.name}_{f.name}".upper()] = str(getattr(obj, f.name))
        return out


def _coerce(name: str, raw: str, hint: Any) -> Any:
    if get_origin(hint) is Literal:
        allowed = get_args(hint)
        if raw not in allowed:
            raise SettingsError(f"{name}={raw!r}: expected one of {', '.join(allowed)}")
        return raw
    try:
        if hint is bool:
            if raw.lower() not in ("1", "0", "true", "false", "yes", "no"):
                raise ValueError(raw)
            return raw.lower() in ("1", "true", "yes")
        if hint in (int, float):
            return hint(raw)
        if hint is Path:
            return Path(raw)
        return raw
    except ValueError as exc:
        raise SettingsError(f"{name}={raw!r}: expected {getattr(hint, '__name__', hint)}") from exc


@dataclass(frozen=True)
class Range:
    """The values a numeric setting may take: ``low`` (excluded if ``low_open``) up to
    ``high``, both optional; never NaN or infinite."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False

    def __contains__(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or value <= self.high

    def __str__(self) -> str:
        low = "" if self.low is None else f"{self.low:g}"
        if self.high is not None:
            return f"{low} to {self.high:g}" + (f" ({low} excluded)" if self.low_open else "")
        return f"> {low}" if self.low_open else f">= {low}"


POSITIVE = Range(0, low_open=True)
AT_LEAST_ONE = Range(1)
NOT_NEGATIVE = Range(0)

#: The allowed range of every numeric setting (tests/test_settings.py checks that each int
#: and float setting has one). A value outside it is refused at start, by name.
RANGES: dict[str, Range] = {
    "FRAUDSTREAM_KAFKA_SESSION_TIMEOUT_MS": AT_LEAST_ONE,
    "FRAUDSTREAM_KAFKA_FETCH_MAX_WAIT_MS": Range(0, 300_000),  # librdkafka's own range
    "FRAUDSTREAM_KAFKA_PARTITIONS": AT_LEAST_ONE,
    "FRAUDSTREAM_KAFKA_REPLICATION_FACTOR": Range(1, 32_767),
    "FRAUDSTREAM_KAFKA_CONNECT_TIMEOUT_S": POSITIVE,
    "FRAUDSTREAM_CODEC_MAX_RECORD_BYTES": AT_LEAST_ONE,
    # a dead letter must fit under the producer's default message.max.bytes (1,000,000)
    "FRAUDSTREAM_CODEC_DEAD_LETTER_MAX_BYTES": Range(0, 900_000),
    "FRAUDSTREAM_WORKER_BATCH_MAX": AT_LEAST_ONE,
    "FRAUDSTREAM_WORKER_BATCH_MIN": AT_LEAST_ONE,
    "FRAUDSTREAM_WORKER_BATCH_SHARE": Range(0, 1, low_open=True),
    "FRAUDSTREAM_WORKER_BACKLOG_BATCHES": NOT_NEGATIVE,
    "FRAUDSTREAM_WORKER_BACKLOG_BATCH_MAX": AT_LEAST_ONE,
    "FRAUDSTREAM_WORKER_ALIGN_WAIT_MS": NOT_NEGATIVE,
    "FRAUDSTREAM_WORKER_MAX_FUTURE_MS": NOT_NEGATIVE,
    "FRAUDSTREAM_WORKER_MAX_AMOUNT": POSITIVE,
    "FRAUDSTREAM_WORKER_COMMIT_INTERVAL_S": POSITIVE,
    "FRAUDSTREAM_WORKER_DEDUPE_RETENTION_DAYS": POSITIVE,
    "FRAUDSTREAM_WORKER_DEDUPE_EXPIRY_INTERVAL_S": POSITIVE,
    "FRAUDSTREAM_WORKER_GC_GEN0_THRESHOLD": NOT_NEGATIVE,
    "FRAUDSTREAM_WORKER_STATUS_INTERVAL_S": POSITIVE,
    "FRAUDSTREAM_WORKER_STALL_S": POSITIVE,
    "FRAUDSTREAM_WORKER_PRODUCER_STUCK_S": POSITIVE,
    "FRAUDSTREAM_WORKER_METRICS_PORT": Range(0, 65_535),
    "FRAUDSTREAM_WORKER_ROCKSDB_BLOCK_CACHE_MB": AT_LEAST_ONE,
    "FRAUDSTREAM_WORKER_ROCKSDB_WRITE_BUFFER_MB": AT_LEAST_ONE,
    "FRAUDSTREAM_FEATURES_REDIS_TIMEOUT_MS": AT_LEAST_ONE,
    "FRAUDSTREAM_FEATURES_REDIS_RETRY_S": NOT_NEGATIVE,
    "FRAUDSTREAM_FEATURES_ALLOWED_LATENESS_S": NOT_NEGATIVE,
    "FRAUDSTREAM_FEATURES_LABEL_DELAY_S": NOT_NEGATIVE,
    "FRAUDSTREAM_FEATURES_EXPIRY_INTERVAL_S": POSITIVE,
    "FRAUDSTREAM_FEATURES_CACHE_MB": NOT_NEGATIVE,
    "FRAUDSTREAM_FEATURES_REPLICA_CACHE_MB": AT_LEAST_ONE,
    "FRAUDSTREAM_FEATURES_REPLICA_WAIT_S": NOT_NEGATIVE,
    "FRAUDSTREAM_WORKER_LIVENESS_S": POSITIVE,
    "FRAUDSTREAM_SCORING_BUDGET_MS": POSITIVE,
    "FRAUDSTREAM_SCORING_MODEL_TIMEOUT_MS": NOT_NEGATIVE,
    "FRAUDSTREAM_SCORING_RELOAD_INTERVAL_S": POSITIVE,
    "FRAUDSTREAM_SCORING_ONLINE_MAX_WEIGHT": Range(0, 1),
    "FRAUDSTREAM_SCORING_FEATURE_LOG_DAYS": POSITIVE,
    "FRAUDSTREAM_SCORING_DRIFT_WINDOW": AT_LEAST_ONE,
    "FRAUDSTREAM_SCORING_DRIFT_PSI_THRESHOLD": POSITIVE,
    "FRAUDSTREAM_SCORING_DRIFT_JS_THRESHOLD": Range(0, 1, low_open=True),
    "FRAUDSTREAM_CANARY_STEP_DURATION_S": NOT_NEGATIVE,
    "FRAUDSTREAM_CANARY_MIN_DECISIONS": AT_LEAST_ONE,
    "FRAUDSTREAM_CANARY_MAX_FALLBACK_DELTA": Range(0, 1),
    "FRAUDSTREAM_CANARY_MAX_LATENCY_RATIO": Range(1),
    "FRAUDSTREAM_CANARY_LATENCY_SLACK_MS": NOT_NEGATIVE,
    "FRAUDSTREAM_CANARY_MIN_BATCHES": AT_LEAST_ONE,
    "FRAUDSTREAM_CANARY_MAX_RATE_DELTA": Range(0, 1),
    "FRAUDSTREAM_CANARY_RATE_Z": NOT_NEGATIVE,
    "FRAUDSTREAM_CANARY_MAX_PSI": POSITIVE,
    "FRAUDSTREAM_CANARY_MIN_LABELLED": AT_LEAST_ONE,
    "FRAUDSTREAM_CANARY_MAX_PRECISION_DROP": Range(0, 1),
    "FRAUDSTREAM_AUTOPILOT_INTERVAL_S": NOT_NEGATIVE,
    "FRAUDSTREAM_AUTOPILOT_DRIFT_EVENTS": NOT_NEGATIVE,
    "FRAUDSTREAM_AUTOPILOT_ERROR_RISES": NOT_NEGATIVE,
    "FRAUDSTREAM_AUTOPILOT_NEW_LABELS": NOT_NEGATIVE,
    "FRAUDSTREAM_AUTOPILOT_MIN_LABELS": NOT_NEGATIVE,
    "FRAUDSTREAM_AUTOPILOT_MIN_FRAUDS": NOT_NEGATIVE,
    "FRAUDSTREAM_AUTOPILOT_COOLDOWN_S": NOT_NEGATIVE,
    "FRAUDSTREAM_AUTOPILOT_FAILURE_BACKOFF_S": NOT_NEGATIVE,
    "FRAUDSTREAM_AUTOPILOT_WINDOW_S": POSITIVE,
    "FRAUDSTREAM_AUTOPILOT_LABEL_WAIT_S": NOT_NEGATIVE,
    "FRAUDSTREAM_AUTOPILOT_VALID_FRAC": Range(0, 1, low_open=True),
    "FRAUDSTREAM_AUTOPILOT_TEST_FRAC": Range(0, 1, low_open=True),
    "FRAUDSTREAM_AUTOPILOT_TREES": AT_LEAST_ONE,
    "FRAUDSTREAM_AUTOPILOT_GENUINE_SAMPLE": Range(0, 1, low_open=True),
    "FRAUDSTREAM_AUTOPILOT_MARGIN_AP": Range(-1, 1),
    "FRAUDSTREAM_AUTOPILOT_MARGIN_CARD_PRECISION": Range(-1, 1),
    "FRAUDSTREAM_AUTOPILOT_MAX_FALSE_DECLINE_INCREASE": Range(0, 1),
    "FRAUDSTREAM_AUTOPILOT_SHADOW_S": NOT_NEGATIVE,
    "FRAUDSTREAM_AUTOPILOT_MIN_SHADOW_DECISIONS": NOT_NEGATIVE,
    "FRAUDSTREAM_AUTOPILOT_POLL_S": POSITIVE,
    "FRAUDSTREAM_AUTOPILOT_METRICS_PORT": Range(0, 65535),
    "FRAUDSTREAM_AUTOPILOT_LEASE_SESSION_S": Range(6, 300),  # the broker's bounds
    "FRAUDSTREAM_CANARY_CONTROLLER_METRICS_PORT": Range(0, 65_535),
    "FRAUDSTREAM_CANARY_CONTROLLER_LEASE_SESSION_S": Range(6, 300),  # the broker's bounds
    "FRAUDSTREAM_API_PORT": Range(0, 65_535),
    "FRAUDSTREAM_API_TIMEOUT_MS": POSITIVE,
    "FRAUDSTREAM_API_MAX_TIMEOUT_MS": POSITIVE,
    "FRAUDSTREAM_API_MAX_PENDING": AT_LEAST_ONE,
    "FRAUDSTREAM_API_RETRY_AFTER_S": AT_LEAST_ONE,
    "FRAUDSTREAM_API_REMEMBER": NOT_NEGATIVE,
    "FRAUDSTREAM_API_STANDINS_LOOKBACK_S": Range(0, 7 * 86_400),
    "FRAUDSTREAM_API_FETCH_MAX_WAIT_MS": Range(0, 300_000),
    "FRAUDSTREAM_API_METRICS_PORT": Range(0, 65_535),
}


def _check_range(name: str, raw: str, value: Any) -> None:
    allowed = RANGES.get(name)
    if allowed is not None and value not in allowed:
        what = "out of range" if math.isfinite(value) else "not a finite number"
        raise SettingsError(f"{name}={raw}: {what}, allowed {allowed}")


def describe() -> list[tuple[str, str, str]]:
    """(variable, default, section doc) for every setting, in declaration order."""
    rows = []
    defaults = Settings()
    for section in fields(Settings):
        obj = getattr(defaults, section.name)
        doc = (type(obj).__doc__ or "").split("\n")[0]
        for f in fields(obj):
            name = f"{PREFIX}{section.name}_{f.name}".upper()
            default = getattr(obj, f.name)
            if isinstance(default, Path) and default.is_absolute():
                default = default.relative_to(Path(__file__).resolve().parent.parent)
            rows.append((name, str(default), doc))
    return rows
