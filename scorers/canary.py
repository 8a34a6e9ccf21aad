"""Canary rollouts: which cards a canary version serves, and the gates that judge it.

A rollout moves a version from a small share of cards to all of them in steps (5% -> 25%
-> 50% -> 100% by default), each held for a duration and judged against the champion on
the same step's live traffic. Its state is one document on the control topic (key
``canary``), published by ``fraudstream model canary`` and then by the rollout controller
as it moves; every worker serves what the latest one says.

**Who is in the canary.** A card is in the canary when its bucket, a stable hash of its
card_id (blake2b, 10,000 buckets), is below the step's share of them. The bucket never
changes, so a card sees one version within a step, and a card in the canary at 5% stays
in it at 25%: shares only grow. Every worker computes the same split, whatever partitions
it holds, so a rebalance moves no card between variants.

**The gates**, per variant over one step's decisions (:func:`judge`), each one of
``pass``, ``fail`` or ``wait`` (not enough evidence to judge yet):

- ``fallback``: the canary's fallback rate (its model failed, stalled, or gave no score
  and the champion or the rules decided) may exceed the champion's by ``max_fallback_delta``;
- ``latency``: the canary's model-stage p99 over the step's batches may be at most
  ``max_latency_ratio`` times the champion's, or ``latency_slack_ms`` above it, whichever
  is more (both score the same batches: the comparison is fair on a noisy machine). It
  waits until each variant has ``min_batches`` batch timings: the p99 of fewer is their
  maximum, and one batch that met a busy core or a collector pause would roll a good
  canary back;
- ``decline_rate`` and ``review_rate``: the share of the canary's cards it declined (or
  reviewed) at least once in the step may differ from the champion's by ``max_rate_delta``
  (absolute) unless the difference is within ``rate_z`` standard errors (a two-proportion
  z-test). Cards, the unit the split assigns: a card-testing burst of 20 declines on one
  card is one declined card, not 20 independent declines;
- ``psi``: the population stability index of the canary's scores against the champion's
  (bins at the champion's deciles, at least 0.01 wide) at most ``max_psi``;
- ``precision_review`` and ``precision_decline``: the share of the cards the canary
  reviewed-or-declined (and declined) with a fraud labelled so far may be below the
  champion's by ``max_precision_drop`` unless within ``rate_z`` standard errors. These two
  judge every decision of the rollout so far, from its first step, not the step's only:
  a step's labels come days after its decisions, so a later step sees the frauds of
  the earlier ones (:class:`Flagged`, ``labelled`` in :func:`judge`). Cards, not
  transactions: the split assigns cards, and one compromised card's burst is one piece of
  evidence, not fifty. Labels
  arrive days late (chargebacks; an unlabelled transaction is not known genuine yet), and
  arrive at the same pace for both variants of a step, so the two shares compare while
  both are still incomplete. The gates wait until ``min_labelled`` flagged cards have a
  fraud labelled (and each variant flagged 30 cards); waiting does not hold a step.

No gate judges before each variant has ``min_decisions`` decisions in the step. A gate
that fails rolls the rollout back at once; a step ends when its duration is over, each
variant has ``min_decisions``, and no gate fails. Passing the last step below 100%
promotes the canary (at 100% there is no champion traffic left to judge it against).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

BUCKETS = 10_000
STATUSES = ("running", "promoted", "rolled_back", "aborted")
CHAMPION, CANARY = "champion", "canary"
#: Flagged cards a variant needs before its precision is judged.
MIN_FLAGGED = 30


class CanaryError(ValueError):
    """A rollout document that cannot be applied; the message says why."""


def bucket(card_id: str) -> int:
    """The card's stable bucket in [0, BUCKETS)."""
    digest = hashlib.blake2b(card_id.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % BUCKETS


def in_canary(card_ids: Iterable[str], share: float) -> np.ndarray:
    """Per card: served by the canary at ``share`` (0..1) of the buckets."""
    cut = round(share * BUCKETS)
    return np.fromiter((bucket(c) < cut for c in card_ids), dtype=bool)


@dataclass(frozen=True)
class Gates:
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


@dataclass(frozen=True)
class Step:
    share: float
    duration_s: float


@dataclass(frozen=True)
class Rollout:
    """A rollout's state, as the control topic carries it."""

    rollout: str  # its id: the version and when it started
    version: str
    champion: str
    steps: tuple[Step, ...]
    gates: Gates
    step: int = 0
    step_started_at: int = 0  # epoch ms
    status: str = "running"
    #: Why it ended (or the last step's gate results): set by the controller.
    verdict: dict[str, Any] | None = None
    #: When its first step started (epoch ms; 0 in a rollout published before this
    #: field: its current step's start stands in).
    started_at: int = 0

    @property
    def began(self) -> int:
        """Where its decisions start: what the precision gates judge from."""
        return self.started_at or self.step_started_at

    @property
    def share(self) -> float:
        """The share of cards the canary serves now: the step's while running, none once
        it ended. Promoted, it serves every card as the active version (the model state
        published with the promotion), not as a canary."""
        return self.steps[self.step].share if self.status == "running" else 0.0

    @property
    def last_judged(self) -> int:
        """Index of the last step that is judged: the last one below 100%."""
        return max(i for i, s in enumerate(self.steps) if s.share < 1.0)

    def moved(self, at_ms: int, **changes: Any) -> Rollout:
        return replace(self, step_started_at=at_ms, **changes)

    def to_document(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["steps"] = [asdict(s) for s in self.steps]
        return doc

    @classmethod
    def from_document(cls, doc: Any) -> Rollout:
        if not isinstance(doc, dict):
            raise CanaryError("a rollout is a JSON object")
        try:
            steps = tuple(Step(float(s["share"]), float(s["duration_s"]))
                          for s in doc["steps"])
            gates = Gates(**doc.get("gates", {}))
            r = cls(rollout=str(doc["rollout"]), version=str(doc["version"]),
                    champion=str(doc["champion"]), steps=steps, gates=gates,
                    step=int(doc["step"]), step_started_at=int(doc["step_started_at"]),
                    status=str(doc["status"]), verdict=doc.get("verdict"),
                    started_at=int(doc.get("started_at", 0)))
        except (KeyError, TypeError, ValueError) as exc:
            raise CanaryError(f"a rollout needs rollout, version, champion, steps "
                              f"(share, duration_s), step, step_started_at, status: {exc}"
                              ) from None
        check_steps(r.steps)
        if r.status not in STATUSES:
            raise CanaryError(f"status {r.status!r}: expected one of {list(STATUSES)}")
        if not 0 <= r.step < len(r.steps):
            raise CanaryError(f"step {r.step} of {len(r.steps)}")
        if r.version == r.champion:
            raise CanaryError(f"the canary {r.version} is the champion")
        return r


def check_steps(steps: Sequence[Step]) -> None:
    """Shares that grow, in (0, 1], ending at 1 with at least one step below it; durations
    of at least 0 s."""
    if not steps or steps[-1].share != 1.0:
        raise CanaryError("the last step must be 100% (the promotion)")
    shares = [s.share for s in steps]
    if any(not 0.0 < s <= 1.0 for s in shares) or shares != sorted(set(shares)):
        raise CanaryError(f"shares must grow, each in (0, 100%]: {shares}")
    if len(steps) < 2:
        raise CanaryError("a canary needs a step below 100% to be judged")
    if any(not s.duration_s >= 0 for s in steps):
        raise CanaryError("a step's duration must be at least 0 s")


@dataclass
class Flagged:
    """The decisions a variant flagged (reviewed or declined) and their labels so far: what
    the precision gates judge."""

    #: transaction_id -> (card_id, declined?), for the decisions it flagged (review or
    #: decline), up to ``flagged_cap`` of them (a rollout's worth, in practice: the
    #: labels of those kept still arrive).
    flagged: dict[str, tuple[str, bool]] = field(default_factory=dict)
    #: transaction_id -> is_fraud, for flagged decisions whose label arrived.
    labels: dict[str, bool] = field(default_factory=dict)
    flagged_cap: int = 1_000_000

    def flag(self, d: dict[str, Any]) -> None:
        """Keep ``d`` if it flagged its transaction."""
        outcome = d["decision"]
        if outcome in ("review", "decline") and len(self.flagged) < self.flagged_cap:
            self.flagged[d["transaction_id"]] = (d["card_id"], outcome == "decline")

    def label(self, transaction_id: str, is_fraud: bool) -> None:
        if transaction_id in self.flagged:
            self.labels[transaction_id] = is_fraud

    def frauds(self, declines_only: bool) -> tuple[int, int]:
        """(cards with a labelled fraud, cards) among those it reviewed-or-declined (or
        declined): cards, the unit the split assigns, so that a campaign on a few cards
        counts as what it is (a few cards), not as many independent transactions."""
        cards: dict[str, bool] = {}
        for txn, (card, declined) in self.flagged.items():
            if declined or not declines_only:
                cards[card] = cards.get(card, False) or self.labels.get(txn, False)
        return sum(cards.values()), len(cards)


@dataclass
class VariantStats(Flagged):
    """One variant's decisions within a step, as the controller reads them."""

    decisions: int = 0
    fallbacks: int = 0
    reviews: int = 0
    declines: int = 0
    #: Scores of the decisions its model made (for the PSI), and its model-stage ms, one
    #: per batch, kept up to ``cap`` each (a step's traffic at most, in practice).
    scores: list[float] = field(default_factory=list)
    model_ms: list[float] = field(default_factory=list)
    #: card_id -> what it got in the step: 1 a review, 2 a decline (bits).
    cards: dict[str, int] = field(default_factory=dict)
    cap: int = 200_000

    def add(self, d: dict[str, Any], model_ms: float | None) -> None:
        self.decisions += 1
        self.fallbacks += bool(d["fallback"])
        outcome = d["decision"]
        self.reviews += outcome == "review"
        self.declines += outcome == "decline"
        got = {"review": 1, "decline": 2}.get(outcome, 0)
        self.cards[d["card_id"]] = self.cards.get(d["card_id"], 0) | got
        if got:
            self.flag(d)
        if not d["fallback"] and len(self.scores) < self.cap:
            self.scores.append(float(d["score"]))
        if model_ms is not None and len(self.model_ms) < self.cap:
            self.model_ms.append(model_ms)

    def summary(self) -> dict[str, Any]:
        n = max(1, self.decisions)
        return {"decisions": self.decisions, "fallback_rate": self.fallbacks / n,
                "decline_rate": self.declines / n, "review_rate": self.reviews / n,
                "model_p99_ms": _p99(self.model_ms),
                "frauds_flagged": sum(self.labels.values())}


@dataclass(frozen=True)
class GateResult:
    gate: str
    status: str  # pass, fail, wait
    canary: float
    champion: float
    limit: float

    def line(self) -> str:
        return (f"{self.gate} {self.status}: canary {self.canary:.4g}, champion "
                f"{self.champion:.4g}, limit {self.limit:.4g}")


def judge(champion: VariantStats, canary: VariantStats, gates: Gates,
          labelled: tuple[Flagged, Flagged] | None = None) -> list[GateResult]:
    """Every gate's result for one step (see the module's doc): the precision gates on
    ``labelled`` (champion, canary: the rollout's flagged decisions so far) when given,
    else on the step's."""
    nan = math.nan
    names = ("fallback", "latency", "decline_rate", "review_rate", "psi",
             "precision_review", "precision_decline")
    if min(champion.decisions, canary.decisions) < gates.min_decisions:
        return [GateResult(g, "wait", nan, nan, gates.min_decisions) for g in names]
    out = []
    a, b = champion.summary(), canary.summary()
    limit = a["fallback_rate"] + gates.max_fallback_delta
    out.append(GateResult("fallback", _status(b["fallback_rate"] > limit),
                          b["fallback_rate"], a["fallback_rate"], limit))
    if min(len(champion.model_ms), len(canary.model_ms)) >= max(1, gates.min_batches):
        limit = max(a["model_p99_ms"] * gates.max_latency_ratio,
                    a["model_p99_ms"] + gates.latency_slack_ms)
        out.append(GateResult("latency", _status(b["model_p99_ms"] > limit),
                              b["model_p99_ms"], a["model_p99_ms"], limit))
    else:
        out.append(GateResult("latency", "wait", nan, nan, nan))
    na, nb = len(champion.cards), len(canary.cards)
    for name, bit in (("decline_rate", 2), ("review_rate", 1)):
        ka = sum(1 for got in champion.cards.values() if got & bit)
        kb = sum(1 for got in canary.cards.values() if got & bit)
        failed = _differs(ka, na, kb, nb, gates.max_rate_delta, gates.rate_z)
        out.append(GateResult(name, _status(failed), kb / nb, ka / na, gates.max_rate_delta))
    if len(champion.scores) >= gates.min_decisions // 2 and len(canary.scores) >= \
            gates.min_decisions // 2:
        value = psi(np.asarray(champion.scores), np.asarray(canary.scores))
        out.append(GateResult("psi", _status(value > gates.max_psi), value, 0.0,
                              gates.max_psi))
    else:  # most decisions fell back: the fallback gate speaks for them
        out.append(GateResult("psi", "wait", nan, nan, gates.max_psi))
    flagged_a, flagged_b = labelled or (champion, canary)
    for name, declines_only in (("precision_review", False), ("precision_decline", True)):
        fa, na = flagged_a.frauds(declines_only)
        fb, nb = flagged_b.frauds(declines_only)
        pa, pb = fa / max(1, na), fb / max(1, nb)
        if fa + fb < gates.min_labelled or min(na, nb) < MIN_FLAGGED:
            out.append(GateResult(name, "wait", pb, pa, gates.min_labelled))
            continue
        failed = pb < pa and _differs(fa, na, fb, nb, gates.max_precision_drop, gates.rate_z)
        out.append(GateResult(name, _status(failed), pb, pa, pa - gates.max_precision_drop))
    return out


def psi(expected: np.ndarray, actual: np.ndarray, bins: int = 10,
        min_width: float = 0.01) -> float:
    """Population stability index of ``actual`` against ``expected``, on ``expected``'s
    deciles merged until each bin is at least ``min_width`` wide (scores that differ by
    less are one score to a decision: two versions that score the same transactions 0.001
    and 0.003 decide them alike), each share floored at 1e-4."""
    inner: list[float] = []
    for edge in np.quantile(expected, np.linspace(0, 1, bins + 1))[1:-1].tolist():
        if edge - (inner[-1] if inner else 0.0) >= min_width:
            inner.append(edge)
    e = np.bincount(np.searchsorted(inner, expected, side="right"), minlength=len(inner) + 1)
    a = np.bincount(np.searchsorted(inner, actual, side="right"), minlength=len(inner) + 1)
    pe = np.maximum(e / max(1, e.sum()), 1e-4)
    pa = np.maximum(a / max(1, a.sum()), 1e-4)
    return float(np.sum((pa - pe) * np.log(pa / pe)))


def _differs(ka: int, na: int, kb: int, nb: int, max_delta: float, z: float) -> bool:
    """Whether proportion kb/nb differs from ka/na by more than ``max_delta`` and by more
    than ``z`` standard errors (a two-proportion z-test, pooled)."""
    pa, pb = ka / na, kb / nb
    pooled = (ka + kb) / (na + nb)
    se = math.sqrt(max(pooled * (1 - pooled), 1e-12) * (1 / na + 1 / nb))
    return abs(pb - pa) > max_delta and abs(pb - pa) / se > z


def _p99(values: list[float]) -> float:
    return float(np.percentile(values, 99)) if values else math.nan


def _status(failed: bool) -> str:
    return "fail" if failed else "pass"
