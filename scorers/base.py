"""The scorer contract every stage of the scoring cascade speaks.

A scorer turns a batch of transaction events (plus, optionally, the velocity features
computed for each of them) into one :class:`Score` per event, in the same order. Rules,
the ONNX ensemble and the River online learners all sit behind the one :class:`Scorer`
protocol, so the cascade, shadow mode and offline replay can treat them alike.

Batch-first on purpose: the stream hands scorers whole fetched batches, so per-call
overhead is paid once per batch, not once per event.

Nothing here imports Faust, Kafka or Prometheus (see STYLE.md): scorers run unchanged in
unit tests and in offline replay.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol, runtime_checkable

__all__ = [
    "Event",
    "Features",
    "Outcome",
    "Score",
    "Scorer",
    "ScorerError",
    "Thresholds",
]

Event = Mapping[str, Any]
"""One decoded transaction (see schemas/transaction.avsc), field name -> value."""

Features = Mapping[str, float]
"""Velocity features computed for one event, feature name -> value."""


class Outcome(StrEnum):
    """The decision published for a transaction. Compares equal to its string value."""

    APPROVE = "approve"
    REVIEW = "review"
    DECLINE = "decline"

    @property
    def rank(self) -> int:
        """Severity: approve 0 < review 1 < decline 2 (to pick the most severe outcome)."""
        return _RANK[self]


_RANK = {Outcome.APPROVE: 0, Outcome.REVIEW: 1, Outcome.DECLINE: 2}


class ScorerError(Exception):
    """Root of the errors raised by scorers (bad configuration, bad model files...)."""


@dataclass(frozen=True, slots=True)
class Thresholds:
    """Cut points that map a score in [0, 1] to an outcome.

    ``score >= decline`` -> decline; ``score >= review`` -> review; otherwise approve.
    Requires ``0 < review <= decline <= 1``.
    """

    review: float
    decline: float

    def __post_init__(self) -> None:
        if not 0.0 < self.review <= self.decline <= 1.0:
            raise ValueError(
                f"thresholds must satisfy 0 < review <= decline <= 1, "
                f"got review={self.review}, decline={self.decline}"
            )

    def outcome(self, score: float) -> Outcome:
        """The outcome for ``score``."""
        if score >= self.decline:
            return Outcome.DECLINE
        if score >= self.review:
            return Outcome.REVIEW
        return Outcome.APPROVE


@dataclass(slots=True)
class Score:
    """One scorer's verdict on one event.

    - ``score``: risk in [0, 1], higher is riskier.
    - ``outcome``: the decision this scorer recommends.
    - ``reasons``: reason codes (e.g. rule ids), most important first; empty when
      nothing in particular stood out.
    - ``hard``: True when a guardrail (a blocklist, a rule with an ``action``) set the
      outcome. The outcome is then a floor: later stages of the cascade may make it more
      severe (review -> decline) but must never lower it.
    """

    score: float
    outcome: Outcome
    reasons: list[str] = field(default_factory=list)
    hard: bool = False


@runtime_checkable
class Scorer(Protocol):
    """What every scorer implements.

    ``version`` names the scorer and its configuration or model (e.g.
    ``"rules@2026.11.1"``); it goes into every decision so a decision can be traced back
    to what produced it.
    """

    version: str

    def score_batch(
        self,
        events: Sequence[Event],
        features: Sequence[Features] | None = None,
    ) -> list[Score]:
        """Score ``events``; return exactly one :class:`Score` per event, in order.

        ``features``, when given, is aligned with ``events`` (same length, same order).
        Must not raise for an event that conforms to the transaction schema.
        """
        ...

    def learn_batch(self, features: Sequence[Features], labels: Sequence[int]) -> None:
        """Learn from labelled examples (label 1 = fraud, 0 = genuine).

        A no-op for scorers that do not learn online.
        """
        ...
