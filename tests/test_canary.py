"""Canary rollouts, without a broker: which cards the canary serves (a stable split that only
grows), what the decisions say, what a failing canary leaves, and the gates' judgements."""

from __future__ import annotations

import random
from dataclasses import replace

import numpy as np
import pytest

from fraudstream.scorers.canary import (
    BUCKETS,
    CanaryError,
    Gates,
    Rollout,
    Step,
    VariantStats,
    bucket,
    in_canary,
    judge,
    psi,
)
from fraudstream.scorers.cascade import ModelStage
from tests.test_cascade import Slow, codecs, decisions, nothing, pipeline, records  # noqa: F401

STEPS = (Step(0.1, 60.0), Step(0.5, 60.0), Step(1.0, 0.0))


def rollout(share_step: int = 0, status: str = "running", **kw) -> Rollout:
    return Rollout(rollout="r1", version="v-canary", champion="v-champion", steps=STEPS,
                   gates=Gates(**kw), step=share_step, step_started_at=0, status=status)


def test_the_split_is_stable_near_its_share_and_only_grows():
    cards = [f"card_{i}" for i in range(40_000)]
    at10, at50 = in_canary(cards, 0.1), in_canary(cards, 0.5)
    # 40,000 cards at p=0.1: sd of the share is 0.0015; 4 sd is 0.006
    assert abs(at10.mean() - 0.1) < 0.006 and abs(at50.mean() - 0.5) < 0.01
    assert not (at10 & ~at50).any()  # in the canary at 10%: still in it at 50%
    assert (in_canary(cards, 0.1) == at10).all()  # the same cards every time
    assert bucket("card_1") == bucket("card_1") and 0 <= bucket("x") < BUCKETS
    assert not in_canary(cards[:100], 0.0).any() and in_canary(cards[:100], 1.0).all()


def test_a_rollout_document_round_trips_and_bad_ones_are_refused():
    r = rollout()
    assert Rollout.from_document(r.to_document()) == r
    assert r.share == 0.1 and r.last_judged == 1
    assert rollout(status="promoted").share == 0.0 and rollout(status="aborted").share == 0.0
    bad = [{**r.to_document(), "steps": [{"share": 0.5, "duration_s": 1}]},
           {**r.to_document(), "steps": [{"share": 0.5, "duration_s": 1},
                                         {"share": 0.2, "duration_s": 1},
                                         {"share": 1.0, "duration_s": 0}]},
           {**r.to_document(), "status": "maybe"},
           {**r.to_document(), "champion": "v-canary"},
           {**r.to_document(), "gates": {"min_decisons": 3}},
           {"version": "v"}, [1, 2]]
    for doc in bad:
        with pytest.raises(CanaryError):
            Rollout.from_document(doc)


def stats(n: int, decline: float = 0.01, review: float = 0.03, fallback: float = 0.0,
          ms: float = 1.0, seed: int = 0, shift: float = 0.0) -> VariantStats:
    rng = random.Random(seed)
    s = VariantStats()
    for i in range(n):
        u = rng.random()
        outcome = "decline" if u < decline else "review" if u < decline + review else "approve"
        s.add({"transaction_id": f"t{seed}-{i}", "card_id": f"card{seed}-{i}",
               "decision": outcome,
               "fallback": rng.random() < fallback,
               "score": min(1.0, rng.betavariate(1, 20) + shift)}, ms * (0.9 + 0.2 * rng.random()))
    return s


def by_gate(results) -> dict[str, str]:
    return {r.gate: r.status for r in results}


def test_gates_pass_a_canary_like_the_champion_and_wait_for_traffic_and_labels():
    gates = Gates(min_decisions=500)
    assert set(by_gate(judge(stats(400), stats(5000, seed=1), gates)).values()) == {"wait"}
    got = by_gate(judge(stats(5000), stats(600, seed=1), gates))
    assert got == {"fallback": "pass", "latency": "pass", "decline_rate": "pass",
                   "review_rate": "pass", "psi": "pass", "precision_review": "wait",
                   "precision_decline": "wait"}


