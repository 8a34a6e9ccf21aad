"""Closed-loop retraining: when to retrain, and whether a challenger may replace the
champion. Pure decisions over counts and measures; ``fraudstream autopilot``
(:mod:`fraudstream.streams.autopilot.loop`) gathers them from the topics and acts.

**Triggers** (:func:`trigger`), whichever comes first, counted since the last training
started:

- ``schedule``: ``interval_s`` since then (the first time: since the autopilot started
  with no training on record);
- ``drift``: ``drift_events`` drift events of the champion in force at ``drift_severity``
  or above (the workers' PSI and Jensen-Shannon monitors);
- ``learner_error``: ``error_rises`` times the online learners' error rose (their ADWIN
  detectors' ``warning`` events on ``online_error``): the labels stopped looking like what
  was learned;
- ``labels``: ``new_labels`` labels arrived.

**Guards**, checked before a trigger may start a training: none while another training or
a rollout runs (the caller holds one at a time); ``cooldown_s`` after a rollout ended;
``failure_backoff_s`` after a failed training (never a tight loop of failures);
``min_labels`` labels in the window. After training, :func:`compare` rejects a challenger
that learned from fewer than ``min_frauds`` fraud labels.

**Promotion** (:func:`compare`) on the held-out window replayed through both: average
precision and card precision@100/day at least ``margin_ap`` and ``margin_card_precision``
above the champion's, and the share of labelled-genuine transactions declined at most
``max_false_decline_increase`` above (no worse at the decline threshold).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

SEVERITIES = ("info", "warning", "critical")
TRIGGERS = ("schedule", "drift", "learner_error", "labels")


@dataclass(frozen=True)
class Policy:
    """The fields of the same name of the settings' autopilot section (their defaults
    and meanings: ``FRAUDSTREAM_AUTOPILOT_*``)."""

    interval_s: float
    drift_severity: str
    drift_events: int
    error_rises: int
    new_labels: int
    min_labels: int
    min_frauds: int
    cooldown_s: float
    failure_backoff_s: float
    margin_ap: float
    margin_card_precision: float
    max_false_decline_increase: float

    def __post_init__(self) -> None:
        if self.drift_severity and self.drift_severity not in SEVERITIES:
            raise ValueError(f"drift_severity {self.drift_severity!r}: one of {SEVERITIES} "
                             "or empty")

    @classmethod
    def of(cls, settings: Any) -> Policy:
        """The policy of an ``AutopilotSettings``."""
        return cls(**{f: getattr(settings, f) for f in cls.__dataclass_fields__})


@dataclass
class Evidence:
    """What happened since the last training started."""

    since_ms: int
    #: Drift events of the champion in force, by severity.
    drift: dict[str, int] = field(default_factory=dict)
    error_rises: int = 0
    labels: int = 0
    frauds: int = 0

    def drift_at_or_above(self, severity: str) -> int:
        if not severity:
            return 0
        return sum(n for s, n in self.drift.items()
                   if s in SEVERITIES and SEVERITIES.index(s) >= SEVERITIES.index(severity))

    def as_dict(self) -> dict[str, Any]:
        return {"since_ms": self.since_ms, "drift": dict(self.drift),
                "error_rises": self.error_rises, "labels": self.labels,
                "frauds": self.frauds}


@dataclass(frozen=True)
class Pause:
    """Times of the last events the guards look at (epoch ms; None: never)."""

    rollout_ended_at: int | None = None
    training_failed_at: int | None = None


def trigger(policy: Policy, evidence: Evidence, now_ms: int) -> tuple[str, str] | None:
    """(trigger, why) when one fired, else None."""
    if policy.drift_severity and policy.drift_events > 0:
        n = evidence.drift_at_or_above(policy.drift_severity)
        if n >= policy.drift_events:
            return "drift", (f"{n} drift events at {policy.drift_severity} or above since "
                             "the last training")
    if policy.error_rises > 0 and evidence.error_rises >= policy.error_rises:
        return "learner_error", (f"the online learners' error rose {evidence.error_rises} "
                                 "times since the last training")
    if policy.new_labels > 0 and evidence.labels >= policy.new_labels:
        return "labels", f"{evidence.labels:,} new labels since the last training"
    if policy.interval_s > 0 and now_ms - evidence.since_ms >= policy.interval_s * 1000:
        return "schedule", f"{policy.interval_s:g} s since the last training"
    return None


def held(policy: Policy, pause: Pause, now_ms: int) -> str | None:
    """Why no training may start now, or None."""
    if pause.rollout_ended_at is not None and \
            now_ms - pause.rollout_ended_at < policy.cooldown_s * 1000:
        left = (pause.rollout_ended_at + policy.cooldown_s * 1000 - now_ms) / 1000
        return f"cool-down after the last rollout: {left:.0f} s left"
    if pause.training_failed_at is not None and \
            now_ms - pause.training_failed_at < policy.failure_backoff_s * 1000:
        left = (pause.training_failed_at + policy.failure_backoff_s * 1000 - now_ms) / 1000
        return f"back-off after a failed training: {left:.0f} s left"
    return None


@dataclass(frozen=True)
class Side:
    """One model's measures on the replayed window."""

    average_precision: float
    card_precision: float
    auc_roc: float
    #: Labelled-genuine transactions declined, as a share of them.
    false_decline_rate: float


@dataclass(frozen=True)
class Verdict:
    accepted: bool
    reasons: tuple[str, ...]
    figures: dict[str, Any]


def compare(policy: Policy, champion: Side, challenger: Side, frauds_learned: int
            ) -> Verdict:
    """Whether the challenger may go to shadow and canary; every failed condition is a
    reason."""
    reasons = []
    if frauds_learned < policy.min_frauds:
        reasons.append(f"trained on {frauds_learned} fraud labels, below the minimum "
                       f"{policy.min_frauds}")
    ap = challenger.average_precision - champion.average_precision
    if not ap >= policy.margin_ap:
        reasons.append(f"average precision {challenger.average_precision:.4f} against the "
                       f"champion's {champion.average_precision:.4f}: {ap:+.4f}, needs "
                       f"{policy.margin_ap:+.4f}")
    cp = challenger.card_precision - champion.card_precision
    if not cp >= policy.margin_card_precision:
        reasons.append(f"card precision@100/day {challenger.card_precision:.4f} against the "
                       f"champion's {champion.card_precision:.4f}: {cp:+.4f}, needs "
                       f"{policy.margin_card_precision:+.4f}")
    fd = challenger.false_decline_rate - champion.false_decline_rate
    if not fd <= policy.max_false_decline_increase:
        reasons.append(f"declines {challenger.false_decline_rate:.2%} of labelled-genuine "
                       f"transactions against the champion's "
                       f"{champion.false_decline_rate:.2%}: {fd:+.4f}, at most "
                       f"{policy.max_false_decline_increase:+.4f}")
    figures = {"champion": champion.__dict__, "challenger": challenger.__dict__,
               "frauds_learned": frauds_learned}
    return Verdict(not reasons, tuple(reasons), figures)
