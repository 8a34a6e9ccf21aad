"""The rollout controller (``fraudstream controller``): moves a canary rollout through its
steps, judging each one on the live decisions and labels of the step, and rolls it back
the moment a gate fails (:mod:`fraudstream.scorers.canary`).

It holds no state of its own: the rollout and its step are the ``canary`` state in force on
the control topic, and a step's evidence is re-read from the ``decisions`` and ``labels``
topics from the step's start. A restarted controller (or a second one after the first
died) picks up where the topic says. Replicas hold a lease (one acts); each move is
also made from the rollout state it read and fenced on the topic, so a move from a state
that changed meanwhile (an abort, another controller) is superseded and applies nowhere.

Each move is a record on the control topic (audit trail included), with the gate results
that caused it in ``verdict``: ``running`` at the next step, ``promoted`` (then the model
state naming the canary as the active version), or ``rolled_back``. A promotion writes the
rollout first: an abort that came first supersedes it, and nothing is promoted; an abort
that comes after it is superseded itself. A promotion whose model state was not written (a
controller stopped between the two writes) is finished by the controller that reads it.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import asdict
from datetime import datetime
from typing import Any

from confluent_kafka import Consumer, KafkaException, TopicPartition
from prometheus_client import CollectorRegistry, Counter, Gauge

from fraudstream.schemas.codec import Codecs, DecodeError, decode_json, make_registry
from fraudstream.schemas.control import (
    APPLIED,
    ControlError,
    ControlRecord,
    Heads,
    active_version,
    decode,
    is_audit,
    ref_of,
)
from fraudstream.scorers.canary import (
    CANARY,
    CHAMPION,
    CanaryError,
    Flagged,
    GateResult,
    Rollout,
    VariantStats,
    judge,
)
from fraudstream.streams.control.lease import Lease
from fraudstream.streams.control.topic import (
    Superseded,
    control_consumer,
    heads,
    latest,
    publish,
    read_to_end,
)
from fraudstream.streams.settings import Settings
from fraudstream.streams.topics import offsets_at

log = logging.getLogger("fraudstream.controller")
BY = "controller"


def codecs_for(settings: Settings) -> Codecs:
    return Codecs(make_registry(settings.codec.registry_url, settings.codec.registry_username,
                                settings.codec.registry_password), settings.topics)


class StepReader:
    """One step's decisions and labels, per variant, read from the step's start; and the
    decisions each variant flagged since the rollout began, with their labels (what the
    precision gates judge). ``carried``: those of the step before (its reader's
    :attr:`flagged`), so the next step reads on from its own start; without them (a
    controller that started mid-rollout, ``model canary --status``) the reader reads from
    the rollout's first step."""

    def __init__(self, settings: Settings, codecs: Codecs, rollout: Rollout,
                 carried: dict[str, Flagged] | None = None) -> None:
        self.key = (rollout.rollout, rollout.step)
        self.since = rollout.step_started_at
        self.began = rollout.began
        self.stats = {CHAMPION: VariantStats(), CANARY: VariantStats()}
        self.flagged = carried if carried is not None else {CHAMPION: Flagged(),
                                                            CANARY: Flagged()}
        read_from = self.since if carried is not None else self.began
        self.unreadable = 0
        self._seen: set[str] = set()
        self._batches: set[tuple[str, int, float | None]] = set()
        topics = settings.topics
        self._decisions, self._labels = topics.decisions, topics.labels
        self._decode_decision = codecs.decision.decode
        self._decode_label = (codecs.label.decode if settings.codec.input_format == "avro"
                              else decode_json)
        self._consumer = Consumer({
            **settings.kafka.consumer_config(f"{settings.worker.app_id}-rollout"),
            "enable.auto.commit": False})
        parts: list[TopicPartition] = []
        for topic in (topics.decisions, topics.labels):
            meta = self._consumer.list_topics(topic, timeout=10).topics.get(topic)
            if meta is None or meta.error is not None:
                continue  # no labels yet: the precision gates wait
            parts += [TopicPartition(topic, p, offset) for p, offset in offsets_at(
                self._consumer, topic, list(meta.partitions), read_from).items()]
        self._consumer.assign(parts)

    def poll(self, timeout_s: float) -> int:
        """Read what arrived (for up to ``timeout_s``); returns the records read."""
        msgs = self._consumer.consume(5000, timeout_s)
        for m in msgs:
            if m.error() is not None or m.value() is None:
                continue
            try:
                if m.topic() == self._decisions:
                    self._decision(self._decode_decision(m.value()))
                else:
                    label = self._decode_label(m.value())
                    tid, is_fraud = str(label["transaction_id"]), bool(label["is_fraud"])
                    for s in (*self.stats.values(), *self.flagged.values()):
                        s.label(tid, is_fraud)
            except (DecodeError, KeyError, TypeError, ValueError):
                self.unreadable += 1
        return len(msgs)

    def _decision(self, d: dict[str, Any]) -> None:
        variant = d.get("variant")
        at = epoch_ms(d["decided_at"])
        if variant not in self.stats or at < self.began:
            return
        self.flagged[variant].flag(d)  # by transaction: a duplicate changes nothing
        if at < self.since:
            return  # an earlier step's: its precision only
        if d["transaction_id"] in self._seen:  # a duplicate answered with its first decision
            return
        self._seen.add(d["transaction_id"])
        # a batch's model time once per batch and variant (every decision of the batch
        # carries it): one large batch must not weigh as hundreds of samples in the p99
        timings = d["timings_ms"]
        batch = (variant, epoch_ms(d["decided_at"]), timings.get("total"))
        ms = timings.get(f"model_{variant}") if batch not in self._batches else None
        self._batches.add(batch)
        self.stats[variant].add(d, ms)

    def judge(self, rollout: Rollout) -> list[GateResult]:
        return judge(self.stats[CHAMPION], self.stats[CANARY], rollout.gates,
                     (self.flagged[CHAMPION], self.flagged[CANARY]))

    def close(self) -> None:
        self._consumer.close()


