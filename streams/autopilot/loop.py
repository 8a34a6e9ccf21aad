"""``fraudstream autopilot``: the retraining loop, one process per deployment.

Every ``poll_s`` it reads what arrived since the last training started (drift events of
the champion in force and the online learners' error rises on ``drift``, labels on
``labels``) and asks the policy (:mod:`fraudstream.scorers.retraining`) whether to
retrain. A training reads the last ``window_s`` of the topics
(:mod:`fraudstream.streams.autopilot.retrain`); the challenger is then replayed against
the champion over its held-out test window (:mod:`fraudstream.streams.autopilot.compare`).
An accepted challenger goes to shadow on every worker for ``shadow_s`` (it must make
``min_shadow_decisions`` decisions there, at the canary's fallback limit), then to a
canary rollout that ``fraudstream controller`` judges and moves; the autopilot waits for
its end. The champion serves throughout.

It holds no state of its own: each step is an event on ``fraudstream.autopilot``
(:mod:`fraudstream.streams.autopilot.events`), and a restarted autopilot resumes from the
last one: a shadow or a canary goes on where it was, without a second training; a
training that a stop cut short is recorded as failed (and backed off from). One training
at a time: the loop does nothing else meanwhile. The training runs in a child process of
its own (:func:`~fraudstream.streams.processes.run_stoppable`): a SIGTERM ends it at once
rather than after it, and its memory goes with the child; the comparison that follows
stops after the batch it is deciding.
"""

from __future__ import annotations

import logging
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

from confluent_kafka import Consumer, KafkaException, TopicPartition
from prometheus_client import CollectorRegistry, Counter, Gauge

from fraudstream.schemas.codec import Codecs
from fraudstream.schemas.control import ControlRecord
from fraudstream.scorers.canary import CanaryError, Rollout
from fraudstream.scorers.registry import Registry
from fraudstream.scorers.retraining import Evidence, Pause, Policy, held, trigger
from fraudstream.scorers.train import TrainConfig, TrainingError
from fraudstream.streams.autopilot.compare import judge, replay_window
from fraudstream.streams.autopilot.events import (
    ENDINGS,
    KINDS,
    Event,
    publish_event,
    read_events,
    resume,
)
from fraudstream.streams.autopilot.retrain import RetrainConfig, Retrained, retrain
from fraudstream.streams.control.lease import Lease
from fraudstream.streams.control.rollout import codecs_for
from fraudstream.streams.control.topic import latest, publish
from fraudstream.streams.processes import run_stoppable
from fraudstream.streams.replay.engine import REPLAY_HEADER
from fraudstream.streams.replay.ranges import Bound, ReplayError
from fraudstream.streams.settings import Settings
from fraudstream.streams.topics import offsets_at, read_since

log = logging.getLogger("fraudstream.autopilot")
BY = "autopilot"
PHASES = ("idle", "training", "shadow", "canary")


class LeaseLost(Exception):
    """Another autopilot holds the lease now: this one must not publish what it made."""


class ChampionChanged(RuntimeError):
    """The active version changed (by hand) since the challenger was judged against it."""


class AutopilotMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry or CollectorRegistry()
        self.events = Counter("fraudstream_autopilot_events", "Autopilot events published, "
                              "by kind.", ["kind"], registry=r)
        for kind in KINDS:
            self.events.labels(kind)
        self.phase = Gauge("fraudstream_autopilot_phase", "1 for the phase the autopilot is "
                           "in (idle, training, shadow, canary).", ["phase"], registry=r)
        self.evidence = Gauge("fraudstream_autopilot_evidence", "Since the last training: "
                              "drift events at the trigger severity, learner error rises, "
                              "labels, fraud labels.", ["kind"], registry=r)
        self.quality = Gauge("fraudstream_autopilot_quality", "The last comparison's "
                             "measures on the replayed window, per side.",
                             ["side", "measure"], registry=r)
        self.training_seconds = Gauge("fraudstream_autopilot_training_seconds",
                                      "How long the last training took.", registry=r)
        self.lease = Gauge("fraudstream_autopilot_lease_held", "1 on the autopilot that "
                           "acts, 0 on a standby replica.", registry=r)

    def set_phase(self, phase: str) -> None:
        for p in PHASES:
            self.phase.labels(p).set(1.0 if p == phase else 0.0)


