"""The controller's reading of a rollout's decisions and labels, on the embedded broker:
the precision gates judge every decision the rollout flagged so far, so labels that come
in a later step (chargebacks arrive days after the decision) still count, whether the
controller carried them from the step before or started mid-rollout."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from confluent_kafka import Producer

from fraudstream.scorers.canary import CANARY, CHAMPION, Gates, Rollout, Step, judge
from fraudstream.streams.control.rollout import StepReader
from tests.conftest import T0_MS

pytestmark = pytest.mark.e2e

STEP_MS = 60_000


def decision(tid: str, card: str, variant: str, outcome: str, at_ms: int) -> dict:
    at = datetime.fromtimestamp(at_ms / 1000, UTC)
    return {"transaction_id": tid, "card_id": card, "decision": outcome,
            "score": {"approve": 0.05, "review": 0.6, "decline": 0.95}[outcome],
            "reasons": [], "model_version": f"v-{variant}", "stage": "model",
            "fallback": False, "timings_ms": {"total": 2.0, f"model_{variant}": 1.0},
            "event_time": at, "source_timestamp": at, "decided_at": at, "variant": variant}


def read_all(reader: StepReader) -> None:
    """Until three polls in a row bring nothing (as ``model canary --status`` reads)."""
    quiet = 0
    while quiet < 3:
        quiet = quiet + 1 if reader.poll(0.5) == 0 else 0


def test_labels_that_come_in_a_later_step_judge_the_decisions_of_the_earlier_one(
        stack_settings, codecs):
    settings = stack_settings
    t0 = T0_MS
    first = Rollout(rollout=f"v-canary@{t0}", version="v-canary", champion="v-champion",
                    steps=(Step(0.1, 60.0), Step(0.5, 60.0), Step(1.0, 0.0)),
                    gates=Gates(min_decisions=50, min_labelled=20, min_batches=1),
                    step=0, step_started_at=t0, started_at=t0)
    second = first.moved(t0 + STEP_MS, step=1)
    assert second.began == t0
    producer = Producer(settings.kafka.client_config())

    def send(d: dict, at_ms: int) -> None:
        producer.produce(settings.topics.decisions, key=d["card_id"].encode(),
                         value=codecs.decision.encode(d), timestamp=at_ms)

    # Step 1: each variant reviews 100 cards, and approves some more. No label yet.
    for variant in (CHAMPION, CANARY):
        for i in range(160):
            at = t0 + 1000 + i * 100
            send(decision(f"{variant}-a{i}", f"{variant}-card{i}", variant,
                          "review" if i < 100 else "approve", at), at)
    assert producer.flush(30) == 0
    step1 = StepReader(settings, codecs, first)
    try:
        read_all(step1)
        assert {g.gate: g.status for g in step1.judge(first)}["precision_review"] == "wait"
    finally:
        step1.close()

    # Step 2: more approvals of each, and now the chargebacks of step 1's reviews: 80% of
    # the champion's reviewed cards were fraud, 10% of the canary's.
    for variant in (CHAMPION, CANARY):
        for i in range(80):
            at = t0 + STEP_MS + 1000 + i * 100
            send(decision(f"{variant}-b{i}", f"{variant}-later{i}", variant, "approve", at),
                 at)
        for i in range(100):
            at = t0 + STEP_MS + 20_000 + i * 10
            fraud = i < (80 if variant == CHAMPION else 10)
            producer.produce(settings.topics.labels, key=f"{variant}-card{i}".encode(),
                             value=codecs.label.encode({
                                 "transaction_id": f"{variant}-a{i}",
                                 "card_id": f"{variant}-card{i}", "merchant_id": None,
                                 "is_fraud": fraud, "fraud_type": None, "source": "chargeback",
                                 "event_time": t0 + 1000, "label_time": at}), timestamp=at)
    assert producer.flush(30) == 0

    # carried from the step before (the running controller), and read again from the
    # rollout's first step (a controller started mid-rollout): one judgement
    for carried in (step1.flagged, None):
        reader = StepReader(settings, codecs, second, carried)
        try:
            read_all(reader)
            assert {v: s.decisions for v, s in reader.stats.items()} == {
                CHAMPION: 80, CANARY: 80}  # the step's own decisions only
            got = {g.gate: g for g in reader.judge(second)}
            assert got["precision_review"].status == "fail", got["precision_review"]
            assert got["precision_review"].canary == pytest.approx(0.1)
            assert got["precision_review"].champion == pytest.approx(0.8)
            assert got["decline_rate"].status == "pass"
            # the step's decisions alone flagged nothing: judged on them, the gate waits
            alone = judge(reader.stats[CHAMPION], reader.stats[CANARY], second.gates)
            assert {g.gate: g.status for g in alone}["precision_review"] == "wait"
        finally:
            reader.close()
