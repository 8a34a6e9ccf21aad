"""Prometheus metrics of a worker, served on ``FRAUDSTREAM_WORKER_METRICS_PORT``.

Everything is updated once per micro-batch from its
:class:`fraudstream.streams.pipeline.BatchResult`
(never per event on the hot path), and no label ever holds a card, merchant, device or
transaction identifier: labels are bounded sets (outcome, stage, cause, error kind, field,
topic and partition, model version).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

#: Dense around the 50 ms budget.
LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.075, 0.1, 0.125, 0.15, 0.2,
                   0.25, 0.3, 0.4, 0.5, 1.0, 2.5, 5.0, 10.0)
STAGE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25,
                 0.5, 1.0)
#: The worker's own time per batch: fine below the 50 ms budget.
OWN_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1,
               0.25, 0.5, 1.0, 2.5)
BATCH_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 300, 500, 1000)


class WorkerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry or CollectorRegistry()
        self.transactions = Counter(
            "fraudstream_transactions", "Transaction records read from the input topic.",
            registry=r)
        self.labels = Counter("fraudstream_labels", "Label records read.", registry=r)
        self.decisions = Counter(
            "fraudstream_decisions", "Decisions published, by outcome and deciding stage.",
            ["outcome", "stage"], registry=r)
        self.duplicates = Counter(
            "fraudstream_duplicate_transactions",
            "Transactions seen again, answered with their first decision.", registry=r)
        self.dead_letters = Counter(
            "fraudstream_dead_letters", "Records sent to the dead-letter topic, by reason.",
            ["kind", "field"], registry=r)
        self.dead_letters_lost = Counter(
            "fraudstream_dead_letters_lost",
            "Dead letters the broker refused even without the original value: logged as "
            "errors (source topic, partition, offset) and skipped, by the refusal's error.",
            ["error"], registry=r)
        self.fallbacks = Counter(
            "fraudstream_fallbacks", "Events the rules decided in place of the model, by cause.",
            ["cause"], registry=r)
        self.past_budget = Counter(
            "fraudstream_decisions_past_budget",
            "Decisions made after the scoring budget ran out (counted from the batch's "
            "arrival at the worker): a backlog, decided by the model all the same.",
            registry=r)
        self.batch_target = Gauge(
            "fraudstream_batch_target",
            "Records the worker asks of the next fetch: sized so that a batch is decided "
            "within its share of the budget.", registry=r)
        self.latency = Histogram(
            "fraudstream_decision_latency_seconds",
            "From the transaction record's Kafka timestamp to its decision.",
            buckets=LATENCY_BUCKETS, registry=r)
        self.stage = Histogram(
            "fraudstream_stage_seconds", "Time of each stage, per micro-batch.", ["stage"],
            buckets=STAGE_BUCKETS, registry=r)
        self.batch_seconds = Histogram(
            "fraudstream_batch_seconds",
            "The worker's own time per micro-batch: from the fetched batch reaching the worker "
            "to its decisions acknowledged by the broker.",
            buckets=OWN_BUCKETS, registry=r)
        self.batch_size = Histogram(
            "fraudstream_batch_size", "Transactions per micro-batch.", buckets=BATCH_BUCKETS,
            registry=r)
        self.lag = Gauge(
            "fraudstream_consumer_lag", "Records behind the end of each input partition.",
            ["topic", "partition"], registry=r)
        self.model = Gauge(
            "fraudstream_model_info", "The model versions in use (value 1).",
            ["role", "version"], registry=r)
        self.model_refused = Gauge(
            "fraudstream_model_refused",
            "Model versions a registry pointer names that this worker refused (value 1, the "
            "reason in its log); the model serving before, if any, keeps serving.",
            ["role", "version"], registry=r)
        self.model_trained_otherwise = Gauge(
            "fraudstream_model_trained_otherwise",
            "Model versions serving here that were trained on features computed with other "
            "settings, or on amounts converted with a rates table that moved materially "
            "since (value 1, what differs in the log).", ["role", "version"], registry=r)
        self.rules = Gauge(
            "fraudstream_rules_info", "The rules version in force (value 1): the latest "
            "published on the control topic, else the rules file's.", ["version"], registry=r)
        self.rates = Gauge(
            "fraudstream_rates_info", "The exchange-rates table in force (value 1): the "
            "latest published on the control topic, else the rates file's.",
            ["version", "reference"], registry=r)
        self.control_refused = Counter(
            "fraudstream_control_refused", "Control records this worker refused (the reason "
            "in its log); what was in force stays.", ["kind"], registry=r)
        self.variant_decisions = Counter(
            "fraudstream_variant_decisions", "During a canary rollout: decisions by variant "
            "(champion, canary), outcome and whether they fell back.",
            ["variant", "outcome", "fallback"], registry=r)
        self.canary_share = Gauge(
            "fraudstream_canary_share", "Share of cards the canary version serves on this "
            "worker (0: no rollout).", registry=r)
        self.canary = Gauge(
            "fraudstream_canary_info", "The rollout this worker serves (value 1).",
            ["version", "champion", "status"], registry=r)
        self.feature_flags = Counter(
            "fraudstream_feature_events", "Transactions whose features were flagged.",
            ["flag"], registry=r)
        self.state_writes_lost = Counter(
            "fraudstream_state_writes_lost", "Feature records the store could not take.",
            registry=r)
        self.online_labels = Counter(
            "fraudstream_online_labels",
            "Labels by result: learned; unjoined (no features logged for the transaction); "
            "again (the state store could not take them: delivered again).",
            ["result"], registry=r)
        self.drift = Gauge(
            "fraudstream_drift", "Drift statistic of the last closed window, per feature.",
            ["feature", "statistic"], registry=r)
        self.drift_events = Counter(
            "fraudstream_drift_events", "Drift events published, by statistic and severity.",
            ["statistic", "severity"], registry=r)
        self.online_quality = Gauge(
            "fraudstream_online_quality", "Prequential quality of the online learner.",
            ["partition", "metric"], registry=r)
        # Progress (streams/worker/progress.py): updated by the watchdog's timer, not per batch.
        self.stalled_partitions = Gauge(
            "fraudstream_stalled_partitions",
            "Input partitions with records waiting and nothing handled for "
            "FRAUDSTREAM_WORKER_STALL_S.", registry=r)
        self.stall_seconds = Gauge(
            "fraudstream_stall_seconds",
            "How long the longest-stalled input partition has handled nothing (0: none).",
            registry=r)
        self.offset_resets = Counter(
            "fraudstream_offset_resets",
            "Read positions reset by auto.offset.reset: out_of_range (the broker said so), "
            "beyond_end (past the partition's end).", ["topic", "partition", "reason"],
            registry=r)
        # The entity replica (streams/worker/replica.py): other workers' partials.
        self.replica_delay = Histogram(
            "fraudstream_entity_replica_delay_seconds",
            "How long a merchant, device or IP partial written by a worker took to reach "
            "this worker's replica: from its append to the state changelog to applied "
            "(the oldest record of each batch applied).",
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
            registry=r)
        self.replica_ready = Gauge(
            "fraudstream_entity_replica_ready",
            "1 once the entity replica has read every changelog partition to its end at "
            "start; 0 before.", registry=r)
        self.producer_renewals = Counter(
            "fraudstream_producer_renewals",
            "Producers replaced after getting no acknowledgement for "
            "FRAUDSTREAM_WORKER_PRODUCER_STUCK_S.", registry=r)

    def serve(self, port: int, address: str = "0.0.0.0", probes: Any = None) -> int:
        """Serve /metrics, /healthz and /readyz (``probes``) on ``address``:``port`` (0: a
        free port); returns the port. Raises OSError when the port is taken or the address
        is not this host's."""
        from fraudstream.streams.health import serve

        return serve(self.registry, port, address, probes)

    def observe(self, result: Any, size: int, labels: int, commit_s: float,
                own_s: float | None = None) -> None:
        """One micro-batch's worth of updates; ``own_s``: the worker's own time for it
        (fetched batch in hand to decisions acknowledged)."""
        now_ms = time.time() * 1000.0
        if size:
            self.transactions.inc(size)
            self.batch_size.observe(size)
            if own_s is not None:
                self.batch_seconds.observe(own_s)
        if labels:
            self.labels.inc(labels)
        self.duplicates.inc(result.duplicates)
        if result.past_budget:
            self.past_budget.inc(result.past_budget)
        for reason, n in result.dlq_reasons.items():
            kind, _, field = reason.partition(":")
            self.dead_letters.labels(kind, field).inc(n)
        for cause, n in result.fallbacks.items():
            self.fallbacks.labels(cause).inc(n)
        for stage, ms in result.timings_ms.items():
            if stage != "total":
                self.stage.labels(stage).observe(ms / 1000.0)
        self.stage.labels("commit").observe(commit_s)
        for stage_outcome, n in result.stage_outcomes.items():
            stage, outcome = stage_outcome
            self.decisions.labels(outcome, stage).inc(n)
        for (variant, outcome, fallback), n in result.variants.items():
            self.variant_decisions.labels(variant, outcome, str(fallback).lower()).inc(n)
        if result.source_timestamps:
            observe_many(self.latency, np.maximum(
                0.0, (now_ms - np.asarray(result.source_timestamps, dtype=np.float64)) / 1000.0))
        fb = result.features
        if fb is not None:
            if fb.late:
                self.feature_flags.labels("late").inc(fb.late)
            if fb.too_late:
                self.feature_flags.labels("too_late").inc(fb.too_late)
            if fb.degraded:
                self.feature_flags.labels("degraded").inc(len(fb.vectors))

    def set_drift(self, last: dict[tuple[str, str], float],
                  events: list[dict[str, Any]]) -> None:
        for (feature, stat), value in last.items():
            self.drift.labels(feature, stat).set(value)
        for e in events:
            self.drift_events.labels(e["statistic"], e["severity"]).inc()

    def set_refused(self, refused: dict[str, str | None]) -> None:
        """``refused``: pointer name (ACTIVE, SHADOW) -> the version refused, or None."""
        self.model_refused.clear()
        for pointer, version in refused.items():
            if version:
                self.model_refused.labels(pointer.lower(), version).set(1)

    def set_trained_otherwise(self, otherwise: dict[str, str | None]) -> None:
        """``otherwise``: pointer name -> the version serving trained otherwise, or None."""
        self.model_trained_otherwise.clear()
        for pointer, version in otherwise.items():
            if version:
                self.model_trained_otherwise.labels(pointer.lower(), version).set(1)

    def set_rates(self, rates: Any) -> None:
        self.rates.clear()
        self.rates.labels(rates.version, rates.reference).set(1)

    def set_rules(self, version: str) -> None:
        self.rules.clear()
        self.rules.labels(version).set(1)

    def set_models(self, active: str | None, shadow: str | None) -> None:
        self.model.clear()
        if active:
            self.model.labels("active", active).set(1)
        if shadow:
            self.model.labels("shadow", shadow).set(1)

    def set_canary(self, rollout: Any) -> None:
        """The rollout in force (a :class:`fraudstream.scorers.canary.Rollout`, or None)."""
        self.canary.clear()
        self.canary_share.set(rollout.share if rollout is not None else 0.0)
        if rollout is not None:
            self.canary.labels(rollout.version, rollout.champion, rollout.status).set(1)


def observe_many(histogram: Histogram, values: Sequence[float] | np.ndarray) -> None:
    """``histogram.observe(v)`` for every value, one update per bucket: a batch's
    decision latencies cost one call, not one per decision (per-value observes took ~4% of
    a draining worker's time). Same buckets (a value goes to the first bound it does not
    exceed) and sum; through the client's own value objects, so exposition is unchanged."""
    v = np.asarray(values, dtype=np.float64)
    if not v.size:
        return
    bounds = histogram._upper_bounds  # the client's: ascending, the last one +Inf
    counts = np.bincount(np.searchsorted(bounds, v, side="left"), minlength=len(bounds))
    histogram._sum.inc(float(v.sum()))
    for bucket, n in zip(histogram._buckets, counts.tolist(), strict=False):
        if n:
            bucket.inc(n)