def test_the_latency_gate_judges_a_p99_not_one_slow_batch():
    """One batch that met a busy core must not roll a good canary back: the p99 of 31
    batches is their slowest. The gate waits for ``min_batches`` timings each, and then a
    canary slower on every batch still fails."""
    gates = Gates(min_decisions=30, min_batches=100)

    def with_one_slow(n: int, seed: int) -> VariantStats:
        s = stats(n, ms=2.0, seed=seed)
        s.model_ms[n // 2] = 15.0
        return s

    assert by_gate(judge(stats(31, ms=2.0), with_one_slow(31, 1), gates))["latency"] == "wait"
    assert by_gate(judge(stats(200, ms=2.0), with_one_slow(200, 1), gates))[
        "latency"] == "pass"
    assert by_gate(judge(stats(200, ms=2.0), stats(200, ms=15.0, seed=1), gates))[
        "latency"] == "fail"
    # the one slow batch among 31 is what fails it when every batch counts as a p99
    assert by_gate(judge(stats(31, ms=2.0), with_one_slow(31, 1),
                         Gates(min_decisions=30, min_batches=1)))["latency"] == "fail"


def test_gates_fail_what_a_payments_team_would_roll_back():
    gates = Gates(min_decisions=500)
    champion = stats(5000)
    assert by_gate(judge(champion, stats(600, decline=1.0, seed=1), gates))[
        "decline_rate"] == "fail"
    assert by_gate(judge(champion, stats(600, ms=20.0, seed=1), gates))["latency"] == "fail"
    assert by_gate(judge(champion, stats(600, fallback=0.2, seed=1), gates))[
        "fallback"] == "fail"
    assert by_gate(judge(champion, stats(600, shift=0.3, seed=1), gates))["psi"] == "fail"
    # a few more declines than the champion among 600 is noise, not a failure
    assert by_gate(judge(champion, stats(600, decline=0.02, seed=1), gates))[
        "decline_rate"] == "pass"


def test_precision_gates_judge_once_labels_arrived():
    gates = Gates(min_decisions=100, min_labelled=50)
    champion, canary = stats(3000, decline=0.05, review=0.05), stats(3000, decline=0.05,
                                                                     review=0.05, seed=1)
    assert by_gate(judge(champion, canary, gates))["precision_review"] == "wait"
    for s, fraud_share in ((champion, 0.8), (canary, 0.3)):
        for j, txn in enumerate(s.flagged):
            s.label(txn, j % 10 < fraud_share * 10)
    s.label("never-flagged", True)  # labels of approved transactions do not count
    got = by_gate(judge(champion, canary, gates))
    assert got["precision_review"] == "fail" and got["precision_decline"] == "fail"
    assert by_gate(judge(champion, champion, gates))["precision_review"] == "pass"
    assert by_gate(judge(canary, champion, gates))["precision_review"] == "pass"  # better


def test_psi_is_zero_for_one_distribution_and_grows_with_a_shift():
    rng = np.random.default_rng(3)
    a, b = rng.beta(1, 20, 20_000), rng.beta(1, 20, 20_000)
    assert psi(a, b) < 0.01 < 0.25 < psi(a, np.clip(b + 0.2, 0, 1))
    # versions that score the same transactions 0.001 and 0.003 decide them alike
    assert psi(a / 100, b / 30) < 0.01


def test_the_canary_decides_for_its_cards_only(models_registry, codecs):  # noqa: F811
    champion_v, canary_v = models_registry.versions()
    stage = ModelStage(active=models_registry.load(champion_v))
    stage.rollout, stage.canary = rollout(), models_registry.load(canary_v)
    pipe = pipeline(codecs, stage, budget_ms=10_000)
    recs = [r for i in range(60) for r in records(codecs, 1, card=f"card_{i}")]
    out = decisions(codecs, pipe.process(recs, nothing))
    mine = in_canary([d["card_id"] for d in out], 0.1)
    assert 0 < mine.sum() < len(out)
    for d, canary in zip(out, mine, strict=True):
        assert d["variant"] == ("canary" if canary else "champion")
        assert d["model_version"] == (canary_v if canary else champion_v)
        assert not d["fallback"]
        assert {"model_champion", "model_canary"} <= set(d["timings_ms"])

    # Promoted: no split any more, whatever the active version. The model state published
    # with the promotion makes the canary the active version; the latest rollout record
    # stays promoted, and must not bring its version back over one published later (or
    # over the old champion published again by hand).
    stage.rollout = replace(rollout(status="promoted", share_step=2), champion=champion_v)
    out = decisions(codecs, pipe.process(records(codecs, 3, card="card_w"), nothing))
    assert {(d["model_version"], d["variant"]) for d in out} == {(champion_v, None)}

    # Once the champion is the canary's version (a promotion caught up), no variant.
    stage.active = stage.canary
    out = decisions(codecs, pipe.process(records(codecs, 3, card="card_z"), nothing))
    assert {d["variant"] for d in out} == {None} and {d["model_version"] for d in out} == {
        canary_v}


def test_a_failing_canary_leaves_its_cards_the_champions_decision_flagged(models_registry,
                                                                         codecs):  # noqa: F811
    champion_v, canary_v = models_registry.versions()
    stage = ModelStage(active=models_registry.load(champion_v))
    stage.rollout = rollout()
    stage.canary = Slow(models_registry.load(canary_v), fail=True)
    pipe = pipeline(codecs, stage, budget_ms=10_000)
    recs = [r for i in range(60) for r in records(codecs, 1, card=f"card_{i}")]
    result = pipe.process(recs, nothing)
    out = decisions(codecs, result)
    canary = [d for d in out if d["variant"] == "canary"]
    assert canary and all(d["fallback"] and "fallback:canary_error" in d["reasons"]
                          and d["model_version"] == champion_v for d in canary)
    assert result.fallbacks["canary_error"] == len(canary)
    assert result.variants[("canary", canary[0]["decision"], True)] >= 1
    # A rollout rolled back serves no card, whatever its canary.
    stage.rollout = rollout(status="rolled_back")
    out = decisions(codecs, pipe.process(records(codecs, 5, card="card_y", start=10), nothing))
    assert {d["variant"] for d in out} == {None}


def test_one_compromised_cards_burst_is_one_card_of_evidence():
    gates = Gates(min_decisions=100, min_labelled=20)
    champion, canary = VariantStats(), VariantStats()
    for s, name in ((champion, "a"), (canary, "b")):
        for i in range(1000):  # 100 cards reviewed once, 20 of them frauds
            s.add({"transaction_id": f"{name}{i}", "card_id": f"{name}-card{i}",
                   "decision": "review" if i < 100 else "approve", "fallback": False,
                   "score": 0.5 if i < 100 else 0.01}, 1.0)
            s.label(f"{name}{i}", i < 20)
    for j in range(50):  # a card-testing burst on one card, all reviewed, all frauds
        champion.add({"transaction_id": f"burst{j}", "card_id": "a-burst", "decision": "review",
                      "fallback": False, "score": 0.5}, 1.0)
        champion.label(f"burst{j}", True)
    # by transactions the champion's precision would be 70/150 against 20/100: by cards it
    # is 21/101 against 20/100
    assert by_gate(judge(champion, canary, gates))["precision_review"] == "pass"
    for j in range(50):  # the same in the canary, declined: one declined card, not 50
        canary.add({"transaction_id": f"cburst{j}", "card_id": "b-burst",
                    "decision": "decline", "fallback": False, "score": 0.95}, 1.0)
    got = by_gate(judge(champion, canary, gates))
    assert got["decline_rate"] == "pass" and got["review_rate"] == "pass", got


def test_the_deployments_gate_defaults_are_the_gates_defaults_and_flags_override_them():
    from fraudstream.streams.cli.canary import gates_of, parse_gates, parse_steps
    from fraudstream.streams.settings import Settings

    assert gates_of(Settings()) == Gates()
    mine = Settings().replace(canary={"min_decisions": 50, "max_psi": 0.5})
    gates = parse_gates(["max_psi=0.1"], gates_of(mine))
    assert (gates.min_decisions, gates.max_psi, gates.rate_z) == (50, 0.1, 3.0)
    with pytest.raises(CanaryError):
        parse_gates(["max_pci=0.1"], Gates())
    assert parse_steps(Settings().canary.steps, 60.0) == (
        Step(0.05, 60.0), Step(0.25, 60.0), Step(0.5, 60.0), Step(1.0, 60.0))
    assert parse_steps("10:5,100", 60.0) == (Step(0.1, 5.0), Step(1.0, 60.0))
    with pytest.raises(CanaryError):
        parse_steps("50,25,100", 60.0)