def next_state(rollout: Rollout, results: list[GateResult], stats: dict[str, VariantStats],
               now_ms: int) -> tuple[Rollout, str] | None:
    """Where a running rollout goes now (and why), or None while its step goes on."""
    verdict = _clean({"step": rollout.step, "share": rollout.share,
                      "gates": [asdict(r) for r in results],
                      CHAMPION: stats[CHAMPION].summary(), CANARY: stats[CANARY].summary()})
    failed = [r for r in results if r.status == "fail"]
    if failed:
        why = "; ".join(r.line() for r in failed)
        return (rollout.moved(now_ms, status="rolled_back",
                              verdict={**verdict, "failed": [r.gate for r in failed]}),
                f"rolled back at step {rollout.step + 1} ({rollout.share:.0%}): {why}")
    step = rollout.steps[rollout.step]
    enough = min(s.decisions for s in stats.values()) >= rollout.gates.min_decisions
    if not enough or now_ms - rollout.step_started_at < step.duration_s * 1000:
        return None
    if rollout.step >= rollout.last_judged:
        return (rollout.moved(now_ms, status="promoted", step=len(rollout.steps) - 1,
                              verdict=verdict), "every step passed: promoted")
    nxt = rollout.steps[rollout.step + 1].share
    return (rollout.moved(now_ms, step=rollout.step + 1, verdict=verdict),
            f"step {rollout.step + 1} ({rollout.share:.0%}) passed: now {nxt:.0%} of cards")


def rollout_record(rollout: Rollout, by: str, reason: str,
                   after: ControlRecord | None) -> ControlRecord:
    """The rollout's new state as a change made from ``after``."""
    return ControlRecord.make("canary", rollout.version, rollout.to_document(), by,
                              int(time.time() * 1000), reason).after(after)


def publish_rollout(settings: Settings, rollout: Rollout, by: str, reason: str,
                    after: ControlRecord | None) -> None:
    """The rollout's new state, made from ``after`` (the rollout state in force when it was
    decided): :class:`~fraudstream.streams.control.topic.Superseded` if another change of
    the rollout came first."""
    publish(settings, rollout_record(rollout, by, reason, after))


def promote(settings: Settings, rollout: Rollout, reason: str,
            after: ControlRecord | None) -> None:
    """The rollout promoted (workers stop the split), then the model state with the canary
    as the active version (their model watcher makes it active). Only while the champion
    in force is the one the rollout was judged against and the rollout is still the state
    ``after``; the rollout record is fenced on ``after``, so an abort that came first
    stops the promotion before anything is written (see the module doc)."""
    in_force = heads(settings)
    state, rollout_now = in_force.get("model"), in_force.get("canary")
    record = _activation(rollout, reason, state)
    if active_version(state) != rollout.champion:
        raise Superseded(record, state)
    moved = rollout_record(rollout, BY, reason, after)
    if ref_of(rollout_now) != ref_of(after):
        raise Superseded(moved, rollout_now)
    publish(settings, moved)
    _activate(settings, rollout, record)


def _activation(rollout: Rollout, reason: str, state: ControlRecord | None) -> ControlRecord:
    """The model state made from ``state`` with the rollout's canary active (and no longer
    the shadow, if it was)."""
    now = dict(state.document) if state is not None else {"active": None, "shadow": None}
    shadow = now.get("shadow")
    doc = {"active": rollout.version, "shadow": None if shadow == rollout.version else shadow}
    return ControlRecord.make("model", rollout.version, doc, BY, int(time.time() * 1000),
                              reason).after(state)


