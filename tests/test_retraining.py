"""The retraining policy (triggers, guards, the promotion rule) and how a restarted
autopilot reads where it stands from its events: pure, no broker."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest

from fraudstream.scorers.retraining import (
    Evidence,
    Pause,
    Policy,
    Side,
    compare,
    held,
    trigger,
)
from fraudstream.streams.autopilot.events import Event, resume
from fraudstream.streams.settings import AutopilotSettings

T0 = 1_767_571_200_000


def policy(**changes) -> Policy:
    return Policy.of(replace(AutopilotSettings(), **changes))


POLICY = policy(interval_s=3600, drift_severity="warning", drift_events=3, error_rises=2,
                new_labels=1000, min_frauds=20, cooldown_s=600, failure_backoff_s=300,
                margin_ap=0.01, margin_card_precision=0.0, max_false_decline_increase=0.001)


def test_each_trigger_fires_on_its_own_count_and_not_below_it():
    quiet = Evidence(T0, drift={"warning": 2, "info": 50}, error_rises=1, labels=999)
    assert trigger(POLICY, quiet, T0 + 3_599_000) is None
    assert trigger(POLICY, Evidence(T0, drift={"critical": 2, "warning": 1}), T0)[0] == "drift"
    assert trigger(POLICY, Evidence(T0, error_rises=2), T0)[0] == "learner_error"
    assert trigger(POLICY, Evidence(T0, labels=1000), T0)[0] == "labels"
    assert trigger(POLICY, Evidence(T0), T0 + 3_600_000)[0] == "schedule"
    # info-level drift never counts at severity "warning"; "" switches drift off
    assert trigger(POLICY, Evidence(T0, drift={"info": 99}), T0) is None
    off = policy(interval_s=0, drift_severity="", error_rises=0, new_labels=0)
    assert trigger(off, Evidence(T0, drift={"critical": 99}, error_rises=99,
                                 labels=10**9), T0 + 10**12) is None


def test_guards_hold_a_trigger_during_the_cool_down_and_the_back_off():
    assert held(POLICY, Pause(), T0) is None
    assert "cool-down" in held(POLICY, Pause(rollout_ended_at=T0), T0 + 599_000)
    assert held(POLICY, Pause(rollout_ended_at=T0), T0 + 600_000) is None
    assert "back-off" in held(POLICY, Pause(training_failed_at=T0), T0 + 299_000)
    assert held(POLICY, Pause(training_failed_at=T0), T0 + 300_000) is None
    with pytest.raises(ValueError, match="drift_severity"):
        policy(drift_severity="loud")


def side(ap: float, cp: float, fd: float = 0.0) -> Side:
    return Side(average_precision=ap, card_precision=cp, auc_roc=0.9, false_decline_rate=fd)


def test_a_challenger_must_beat_the_champion_by_the_margins_and_decline_no_worse():
    champion = side(0.40, 0.10, 0.001)
    assert compare(POLICY, champion, side(0.42, 0.10, 0.001), 50).accepted
    # each failed condition is a reason, in words a fraud analyst reads
    v = compare(POLICY, champion, side(0.405, 0.09, 0.003), 5)
    assert not v.accepted and len(v.reasons) == 4
    assert "trained on 5 fraud labels, below the minimum 20" in v.reasons[0]
    assert "average precision 0.4050 against the champion's 0.4000" in v.reasons[1]
    assert "card precision@100/day" in v.reasons[2]
    assert "labelled-genuine" in v.reasons[3]
    # an unmeasurable window never promotes
    assert not compare(POLICY, champion, side(math.nan, 0.2), 50).accepted


def ev(kind: str, at: int, version: str | None = None) -> Event:
    return Event(kind, T0 + at, "why", version=version, champion="v0")


def test_a_restart_resumes_a_shadow_or_a_canary_and_flags_a_cut_training():
    assert resume([]).phase == "idle" and resume([]).interrupted is None
    canary = resume([ev("trigger", 1), ev("training_started", 2), ev("trained", 3, "v1"),
                     ev("accepted", 4, "v1"), ev("shadow_started", 5, "v1"),
                     ev("canary_started", 6, "v1"), ev("started", 7)])
    assert (canary.phase, canary.version, canary.champion, canary.phase_at) == (
        "canary", "v1", "v0", T0 + 6)
    assert canary.interrupted is None and canary.last_training_at == T0 + 2
    shadow = resume([ev("training_started", 2), ev("trained", 3, "v1"),
                     ev("accepted", 4, "v1"), ev("shadow_started", 5, "v1")])
    assert shadow.phase == "shadow"
    cut = resume([ev("training_started", 2), ev("trained", 3, "v1")])
    assert cut.phase == "idle" and cut.interrupted == "v1"
    done = resume([ev("training_started", 2), ev("trained", 3, "v1"),
                   ev("rejected", 4, "v1")])
    assert done.phase == "idle" and done.interrupted is None and done.rollout_ended_at == T0 + 4
    promoted = resume([ev("canary_started", 6, "v1"), ev("promoted", 9, "v1")])
    assert promoted.phase == "idle" and promoted.rollout_ended_at == T0 + 9
    failed = resume([ev("training_started", 2), ev("training_failed", 3)])
    assert failed.training_failed_at == T0 + 3 and failed.interrupted is None


def test_events_read_back_as_written_and_foreign_records_are_skipped():
    e = Event("rejected", T0, "average precision 0.40 against 0.41", version="v1",
              champion="v0", details={"replay": {"decided": 10}})
    assert Event.decode(e.encode()) == e
    assert Event.decode(b"not json") is None
    assert Event.decode(b'{"kind": "unknown", "at": 1, "reason": ""}') is None