class EvidenceReader:
    """``drift`` and ``labels`` from a Kafka time on, counted as they arrive."""

    def __init__(self, settings: Settings, codecs: Codecs, since_ms: int,
                 champion: Callable[[], str | None]) -> None:
        self.settings, self.codecs, self.champion = settings, codecs, champion
        self.evidence = Evidence(since_ms)
        self.consumer = Consumer({**settings.kafka.consumer_config(
            f"{settings.worker.app_id}-autopilot-{time.time_ns()}"), "enable.auto.commit": False})
        t = settings.topics
        parts = []
        for topic in (t.drift, t.labels):
            meta = self.consumer.list_topics(topic, timeout=10).topics.get(topic)
            if meta is None or meta.error is not None:
                continue
            start = offsets_at(self.consumer, topic, sorted(meta.partitions), since_ms)
            parts += [TopicPartition(topic, p, o) for p, o in start.items()]
        self.consumer.assign(parts)

    def poll(self) -> Evidence:
        t = self.settings.topics
        avro = self.settings.codec.input_format == "avro"
        ev = self.evidence
        until = time.monotonic() + 2.0  # a steady stream never ends: read for 2 s at most
        while time.monotonic() < until:
            msgs = self.consumer.consume(1000, 0.2)
            if not msgs:
                break
            champion = self.champion()
            for m in msgs:
                if m.error() is not None or m.timestamp()[1] < ev.since_ms:
                    continue
                try:
                    if m.topic() == t.labels:
                        ev.labels += 1
                        if avro:
                            ev.frauds += bool(self.codecs.label.decode(m.value())["is_fraud"])
                        continue
                    d = self.codecs.drift_event.decode(m.value())
                except Exception:  # an unreadable record counts for nothing
                    continue
                if d["feature"] == "online_error" and d["statistic"] == "adwin":
                    ev.error_rises += d["severity"] == "warning"
                elif d["model_version"] == champion:
                    ev.drift[d["severity"]] = ev.drift.get(d["severity"], 0) + 1
        return ev

    def close(self) -> None:
        self.consumer.close()