def _activate(settings: Settings, rollout: Rollout, record: ControlRecord) -> None:
    """The promotion's model state. One published by hand in the moment between the
    promotion's two writes stands: the rollout is then recorded ``aborted``, naming the
    version in force, so it does not say promoted while another version is active (its
    :class:`Superseded` raised again)."""
    try:
        publish(settings, record)
    except Superseded as exc:  # a model state published in the moment between the writes
        active = active_version(latest(settings, "model"))
        why = (f"aborted: the model state changed before {rollout.version} was made "
               f"active ({active} is active, published meanwhile), so the promotion did not "
               "take effect")
        log.error("controller: rollout %s %s", rollout.rollout, why)
        try:
            publish_rollout(settings, rollout.moved(int(time.time() * 1000),
                                                    status="aborted"), BY, why,
                            latest(settings, "canary"))
        except Superseded:
            pass  # the rollout changed too: what is in force says what happened
        raise exc from None


class RolloutMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry or CollectorRegistry()
        self.share = Gauge("fraudstream_rollout_share",
                           "Share of cards the running canary serves (0: none).", registry=r)
        self.gate = Gauge("fraudstream_rollout_gate_failed",
                          "Per gate of the running step: 1 failed, 0 passed, -1 waiting for "
                          "evidence.", ["gate"], registry=r)
        self.variant = Gauge("fraudstream_rollout_variant",
                             "The running step's figures per variant (decisions, rates, "
                             "model p99 ms).", ["variant", "stat"], registry=r)
        self.ended = Counter("fraudstream_rollouts_ended", "Rollouts ended, by outcome "
                             "(promoted, rolled_back, aborted).", ["outcome"], registry=r)
        for outcome in ("promoted", "rolled_back", "aborted"):
            self.ended.labels(outcome)  # at 0 from the start: the first one is an increase
        self.lease = Gauge("fraudstream_controller_lease_held", "1 on the controller that "
                           "acts, 0 on a standby replica.", registry=r)

    def update(self, rollout: Rollout | None, results: list[GateResult],
               stats: dict[str, VariantStats] | None) -> None:
        self.share.set(rollout.share if rollout is not None and rollout.status == "running"
                       else 0.0)
        for r in results:
            self.gate.labels(r.gate).set({"fail": 1, "pass": 0}.get(r.status, -1))
        for variant, s in (stats or {}).items():
            for stat, value in s.summary().items():
                if isinstance(value, int | float) and math.isfinite(value):
                    self.variant.labels(variant, stat).set(value)


