"""The autopilot's reading of the topics, on the embedded broker: what counts as evidence
for a trigger (drift of the champion in force only, the learners' error rises, labels and
frauds, nothing from before the last training), and how its wait for a canary ends."""

from __future__ import annotations

import time

import pytest
from confluent_kafka import Producer

from fraudstream.scorers.canary import Gates, Rollout, Step
from fraudstream.scorers.drift import drift_event
from fraudstream.streams.autopilot.events import read_events, resume
from fraudstream.streams.autopilot.loop import Autopilot, EvidenceReader
from fraudstream.streams.control.rollout import publish_rollout
from fraudstream.streams.control.topic import latest
from fraudstream.streams.topics import ensure_topics
from tests.conftest import T0_MS

pytestmark = pytest.mark.e2e


def test_evidence_counts_the_champions_drift_the_learners_error_and_new_labels(
        stack_settings, codecs):
    topics = stack_settings.topics
    ensure_topics(stack_settings)
    since = T0_MS  # the last training started then
    producer = Producer(stack_settings.kafka.client_config())

    def drift(feature, statistic, severity, version, at=None):
        e = drift_event(feature, statistic, 0.5, 0.2, T0_MS, T0_MS, 3000, version, severity)
        producer.produce(topics.drift, key=feature.encode(),
                         value=codecs.drift_event.encode(e), timestamp=at or since + 10)

    drift("amount_ref", "psi", "critical", "v1")
    drift("card_count_1h", "js", "critical", "v1")
    drift("amount_ref", "psi", "warning", "v1")
    drift("amount_ref", "psi", "info", "v1")            # below the severity
    drift("amount_ref", "psi", "critical", "v0")        # another model's monitor
    drift("amount_ref", "psi", "critical", "v1", at=since - 60_000)  # before the training
    drift("online_error", "adwin", "warning", "online-p0")  # the error rose
    drift("online_error", "adwin", "warning", "online-p1")
    drift("online_error", "adwin", "info", "online-p1")     # it fell
    for k in range(5):
        label = {"transaction_id": f"t{k}", "card_id": f"card_{k}", "is_fraud": k < 2,
                 "label_time": T0_MS, "event_time": T0_MS - 1000, "source": "chargeback",
                 "fraud_type": None, "merchant_id": None}
        producer.produce(topics.labels, key=b"c", value=codecs.label.encode(label),
                         timestamp=since + 10)
    assert producer.flush(10) == 0
    reader = EvidenceReader(stack_settings, codecs, since, lambda: "v1")
    try:
        deadline = time.monotonic() + 20
        while (ev := reader.poll()).labels < 5 or ev.error_rises < 2:
            assert time.monotonic() < deadline, ev
        time.sleep(1.0)
        ev = reader.poll()
    finally:
        reader.close()
    assert ev.drift == {"critical": 2, "warning": 1, "info": 1}
    assert ev.drift_at_or_above("warning") == 3 and ev.drift_at_or_above("critical") == 2
    assert (ev.error_rises, ev.labels, ev.frauds) == (2, 5, 2)


def test_the_wait_for_a_canary_ends_with_its_outcome_or_a_rollout_started_over_it(
        stack_settings, tmp_path):
    settings = stack_settings.replace(autopilot={"models_dir": tmp_path / "am"})
    ensure_topics(settings)
    now = T0_MS
    pilot = Autopilot(settings, clock=lambda: now / 1000)

    def rollout(version: str, at: int, status: str = "running") -> Rollout:
        return Rollout(rollout=f"{version}@{at}", version=version, champion="v0",
                       steps=(Step(0.1, 60.0), Step(1.0, 0.0)), gates=Gates(), step=0,
                       step_started_at=at, status=status)

    # waiting for vA's canary: it is promoted
    pilot.state = resume([])
    pilot.state.phase, pilot.state.version, pilot.state.champion = "canary", "vA", "v0"
    pilot.state.phase_at = now
    publish_rollout(settings, rollout("vA", now + 1), "controller", "step 1 running",
                    latest(settings, "canary"))
    pilot.turn()
    assert pilot.state.phase == "canary"  # still running: still waiting
    publish_rollout(settings, rollout("vA", now + 1, "promoted"), "controller",
                    "every step passed: promoted", latest(settings, "canary"))
    pilot.turn()
    assert pilot.state.phase == "idle"
    # waiting for vB's canary: someone starts another rollout by hand
    pilot.state.phase, pilot.state.version, pilot.state.phase_at = "canary", "vB", now + 2
    publish_rollout(settings, rollout("vC", now + 3), "ana@fraud-ops", "by hand",
                    latest(settings, "canary"))
    pilot.turn()
    assert pilot.state.phase == "idle"
    events = read_events(settings)
    assert [(e.kind, e.version) for e in events] == [("promoted", "vA"), ("aborted", "vB")]
    assert events[0].reason == "every step passed: promoted"
    assert "of vC replaced it" in events[1].reason
    assert resume(events).rollout_ended_at == events[1].at  # the cool-down starts there


def test_what_an_autopilot_writes_after_another_took_over_is_not_resumed_from(
        stack_settings, tmp_path):
    # A holder whose lease lapsed mid-turn (a long pause) still believes it acts: the
    # events it writes then must not be what the next takeover resumes from.
    import uuid

    from fraudstream.streams.autopilot.events import superseded
    from fraudstream.streams.cli.autopilot import line

    settings = stack_settings.replace(
        topics={"autopilot": f"fraudstream.autopilot-{uuid.uuid4().hex[:8]}"},
        autopilot={"models_dir": tmp_path / "am"})
    ensure_topics(settings)
    now = T0_MS
    old = Autopilot(settings, clock=lambda: now / 1000)
    old._recover()
    old._emit("training_started", "drift: training")
    new = Autopilot(settings, clock=lambda: (now + 1) / 1000)
    new._recover()  # took the lease: the old one's training counts as interrupted
    assert new.state.interrupted == "-"
    # the old holder goes on as if it still acted
    old._emit("trained", "4.0 s", version="v-stale")
    old._emit("shadow_started", "for 60 s on every worker", version="v-stale")

    events = read_events(settings)
    assert [e.kind for e in events] == ["started", "training_started", "started",
                                        "training_failed", "trained", "shadow_started"]
    assert superseded(events) == [False, False, False, False, True, True]
    r = resume(events)
    assert (r.phase, r.version, r.interrupted) == ("idle", None, None)
    assert "superseded" in line(events[-1], True)
    # the holder now writes in its own term, and is resumed from
    new._emit("shadow_started", "for 60 s on every worker", version="v-new")
    r = resume(read_events(settings))
    assert (r.phase, r.version) == ("shadow", "v-new")
