"""The worker's batch step, free of Faust and Kafka: raw records in, records to write out.

:meth:`Pipeline.process` takes one fetched micro-batch of ``transactions`` records and
returns a :class:`BatchResult`: the decisions (keyed by transaction_id), the dead letters
(one per record that could not be decided, with the reason), and the new entries for the
dedupe state. Every input record ends in exactly one decision or one dead letter: nothing
is dropped. Writing those out, in a safe order, is :mod:`fraudstream.streams.worker.delivery`'s job.

Dedupe: a transaction_id already decided (``lookup`` finds it, or it appeared earlier in
the same batch) gets the bytes of its first decision again, never a new decision.

Features (:class:`fraudstream.state.engine.FeatureEngine`, when given): computed for the batch's new
transactions after dedupe, in the order received, with the batch's labels applied first;
the changed state records come back in :attr:`BatchResult.feature_writes`. A label record
that cannot be read goes to the dead letters like a transaction.

Event time: :attr:`Pipeline.event_time_hwm` keeps, per partition, the newest event_time
among the transactions decided (duplicates included). The worker's state expiry (dedupe
retention, idle entities) measures from it, not from the wall clock: a worker fed
history (a replay, a backlog, tests on a fixed date) keeps what is current in event time.
The wall clock only bounds how far in the future an event_time may be (the validator).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Container, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fraudstream.schemas.codec import Codecs, DecodeError, decode_json
from fraudstream.schemas.decision_writer import decision_fields
from fraudstream.schemas.fx import Rates
from fraudstream.schemas.validate import ValidationError, validate_label, validate_transaction
from fraudstream.scorers.base import Score, Scorer
from fraudstream.scorers.cascade import ModelStage, verdicts_of
from fraudstream.scorers.online import OnlineStage
from fraudstream.state.engine import (
    FeatureBatch,
    FeatureEngine,
    LabelEvent,
    StateUnavailable,
    TxnEvent,
)
from fraudstream.state.features import FEATURE_NAMES, FEATURE_VERSION, INDEX
from fraudstream.streams.batch import BatchResult, RawRecord, Staged
from fraudstream.streams.dead_letters import DeadLetters
from fraudstream.streams.settings import Settings

#: (partition, [dedupe keys]) -> [stored decision bytes or None], aligned.
Lookup = Callable[[int, list[bytes]], list[bytes | None]]

DAY_MS = 86_400_000


def dedupe_key(txn: dict[str, Any]) -> bytes:
    """``<event day, 5 digits>|<transaction_id>``: a transaction sent again carries the same
    event time, so it finds its entry; keys sort by day, so expiry reads only what expires."""
    return b"%05d|%s" % (txn["event_time"] // DAY_MS, txn["transaction_id"].encode())


@dataclass(frozen=True)
class Limits:
    max_record_bytes: int
    max_future_ms: int
    #: In the reference currency of ``rates``.
    max_amount: float
    #: Every amount is converted with it (``amount_ref``); the shipped table by default.
    rates: Rates = field(default_factory=Rates.load)
    #: A dead letter keeps at most this much of the record's value (streams/dead_letters.py).
    dead_letter_max_bytes: int = 64 * 1024

    @classmethod
    def from_settings(cls, settings: Settings) -> Limits:
        """The worker's limits; raises :class:`fraudstream.schemas.fx.RatesError` for a bad rates
        file."""
        w = settings.worker
        return cls(max_record_bytes=settings.codec.max_record_bytes,
                   max_future_ms=w.max_future_ms, max_amount=w.max_amount,
                   rates=Rates.load(w.rates_path),
                   dead_letter_max_bytes=settings.codec.dead_letter_max_bytes)


class Pipeline:
    def __init__(
        self,
        codecs: Codecs,
        scorer: Scorer | None,
        limits: Limits,
        input_format: str = "avro",
        clock: Callable[[], float] = time.time,
        features: FeatureEngine | None = None,
        log_features: bool = False,
        models: ModelStage | None = None,
        budget_ms: float = 50.0,
        online: OnlineStage | None = None,
        model_timeout_ms: float = 25.0,
        model_timeout_rows: int = 500,
        decision_records: bool = True,
        feature_log_for: Container[str] | None = None,
    ) -> None:
        self.codecs = codecs
        #: Transaction ids whose features go to the learners' feature log; None: every
        #: transaction's, as a worker must (it cannot know which will be labelled). A
        #: replay knows its labels and logs only those.
        self.feature_log_for = feature_log_for
        #: False: the caller reads the verdicts, not the decision records (a replay, which
        #: publishes only the shadow's): the active side's are left empty, not encoded.
        self.decision_records = decision_records
        #: None: a pipeline that only prepares batches (a replay's reading side).
        self.scorer = scorer
        self.limits = limits
        self.clock = clock
        self.features = features
        self.log_features = log_features
        self.models = models
        self.budget_ms = budget_ms
        #: The least time a model call on up to ``model_timeout_rows`` rows gets, even for
        #: a batch already past its budget; a larger batch (a backlog's) gets as much per
        #: row. A call that takes longer is abandoned (fallback ``timeout``).
        self.model_timeout_s = model_timeout_ms / 1000.0
        self.model_timeout_rows = max(1, model_timeout_rows)
        self.online = online
        self.dead_letters = DeadLetters(codecs.dead_letter, limits.dead_letter_max_bytes)
        #: Partition -> newest event_time decided there (valid transactions, duplicates
        #: included; dead letters not). Advanced in :meth:`process`, before the batch's
        #: state is recorded; read by the worker's expiry timers. Empty until a first
        #: transaction is decided: no expiry before that.
        self.event_time_hwm: dict[int, int] = {}
        self._decode: Callable[[bytes], dict[str, Any]] = (
            codecs.transaction.decode if input_format == "avro" else decode_json
        )
        #: (our schema's header, the one-pass reader) for Avro input
        self._checked = codecs.transaction.checked_reader() if input_format == "avro" else None
        self._decode_label: Callable[[bytes], dict[str, Any]] = (
            codecs.label.decode if input_format == "avro" else decode_json
        )

    def process(self, records: Sequence[RawRecord], lookup: Lookup,
                labels: Sequence[RawRecord] = (), arrived: float | None = None) -> BatchResult:
        """Decide a batch. ``arrived``: when it reached the worker (``perf_counter``); the
        model stage gets what is left of the budget from then, and at least the model
        timeout. A decision made after the budget ran out carries ``late_ms``."""
        return self.decide(self.prepare(records, lookup, labels), arrived)

    def prepare(self, records: Sequence[RawRecord], lookup: Lookup,
                labels: Sequence[RawRecord] = ()) -> Staged:
        """The first half of :meth:`process`: records read and validated (the bad ones
        rejected), repeats found, features computed (their state writes in
        ``out.feature_writes``). Needs no scorer and no model."""
        t0 = time.perf_counter()
        out = BatchResult()
        now_ms = int(self.clock() * 1000)
        valid: list[tuple[RawRecord, dict[str, Any]]] = []
        limits = self.limits
        header, checked = self._checked or (None, None)
        latest_ms, max_bytes = now_ms + limits.max_future_ms, limits.max_record_bytes
        max_amount, rates = limits.max_amount, limits.rates
        for rec in records:
            # the common record read and validated in one pass; the rest the long way,
            # which names what is wrong
            value = rec.value
            if (checked is not None and value is not None and value[:5] == header
                    and len(value) <= max_bytes):
                txn = checked(value, 5, latest_ms, max_amount, rates)
                if txn is not None:
                    valid.append((rec, txn))
                    continue
            try:
                valid.append((rec, self._read(rec, now_ms)))
            except (DecodeError, ValidationError) as exc:
                self._reject(out, rec, exc, now_ms)
        hwm = self.event_time_hwm
        for rec, txn in valid:
            if txn["event_time"] > hwm.get(rec.partition, -1):
                hwm[rec.partition] = txn["event_time"]
        out.miskeyed = sum(1 for rec, txn in valid if rec.key != txn["card_id"].encode())
        label_events: list[LabelEvent] = []
        for rec in labels:
            try:
                label_events.append(LabelEvent(rec.partition, rec.offset, self.read_label(rec)))
            except (DecodeError, ValidationError) as exc:
                self._reject(out, rec, exc, now_ms)
        t1 = time.perf_counter()

        # Dedupe: earlier decisions (from state) and repeats inside this batch.
        earlier = self._lookup_all(valid, lookup)
        fresh: list[tuple[RawRecord, dict[str, Any]]] = []
        first_in_batch: dict[str, int] = {}
        repeats: list[tuple[int, str]] = []  # (index in valid, transaction_id)
        for i, (rec, txn) in enumerate(valid):
            txn_id = txn["transaction_id"]
            if txn_id in earlier:
                continue
            if txn_id in first_in_batch:
                repeats.append((i, txn_id))
                continue
            first_in_batch[txn_id] = len(fresh)
            fresh.append((rec, txn))
        t2 = time.perf_counter()

        if self.features is not None and (fresh or label_events):
            fb = self.features.process(
                [TxnEvent(rec.partition, rec.offset, txn) for rec, txn in fresh], label_events)
            out.features = fb
            out.feature_writes = fb.writes
        t3 = time.perf_counter()
        return Staged(out, valid, fresh, earlier, repeats, first_in_batch, label_events, t0,
                      t3, {"decode": (t1 - t0) * 1000.0, "dedupe": (t2 - t1) * 1000.0,
                       "features": (t3 - t2) * 1000.0})

    def decide(self, staged: Staged, arrived: float | None = None) -> BatchResult:
        """The second half of :meth:`process`: the online learners taught, then rules,
        models and the decision records, for a batch :meth:`prepare` gave."""
        out, fresh, label_events = staged.out, staged.fresh, staged.label_events
        valid, earlier, repeats = staged.valid, staged.earlier, staged.repeats
        first_in_batch, t0 = staged.first_in_batch, staged.started
        if self.scorer is None:
            raise TypeError("this pipeline only prepares batches: it has no scorer")
        t2 = time.perf_counter()
        waited = t2 - staged.prepared  # for another process to take it (a replay)
        vectors: Sequence[Any] | None = (out.features.vectors if out.features is not None
                                         else None)
        # The feature matrix, built once for the learner's log and the model (none when
        # neither will read it: no learner, no active model).
        wanted = self.online is not None or (self.models is not None and (
            self.models.active is not None or self.models.serving_canary() is not None))
        X = None
        if vectors and wanted:
            matrix = out.features.matrix if out.features is not None else None
            X = (matrix.astype(np.float32) if matrix is not None
                 else np.array([v.row for v in vectors], dtype=np.float32))
        learners: dict[int, Any] = {}
        if out.features is not None and out.features.degraded:
            out.labels_again = len(label_events)  # neither the features nor a learner took them
        elif self.online is not None:
            active = self.models.active if self.models is not None else None
            try:
                learners = self.online.learn(label_events, {r.partition for r, _ in fresh},
                                             out.feature_writes,
                                             getattr(active, "base_rate", None))
            except StateUnavailable:
                out.labels_again = len(label_events)
            out.drift_events += self.online.drift_events
            self.online.drift_events = []
        t3 = time.perf_counter()
        events = [txn for _, txn in fresh]
        scores = self.scorer.score_batch(events, vectors) if fresh else []
        t4 = time.perf_counter()
        deadline = (arrived if arrived is not None else t0) + self.budget_ms / 1000.0
        verdicts, shadow = self._cascade(scores, X, out, deadline, learners, fresh)
        if (self.online is not None and fresh and X is not None
                and not (out.features is not None and out.features.degraded)):
            logged = self.feature_log_for
            if logged is None:
                out.feature_writes.extend(self.online.log_entries(
                    [(r.partition, t["event_time"], t["transaction_id"]) for r, t in fresh], X,
                    out.model_scores))
            else:
                rows = [i for i, (_r, t) in enumerate(fresh) if t["transaction_id"] in logged]
                if rows:
                    ensemble = out.model_scores
                    out.feature_writes.extend(self.online.log_entries(
                        [(fresh[i][0].partition, fresh[i][1]["event_time"],
                          fresh[i][1]["transaction_id"]) for i in rows], X[rows],
                        None if ensemble is None else ensemble[rows]))
        out.fresh, out.verdicts, out.shadow_verdicts = fresh, verdicts, shadow
        t5 = time.perf_counter()

        timings = {
            **staged.timings_ms,
            "features": staged.timings_ms["features"] + (t3 - t2) * 1000.0,  # and learning
            "rules": (t4 - t3) * 1000.0,
            "model": (t5 - t4) * 1000.0,
            **out.variant_ms,
        }
        decided_at = int(self.clock() * 1000)
        # Every decision of the batch carries the batch's stage times (``total``: arrival
        # to decisions) and how far past the budget it was made.
        now = time.perf_counter()
        batch_timings = dict(timings, total=(now - t0 - waited) * 1000.0)
        late_ms = max(0.0, (now - deadline) * 1000.0) if fresh else 0.0
        if late_ms > 0.0:
            out.past_budget, out.past_budget_max_ms = len(fresh), late_ms
        encode = self.codecs.decision.encode
        writer = self.codecs.decision.writer if self.decision_records else None
        fresh_bytes: list[bytes] = []
        flags = self._flags(out.features, len(fresh))
        rules_version = getattr(getattr(self.scorer, "ruleset", None), "version", None)
        rates_version = self.limits.rates.version
        for i, ((rec, txn), verdict) in enumerate(zip(fresh, verdicts, strict=True)):
            reasons = verdict["reasons"]
            if flags[i]:
                reasons = [*reasons, *flags[i]]
            amount_ref = round(txn["amount_ref"], 4)
            if writer is not None:  # the same bytes, with no dict built
                value = writer.encode_decided(txn, verdict, reasons, rec.timestamp_ms,
                                              amount_ref, batch_timings, late_ms, decided_at,
                                              rules_version, rates_version)
            elif self.decision_records:
                value = encode({**decision_fields(txn, rec.timestamp_ms, amount_ref,
                                                  batch_timings, late_ms, decided_at,
                                                  rules_version, rates_version), **verdict,
                                "reasons": reasons})
            else:
                value = b""
            fresh_bytes.append(value)
            out.new_entries.append((rec.partition, dedupe_key(txn), value))
            if "variant" in verdict:
                out.variants[(verdict["variant"], verdict["decision"], verdict["fallback"])] += 1
            out.source_timestamps.append(rec.timestamp_ms)
            if shadow is not None:
                out.shadow.append((txn["transaction_id"].encode(), encode({
                    **decision_fields(txn, rec.timestamp_ms, amount_ref, batch_timings,
                                      late_ms, decided_at, rules_version, rates_version),
                    **shadow[i]})))
        outcomes = [v["decision"] for v in verdicts]
        out.outcomes.update(outcomes)
        out.stage_outcomes.update(zip([v["stage"] for v in verdicts], outcomes, strict=True))
        if self.log_features and out.features is not None:
            out.feature_log = self._feature_log(fresh, out.features)

        # Emit in input order: every valid record gets exactly one decision record.
        if not earlier and not repeats:  # each valid record is fresh, in the same order
            out.decisions.extend(zip([t["transaction_id"].encode() for _r, t in valid],
                                     fresh_bytes, strict=True))
        else:
            fresh_iter = iter(fresh_bytes)
            repeat_idx = {i for i, _ in repeats}
            for i, (_rec, txn) in enumerate(valid):
                txn_id = txn["transaction_id"]
                key = txn_id.encode()
                if txn_id in earlier:
                    value = earlier[txn_id]
                    out.duplicates += 1
                elif i in repeat_idx:
                    value = fresh_bytes[first_in_batch[txn_id]]
                    out.duplicates += 1
                else:
                    value = next(fresh_iter)
                out.decisions.append((key, value))
        timings["total"] = (time.perf_counter() - t0 - waited) * 1000.0
        out.timings_ms = timings
        return out

    def _read(self, rec: RawRecord, now_ms: int) -> dict[str, Any]:
        return validate_transaction(
            self._decode(self._bytes(rec)),
            now_ms=now_ms,
            max_future_ms=self.limits.max_future_ms,
            max_amount=self.limits.max_amount,
            rates=self.limits.rates,
        )

    def _cascade(self, scores: list[Score], X: np.ndarray | None, out: BatchResult,
                 deadline: float, learners: dict[int, Any],
                 fresh: list[tuple[RawRecord, dict[str, Any]]],
                 ) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
        """Decision fields per event: the model's where it scored in time, else the rules'
        (fallback, with the cause among the reasons); guardrails floor the outcome. Then
        the canary's for its cards, during a rollout; then the shadow's, never deciding."""
        models = self.models
        if models is not None:
            models.took_ms.clear()
        partitions = [r.partition for r, _ in fresh]
        verdicts, scored = self._champion(scores, X, out, deadline, learners, partitions)
        canary = models.serving_canary() if models is not None and scores else None
        if canary is not None:
            assert models is not None
            degraded = X is None or (out.features is not None and out.features.degraded)
            out.variant_ms = models.serve_canary(
                canary, verdicts, [t["card_id"] for _, t in fresh], None if degraded else X,
                scores, deadline, self._model_floor(len(scores)),
                lambda p: self._blend(learners, partitions, X, p, canary), self._rules,
                out.fallbacks)
        shadow_model = models.shadow if models is not None and scored else None
        if shadow_model is None:
            return verdicts, None
        assert models is not None and X is not None
        if time.perf_counter() >= deadline:  # the shadow never makes a batch later
            out.fallbacks["shadow_skipped"] += len(scores)
            return verdicts, None
        sp, sreasons, scause = models.run(shadow_model, X, deadline)
        if sp is None or sreasons is None:
            out.fallbacks[f"shadow_{scause}"] += len(scores)
            return verdicts, None
        sp, _ = self._blend(learners, partitions, X, sp, shadow_model)
        return verdicts, verdicts_of(shadow_model, scores, sp, sreasons, "shadow",
                                     out.fallbacks, "shadow_", self._rules)

    def _model_floor(self, rows: int) -> float:
        """The least time a model call on ``rows`` rows gets: the model timeout, for up to
        ``model_timeout_rows`` rows, and as much per row beyond."""
        return self.model_timeout_s * max(1.0, rows / self.model_timeout_rows)

    def _rules(self, score: Score, stage: str, cause: str | None) -> dict[str, Any]:
        return {"decision": str(score.outcome), "score": float(score.score),
                "reasons": list(score.reasons) + ([f"fallback:{cause}"] if cause else []),
                "model_version": self.scorer.version, "stage": stage,
                "fallback": cause is not None}

    def _blend(self, learners: dict[int, Any], partitions: list[int], X: Any, p: np.ndarray,
               model: Any) -> tuple[np.ndarray, list[bool]]:
        """``model``'s scores blended with the online learners' (and, per event, whether
        the learner had a say); unchanged without learners."""
        if not learners or self.online is None:
            return p, []
        return (self.online.blend(learners, partitions, X, p, getattr(model, "base_rate", None)),
                self.online.blended(learners, partitions).tolist())

    def _champion(self, scores: list[Score], X: np.ndarray | None, out: BatchResult,
                  deadline: float, learners: dict[int, Any], partitions: list[int],
                  ) -> tuple[list[dict[str, Any]], bool]:
        """The active version's decisions, else the rules'; and whether it scored."""
        rules = self._rules
        models = self.models
        model = models.active if models is not None else None
        if model is None or not scores:
            # no model: by design (no ACTIVE version), or a fallback when one was refused
            cause = models.unavailable if models is not None and scores else None
            if cause:
                out.fallbacks[cause] += len(scores)
            return [rules(s, "rules", cause) for s in scores], False
        assert models is not None
        degraded = X is None or (out.features is not None and out.features.degraded)
        if degraded:
            out.fallbacks["degraded"] += len(scores)
            return [rules(s, "rules", "degraded") for s in scores], False
        assert X is not None
        p, reasons, cause = models.run(model, X, deadline, self._model_floor(len(X)))
        monitor = models.drift_monitor(model)
        if p is None or reasons is None:
            assert cause is not None
            out.fallbacks[cause] += len(scores)
            if monitor is not None:  # the features drift whoever decided
                out.drift_events += monitor.observe(X, None, int(self.clock() * 1000))
            return [rules(s, "model", cause) for s in scores], False
        out.model_scores = p
        p, online = self._blend(learners, partitions, X, p, model)
        if monitor is not None:
            finite = np.isfinite(p)
            out.drift_events += monitor.observe(X[finite], p[finite],
                                                int(self.clock() * 1000))
        verdicts = verdicts_of(model, scores, p, reasons, "model", out.fallbacks, "", rules)
        for verdict, blended in zip(verdicts, online, strict=False):
            if blended and not verdict["fallback"]:
                verdict["stage"] = "online"  # the learner had a say in this score
        return verdicts, True

    def forward(self, records: Sequence[RawRecord]) -> BatchResult:
        """Repartition mode: each readable transaction goes back out keyed by its card_id
        (its bytes unchanged), the others to the dead letters. Nothing is decided here."""
        out = BatchResult()
        now_ms = int(self.clock() * 1000)
        for rec in records:
            try:
                txn = self._read(rec, now_ms)
            except (DecodeError, ValidationError) as exc:
                self._reject(out, rec, exc, now_ms)
                continue
            assert rec.value is not None
            out.forwards.append((txn["card_id"].encode(), rec.value))
        return out

    @staticmethod
    def _flags(fb: FeatureBatch | None, n: int) -> list[tuple[str, ...]]:
        """Extra decision reasons: the features were degraded, the event came too late."""
        if fb is None:
            return [()] * n
        if fb.degraded:
            return [("features_degraded",)] * n
        too_late = INDEX["event_too_late"]
        return [("event_too_late",) if v.row[too_late] else () for v in fb.vectors]

    def _feature_log(self, fresh: list[tuple[RawRecord, dict[str, Any]]],
                     fb: FeatureBatch) -> list[tuple[bytes, bytes]]:
        encode = self.codecs.feature_vector.encode
        return [
            (txn["transaction_id"].encode(), encode({
                "transaction_id": txn["transaction_id"],
                "event_time": txn["event_time"],
                "feature_version": FEATURE_VERSION,
                "values": dict(zip(FEATURE_NAMES, v.row, strict=True)),
                "degraded": fb.degraded,
            }))
            for (_rec, txn), v in zip(fresh, fb.vectors, strict=True)
        ]

    def read_label(self, rec: RawRecord) -> dict[str, Any]:
        return validate_label(self._decode_label(self._bytes(rec)))

    def _bytes(self, rec: RawRecord) -> bytes:
        """The record's value, refused when empty or over the size limit."""
        if rec.value is None:
            raise DecodeError("decode", "empty record (null value)")
        if len(rec.value) > self.limits.max_record_bytes:
            raise DecodeError(
                "oversize",
                f"record of {len(rec.value)} bytes is over {self.limits.max_record_bytes}",
            )
        return rec.value

    def _reject(self, out: BatchResult, rec: RawRecord, exc: DecodeError | ValidationError,
                now_ms: int) -> None:
        out.dead_letters.append(self._dead_letter(rec, exc, now_ms))
        out.dlq_reasons[f"{exc.kind}:{exc.field or '-'}"] += 1

    @staticmethod
    def _lookup_all(
        valid: list[tuple[RawRecord, dict[str, Any]]], lookup: Lookup
    ) -> dict[str, bytes]:
        """transaction_id -> stored decision, for the ids the dedupe state knows."""
        by_partition: dict[int, tuple[list[bytes], list[str]]] = {}
        for rec, txn in valid:
            keys, ids = by_partition.setdefault(rec.partition, ([], []))
            keys.append(dedupe_key(txn))
            ids.append(txn["transaction_id"])
        found: dict[str, bytes] = {}
        for partition, (keys, ids) in by_partition.items():
            for txn_id, value in zip(ids, lookup(partition, keys), strict=True):
                if value is not None:
                    found[txn_id] = value
        return found

    def _dead_letter(
        self, rec: RawRecord, exc: DecodeError | ValidationError, now_ms: int
    ) -> tuple[bytes | None, bytes]:
        return self.dead_letters.build(rec, exc.kind, exc.field, exc.reason, now_ms)