class Controller:
    def __init__(self, settings: Settings, metrics: RolloutMetrics | None = None,
                 clock: Callable[[], float] = time.time, lease: Lease | None = None) -> None:
        self.settings = settings
        self.metrics = metrics or RolloutMetrics()
        #: Held by one controller among replicas: only that one judges and moves rollouts
        #: (None: this one always acts).
        self.lease = lease
        self.clock = clock
        self.codecs = codecs_for(settings)
        self.rollout: Rollout | None = None
        self._reader: StepReader | None = None
        self._said = time.monotonic()
        #: The control topic's changes as every reader replays them; the rollout state in
        #: force is its ``canary`` head, which a move is made from.
        self.heads = Heads()
        #: Per kind, the offset of its change in force (which came first).
        self._offsets: dict[str, int] = {}

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                consumer = control_consumer(self.settings, f"controller-{time.time_ns()}")
                break
            except LookupError:
                log.warning("controller: no topic %s yet; waiting",
                            self.settings.topics.control)
                stop.wait(5.0)
        else:
            return
        try:
            for msg in read_to_end(consumer, 30.0):  # the state now, before acting on it
                self._read(msg)
            while not stop.is_set():
                try:
                    self._turn(consumer)
                except (KafkaException, RuntimeError, LookupError) as exc:
                    # a broker or registry away for a while: the rollout waits, as it is
                    log.warning("controller: %s; trying again in 5 s", exc)
                    self._close_reader()
                    stop.wait(5.0)
                except Exception:  # never a dead controller: say what, then go on
                    log.exception("controller: judging the rollout failed; trying again "
                                  "in 5 s")
                    self._close_reader()
                    stop.wait(5.0)
        finally:
            self._close_reader()
            consumer.close()

    def _turn(self, consumer: Consumer) -> None:
        """Read what changed on the control topic, then judge the running step (if any)
        on what arrived, and move the rollout when it should."""
        running = self.rollout is not None and self.rollout.status == "running"
        for msg in consumer.consume(100, 0.05 if running else 1.0):
            if msg.error() is None:
                self._read(msg)
        r = self.rollout
        acting = self.lease is None or self.lease.held
        self.metrics.lease.set(float(acting))
        if r is not None and acting and self._unfinished(r):
            self._finish(r)
        if r is None or r.status != "running" or not acting:
            # (a standby keeps reading the rollout's state: it takes over where it is)
            self._close_reader()
            self.metrics.update(r, [], None)
            return
        reader = self._reader
        if reader is None or reader.key != (r.rollout, r.step):
            # the step before's flagged decisions go on being judged (their labels come
            # later); a new rollout starts from nothing
            carried = reader.flagged if reader is not None and reader.key[0] == r.rollout \
                else None
            self._close_reader()
            reader = self._reader = StepReader(self.settings, self.codecs, r, carried)
            log.warning("controller: judging rollout %s step %d (%s of cards on %s)",
                        r.rollout, r.step + 1, f"{r.share:.0%}", r.version)
        reader.poll(0.5)
        results = reader.judge(r)
        self.metrics.update(r, results, reader.stats)
        if time.monotonic() >= self._said + 15.0:
            self._said = time.monotonic()
            log.warning("controller: step %d: %s; %s", r.step + 1, ", ".join(
                f"{v} {s.decisions} decisions" for v, s in reader.stats.items()),
                "; ".join(g.line() for g in results if g.status != "wait") or "gates waiting")
        moved = self._baseline_moved(r) or next_state(r, results, reader.stats,
                                                       int(self.clock() * 1000))
        if moved is not None:
            self._move(*moved)

    def _baseline_moved(self, r: Rollout) -> tuple[Rollout, str] | None:
        """A running rollout whose champion is no longer the active version in force:
        aborted (someone published another active version by hand), or promoted when the
        active version is already its canary (a promotion whose rollout record was not
        written)."""
        active = active_version(self.heads.get("model"))
        if active is None or active == r.champion:
            return None
        now = int(self.clock() * 1000)
        if active == r.version:
            return r.moved(now, status="promoted"), "promoted: the model state names it active"
        return (r.moved(now, status="aborted"), f"aborted: the active version is now "
                f"{active}, not the champion {r.champion} it was judged against")

    def _unfinished(self, r: Rollout) -> bool:
        """A promoted rollout whose model state was not written: the champion is still the
        active version, in a model state older than the promotion (a later one, such as a
        rollback by hand, is not undone)."""
        return (r.status == "promoted"
                and active_version(self.heads.get("model")) == r.champion
                and self._offsets.get("model", -1) < self._offsets.get("canary", -1))

    def _finish(self, r: Rollout) -> None:
        log.warning("controller: rollout %s was promoted, but %s is not active yet: "
                    "finishing the promotion", r.rollout, r.version)
        try:
            _activate(self.settings, r, _activation(r, "finishing the promotion of "
                                                    f"rollout {r.rollout}",
                                                    self.heads.get("model")))
        except Superseded:
            return  # another model state came first: it stands

    def _close_reader(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None

    def _read(self, msg: Any) -> None:
        if not is_audit(msg.key()):
            return  # a state copy: its audit record is the change
        try:
            record = decode(msg.value())
        except ControlError:
            return
        if self.heads.offer(record) != APPLIED:
            return
        self._offsets[record.kind] = msg.offset()
        if record.kind != "canary":
            return
        try:
            rollout = Rollout.from_document(record.document)
        except CanaryError as exc:
            log.warning("controller: unreadable rollout at offset %d: %s", msg.offset(), exc)
            return
        before = self.rollout
        if before is not None and before.status == "running" and rollout.status == "aborted" \
                and before.rollout == rollout.rollout:
            self.metrics.ended.labels("aborted").inc()
            log.warning("controller: rollout %s aborted: %s", rollout.rollout,
                        record.reason)
        self.rollout = rollout

    def _move(self, rollout: Rollout, why: str) -> None:
        log.warning("controller: rollout %s %s", rollout.rollout, why)
        after = self.heads.get("canary")
        try:
            if rollout.status == "promoted" and \
                    active_version(self.heads.get("model")) != rollout.version:
                promote(self.settings, rollout, why, after)
            else:
                publish_rollout(self.settings, rollout, BY, why, after)
        except Superseded as exc:
            # another change came first (an abort, a rollout started by hand, another
            # controller): judge again from what is in force
            log.warning("controller: rollout %s: not moved: %s", rollout.rollout, exc)
            self._close_reader()
            return
        if rollout.status != "running":
            self.metrics.ended.labels(rollout.status).inc()
        self.rollout = rollout


def epoch_ms(value: Any) -> int:
    """A timestamp-millis field as the reader gives it (a datetime, or an int) in ms."""
    return int(value.timestamp() * 1000) if isinstance(value, datetime) else int(value)


def _clean(value: Any) -> Any:
    """JSON without NaN: a figure not computed yet is null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value