class Autopilot:
    def __init__(self, settings: Settings, metrics: AutopilotMetrics | None = None,
                 clock: Callable[[], float] = time.time, lease: Lease | None = None) -> None:
        self.settings = settings
        #: Held by one autopilot among replicas: only that one resumes and acts (None:
        #: this one always does).
        self.lease = lease
        self.a = settings.autopilot
        self.policy = Policy.of(self.a)
        self.codecs = codecs_for(settings)
        self.metrics = metrics or AutopilotMetrics()
        self.clock = clock
        self.models_dir = self.a.models_dir
        self.models_dir.mkdir(parents=True, exist_ok=True)
        self.state = resume([])
        self.reader: EvidenceReader | None = None
        self._champion: tuple[float, str | None] = (0.0, None)
        #: With no training on record, evidence counts from the autopilot's start.
        self._t0 = self._now()
        #: Set to stop: a training under way is ended (see :meth:`run`).
        self._stop = threading.Event()
        #: The offset of this autopilot's last "started" event, in each event it writes.
        self._term: int | None = None

    # ------------------------------------------------------------------ the loop
    def run(self, stop: threading.Event) -> None:
        self._stop = stop
        recovered = False
        while not stop.is_set():
            if self.lease is not None and not self.lease.held:
                # A standby: it resumes from the events once it holds the lease, where
                # the holder before it left off.
                self.metrics.lease.set(0.0)
                self._close_reader()
                recovered = False
                self.lease.wait(1.0)
                continue
            self.metrics.lease.set(1.0)
            if not recovered:
                try:
                    self._recover()
                    recovered = True
                except (KafkaException, RuntimeError) as exc:
                    log.warning("autopilot: %s; trying again in 5 s", exc)
                    stop.wait(5.0)
                continue
            try:
                self.turn()
            except LeaseLost as exc:
                log.warning("autopilot: %s; standing by", exc)
                continue
            except (KafkaException, RuntimeError, LookupError) as exc:
                log.warning("autopilot: %s; trying again in 5 s", exc)
                self._close_reader()
                stop.wait(5.0)
            except Exception:  # never a dead autopilot: say what, then go on
                log.exception("autopilot: a turn failed; trying again in 5 s")
                self._close_reader()
                stop.wait(5.0)
            stop.wait(self.a.poll_s)
        self._close_reader()

    def _recover(self) -> None:
        self.state = s = resume(read_events(self.settings))
        what = {"phase": s.phase, "version": s.version}
        # "started" first: its offset is this autopilot's term, which fences out what one
        # that lost the lease still writes (see events.py)
        started = self._emit("started", f"resuming the {s.phase} phase" + (
            f" of {s.version}" if s.version else ""), version=s.version, details=what)
        self._term = started.offset
        if s.interrupted is not None:
            self._emit("training_failed", "interrupted: the autopilot stopped during a "
                       "training or its comparison", version=None if s.interrupted == "-"
                       else s.interrupted)
            s.training_failed_at = self._now()
        self.metrics.set_phase(s.phase)

    def turn(self) -> None:
        s = self.state
        if s.phase == "shadow":
            self._shadow_turn()
        elif s.phase == "canary":
            self._canary_turn()
        else:
            self._idle_turn()

    def _now(self) -> int:
        return int(self.clock() * 1000)

    def champion(self) -> str | None:
        """The active version on the control topic (read at most every 2 s)."""
        at, version = self._champion
        if time.monotonic() - at > 2.0:
            state = latest(self.settings, "model")
            version = state.document.get("active") if state is not None else None
            self._champion = (time.monotonic(), version)
        return version

    def _emit(self, kind: str, reason: str, **fields: Any) -> Event:
        fields.setdefault("champion", self.champion())
        event = publish_event(self.settings, Event(
            kind, self._now(), reason, term=None if kind == "started" else self._term,
            **fields))
        self.metrics.events.labels(kind).inc()
        log.warning("autopilot: %s%s: %s", kind,
                    f" {event.version}" if event.version else "", reason)
        return event

    def _close_reader(self) -> None:
        if self.reader is not None:
            self.reader.close()
            self.reader = None

    # ------------------------------------------------------------------ idle
    def _idle_turn(self) -> None:
        s = self.state
        since = s.last_training_at if s.last_training_at is not None else self._t0
        if self.reader is None or self.reader.evidence.since_ms != since:
            self._close_reader()
            self.reader = EvidenceReader(self.settings, self.codecs, since, self.champion)
        ev = self.reader.poll()
        for kind, value in (("drift", ev.drift_at_or_above(self.policy.drift_severity)),
                            ("learner_error", ev.error_rises), ("labels", ev.labels),
                            ("frauds", ev.frauds)):
            self.metrics.evidence.labels(kind).set(value)
        now = self._now()
        fired = trigger(self.policy, ev, now)
        if fired is None or self.champion() is None:
            return
        why_not = held(self.policy, Pause(s.rollout_ended_at, s.training_failed_at), now)
        if why_not is not None:
            return  # the guards hold it back: the trigger fires again after the pause
        self._emit("trigger", fired[1], details={"trigger": fired[0], **ev.as_dict()})
        self._train(fired[0])

    def _train(self, why: str) -> None:
        s, a = self.state, self.a
        champion = self.champion()
        end = self._now() - int(a.label_wait_s * 1000)
        start = end - int(a.window_s * 1000)
        labels = self._labels_since(start)
        if labels < self.policy.min_labels:
            self._emit("skipped", f"{labels:,} labels in the training window, below the "
                       f"minimum {self.policy.min_labels:,}")
            s.training_failed_at = s.last_training_at = self._now()
            return
        self.metrics.set_phase("training")
        started = self._emit("training_started", f"{why}: training on {a.window_s:g} s "
                             f"ending {a.label_wait_s:g} s ago",
                             details={"window_from": start, "window_to": end})
        s.last_training_at = started.at
        try:
            done = run_stoppable(retrain, (self.settings, RetrainConfig(
                start=Bound("time", start), end=Bound("time", end),
                train=TrainConfig(valid_frac=a.valid_frac, test_frac=a.test_frac,
                                  trees=a.trees, genuine_sample=a.genuine_sample)),
                self.models_dir), self._stop)
            self.metrics.training_seconds.set(done.seconds)
            self._emit("trained", f"{done.seconds:.1f} s, {done.meta['data']['transactions']:,}"
                       f" transactions, {done.frauds_learned} fraud labels learned",
                       version=done.version, details={
                           "windows": done.meta["windows"],
                           "test": done.meta["metrics"]["test"],
                           "not_used": dict(done.errors)})
            self._compare(done, champion)
        except LeaseLost:
            raise  # not a failed training: another autopilot acts now
        except (TrainingError, ReplayError, RuntimeError, OSError) as exc:
            s.training_failed_at = self._now()
            self._emit("training_failed", " ".join(str(exc).split()))
        except Exception as exc:
            s.training_failed_at = self._now()
            self._emit("training_failed", f"{type(exc).__name__}: {exc}",
                       details={"traceback": traceback.format_exc()[-2000:]})
        finally:
            if self.state.phase == "idle":
                self.metrics.set_phase("idle")

    def _labels_since(self, start_ms: int) -> int:
        """Labels on the topic from ``start_ms`` (Kafka time) on, from the offsets."""
        topic = self.settings.topics.labels
        c = Consumer({**self.settings.kafka.consumer_config(
            f"{self.settings.worker.app_id}-autopilot-count"), "enable.auto.commit": False})
        try:
            meta = c.list_topics(topic, timeout=10).topics.get(topic)
            if meta is None or meta.error is not None:
                return 0
            parts = sorted(meta.partitions)
            ends = {p: c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
                    for p in parts}
            first = offsets_at(c, topic, parts, start_ms, ends)
            return sum(ends[p] - first[p] for p in parts)
        finally:
            c.close()

    def _compare(self, done: Retrained, champion: str | None) -> None:
        s = self.state
        assert champion is not None
        result = replay_window(self.settings, self.models_dir, champion, done.version,
                               done.meta, self._stop)
        verdict, counts = judge(self.policy, result, done.frauds_learned)
        for side in ("champion", "challenger"):
            for measure, value in verdict.figures[side].items():
                self.metrics.quality.labels(side, measure).set(value)
        details = {**verdict.figures, "replay": counts}
        if not verdict.accepted:
            s.rollout_ended_at = self._now()
            self._emit("rejected", "; ".join(verdict.reasons), version=done.version,
                       details=details)
            return
        self._emit("accepted", f"beats {champion} on the replayed window", version=done.version,
                   details=details)
        try:
            self._publish_models(f"autopilot: {done.version} in shadow", shadow=done.version,
                                 champion=champion)
        except ChampionChanged as exc:
            s.rollout_ended_at = self._now()
            self._emit("rejected", str(exc), version=done.version)
            return
        event = self._emit("shadow_started", f"for {self.a.shadow_s:g} s on every worker",
                           version=done.version)
        s.phase, s.version, s.champion, s.phase_at = "shadow", done.version, champion, event.at
        self.metrics.set_phase("shadow")

    # ------------------------------------------------------------------ shadow, canary
    def _still_acting(self) -> None:
        """Before a change workers act on: a lease lost meanwhile (during a training)
        stops this turn (:class:`LeaseLost`, past the training's own error handling);
        the holder now resumes from the events."""
        if self.lease is not None and not self.lease.held:
            raise LeaseLost("the lease was lost during this turn: nothing published")

    def _publish_models(self, reason: str, shadow: str | None, champion: str | None = None,
                        unless: str | None = None) -> None:
        """The model state in force with ``shadow`` as its shadow version, made from that
        state and fenced (a change published meanwhile supersedes this one: a RuntimeError,
        and the turn is tried again). With ``champion``: only while it is still the active
        version (else :class:`ChampionChanged`). With ``unless``: nothing when the shadow
        in force is no longer that version (someone replaced it)."""
        self._still_acting()
        head = latest(self.settings, "model")
        doc = dict(head.document) if head is not None else {"active": None, "shadow": None}
        if champion is not None and doc.get("active") != champion:
            raise ChampionChanged(f"the active version is now {doc.get('active')}, not "
                                  f"{champion} it was judged against")
        if unless is not None and doc.get("shadow") != unless:
            return
        doc["shadow"] = shadow
        publish(self.settings, ControlRecord.make(
            "model", str(doc["active"]), doc, BY, self._now(), reason).after(head))

    def _shadow_turn(self) -> None:
        s, a = self.state, self.a
        if self._now() - s.phase_at < a.shadow_s * 1000:
            return
        assert s.version is not None and s.champion is not None
        made, fallbacks = self._shadow_decisions(s.version, s.phase_at)
        limit = self.settings.canary.max_fallback_delta
        why = None
        if made < a.min_shadow_decisions:
            why = f"shadow: {made} decisions in {a.shadow_s:g} s, below {a.min_shadow_decisions}"
        elif fallbacks / made > limit:
            why = f"shadow: {fallbacks} of {made} decisions fell back, above {limit:.1%}"
        self._publish_models(f"autopilot: {s.version} out of shadow", shadow=None,
                             unless=s.version)
        if why is not None:
            s.rollout_ended_at = self._now()
            self._emit("rejected", why, version=s.version, champion=s.champion)
            self._to_idle()
            return
        self._start_canary(s.version, made, fallbacks)

    def _shadow_decisions(self, version: str, since_ms: int) -> tuple[int, int]:
        """(decisions, fallbacks) of ``version`` on decisions.shadow from ``since_ms`` to
        now."""
        topic = self.settings.topics.decisions_shadow
        c = Consumer({**self.settings.kafka.consumer_config(
            f"{self.settings.worker.app_id}-autopilot-shadow"), "enable.auto.commit": False})
        made = fallbacks = 0
        try:
            meta = c.list_topics(topic, timeout=10).topics.get(topic)
            if meta is None or meta.error is not None:
                return 0, 0
            for m in read_since(c, topic, sorted(meta.partitions), since_ms,
                                self.settings.kafka.embedded, idle_s=1.0):
                if any(k == REPLAY_HEADER for k, _ in (m.headers() or [])):
                    continue
                d = self.codecs.decision.decode(m.value())
                if d["model_version"] == version:
                    made += 1
                    fallbacks += bool(d["fallback"])
        finally:
            c.close()
        return made, fallbacks

    def _start_canary(self, version: str, made: int, fallbacks: int) -> None:
        from fraudstream.streams.cli.canary import gates_of, parse_steps, start

        self._still_acting()
        s, c = self.state, self.settings.canary
        steps = parse_steps(self.a.canary_steps or c.steps, c.step_duration_s)
        try:
            code = start(self.settings, Registry(self.models_dir), version, steps,
                         gates_of(self.settings), BY, f"autopilot: {version} after shadow")
        except CanaryError as exc:
            code, reason = 2, str(exc)
        else:
            reason = f"exit code {code}"
        if code != 0:
            s.rollout_ended_at = self._now()
            self._emit("rejected", f"the canary could not start: {reason}", version=version,
                       champion=s.champion)
            self._to_idle()
            return
        event = self._emit("canary_started", f"shadow made {made} decisions, {fallbacks} "
                           f"fell back; steps {', '.join(f'{x.share:.0%}' for x in steps)}",
                           version=version, champion=s.champion)
        s.phase, s.phase_at = "canary", event.at
        self.metrics.set_phase("canary")

    def _canary_turn(self) -> None:
        s = self.state
        record = latest(self.settings, "canary")
        if record is None:
            return
        try:
            rollout = Rollout.from_document(record.document)
        except CanaryError:
            return
        if rollout.version != s.version:
            started = rollout.rollout.rsplit("@", 1)[-1]
            if started.isdigit() and int(started) > s.phase_at:
                # another rollout was started over ours (by hand): ours is over
                s.rollout_ended_at = self._now()
                self._emit("aborted", f"rollout {rollout.rollout} of {rollout.version} "
                           "replaced it", version=s.version, champion=s.champion)
                self._to_idle()
            return
        if rollout.status == "running":
            return
        kind = {"promoted": "promoted", "rolled_back": "rolled_back"}.get(rollout.status,
                                                                           "aborted")
        assert kind in ENDINGS
        s.rollout_ended_at = self._now()
        self._emit(kind, record.reason, version=s.version, champion=s.champion,
                   details={"verdict": rollout.verdict})
        self._to_idle()

    def _to_idle(self) -> None:
        s = self.state
        s.phase, s.version = "idle", None
        self.metrics.set_phase("idle")
