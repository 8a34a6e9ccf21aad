"""A backlog in four partitions, labels read ahead of transactions, drained by one worker
with event-time alignment on: every feature vector equals the offline builder's on the
same events in the same merged order, and the decisions are those of a second run."""

from __future__ import annotations

import heapq
import math
import uuid
from typing import Any

import pytest

from fraudstream.schemas.codec import Codecs, make_registry
from fraudstream.schemas.fx import Rates
from fraudstream.schemas.validate import validate_history_transaction
from fraudstream.state.features import DAY_MS, FEATURE_NAMES, FeatureConfig
from fraudstream.state.offline import offline_features
from fraudstream.streams.traffic.generator import generate_history
from fraudstream.streams.traffic.world import GeneratorConfig
from tests.conftest import T0_MS, consume_all, produce
from tests.test_features_e2e import fresh_stack

pytestmark = pytest.mark.e2e

PARTITIONS = 4
LABEL_DELAY_S = 600.0


def merged(by_partition: dict[int, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """The partitions' transactions merged as the aligner merges them: the earliest head
    next (ties: the lower partition), each partition in its own order."""
    heap = [(seq[0]["event_time"], p, 0) for p, seq in by_partition.items() if seq]
    heapq.heapify(heap)
    out = []
    while heap:
        _t, p, i = heapq.heappop(heap)
        out.append(by_partition[p][i])
        if i + 1 < len(by_partition[p]):
            heapq.heappush(heap, (by_partition[p][i + 1]["event_time"], p, i + 1))
    return out


def drain(stack_settings: Any, start_worker: Any, txns: list, labels: list) -> tuple[
        dict[str, list[float]], dict[int, list[dict[str, Any]]], dict[str, tuple]]:
    settings = fresh_stack(stack_settings, PARTITIONS, {"backend": "rocksdb",
                                                        "label_delay_s": LABEL_DELAY_S})
    settings = settings.replace(worker={"align_wait_ms": 5000.0})
    codecs = Codecs(make_registry(settings.codec.registry_url), settings.topics)
    # The whole history is there before the worker starts, labels included: a backlog.
    produce(settings, settings.topics.labels,
            [(lab["card_id"].encode(), codecs.label.encode(lab)) for lab in labels])
    produce(settings, settings.topics.transactions,
            [(t["card_id"].encode(), codecs.transaction.encode(t)) for t in txns])
    worker = start_worker(settings)
    logged = consume_all(settings, settings.topics.features, len(txns), timeout_s=240)
    decided = consume_all(settings, settings.topics.decisions, len(txns), timeout_s=60)
    assert worker.running, worker.tail()
    assert "event-time alignment: on" in worker.log.read_text()
    worker.stop()  # the next drain starts afresh (its own topics and group)
    online = {}
    for m in logged:
        rec = codecs.feature_vector.decode(m.value())
        online[rec["transaction_id"]] = [rec["values"][n] for n in FEATURE_NAMES]
    by_partition: dict[int, list[dict[str, Any]]] = {p: [] for p in range(PARTITIONS)}
    rates = Rates.load(settings.worker.rates_path)
    for m in sorted(consume_all(settings, settings.topics.transactions, len(txns)),
                    key=lambda m: (m.partition(), m.offset())):
        by_partition[m.partition()].append(validate_history_transaction(
            codecs.transaction.decode(m.value()), rates))
    decisions = {}
    for m in decided:
        d = codecs.decision.decode(m.value())
        decisions[d["transaction_id"]] = (d["decision"], d["score"], tuple(d["reasons"]))
    return online, by_partition, decisions


def offline(order: list[dict[str, Any]], labels: list[dict[str, Any]]
            ) -> dict[str, list[float]]:
    """The offline builder on the merged transactions, each label before the first of them
    it is due for (label_time + the label delay), as the aligner hands them on."""
    delay = int(LABEL_DELAY_S * 1000)
    pending = sorted(labels, key=lambda lab: lab["label_time"])
    events: list[tuple[str, dict[str, Any]]] = []
    j = 0
    for txn in order:
        while j < len(pending) and pending[j]["label_time"] + delay <= txn["event_time"]:
            events.append(("label", pending[j]))
            j += 1
        events.append(("transaction", txn))
    events += [("label", lab) for lab in pending[j:]]
    config = FeatureConfig(label_delay_ms=delay)
    return {t["transaction_id"]: list(v.row) for t, v in offline_features(events, config)}


@pytest.mark.slow  # 25 s: make test-slow (CI runs both)
def test_a_backlog_in_four_partitions_gives_the_offline_features(stack_settings,
                                                                   start_worker):
    start = T0_MS - 3 * DAY_MS
    txns, labels = generate_history(
        GeneratorConfig(seed=13, n_cards=300, label_delay_days=0.3,
                        label_delay_spread_days=0.15, id_prefix=f"al{uuid.uuid4().hex[:6]}"),
        start, 2.0, 2500, late_ratio=0.03)
    assert labels
    online, by_partition, decisions = drain(stack_settings, start_worker, txns, labels)
    assert len(online) == len(txns) and all(len(s) > 100 for s in by_partition.values())
    want = offline(merged(by_partition), labels)
    diffs = [(tid, name, a, b) for tid, row in online.items()
             for name, a, b in zip(FEATURE_NAMES, row, want[tid], strict=True)
             if not math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9)]
    assert diffs == [], (len({d[0] for d in diffs}), diffs[:10])
    col = {n: i for i, n in enumerate(FEATURE_NAMES)}
    assert sum(r[col["merchant_fraud_count_1d"]] > 0 for r in online.values()) > 10

    # Drained again from scratch: the same features and decisions. (Merchant amount sums
    # are added in an order that follows the batches, so they may differ in the last bits.)
    again, by_again, decisions_again = drain(stack_settings, start_worker, txns, labels)
    assert by_again == by_partition
    differ = [t for t, row in online.items()
              if not all(math.isclose(a, b, rel_tol=1e-12, abs_tol=1e-12)
                         for a, b in zip(row, again[t], strict=True))]
    assert not differ, (len(differ), differ[:5])
    assert decisions_again.keys() == decisions.keys()
    for tid, (outcome, score, reasons) in decisions.items():
        assert decisions_again[tid][0] == outcome and decisions_again[tid][2] == reasons
        assert math.isclose(decisions_again[tid][1], score, rel_tol=1e-12, abs_tol=1e-12)
