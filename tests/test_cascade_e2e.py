"""A running worker picks up a promotion and a shadow from the models_registry, with no restart,
no gap and no duplicate decision."""

from __future__ import annotations

import shutil
import time
import uuid
from collections import Counter

import pytest

from fraudstream.scorers.registry import Registry
from tests.conftest import T0_MS, consume_all, produce

pytestmark = pytest.mark.e2e


def txns(start: int, n: int) -> list[dict]:
    base = {"customer_id": None, "merchant_id": "m1", "terminal_id": None, "amount": 30.0,
            "currency": "EUR", "mcc": "5411", "country": "FR", "card_country": "FR",
            "lat": None, "lon": None, "device_id": None, "ip": None, "channel": "pos"}
    return [{**base, "transaction_id": f"p-{i}", "card_id": f"card_p{i % 37}",
             "event_time": T0_MS + i} for i in range(start, start + n)]


def test_promotion_and_shadow_reach_a_running_worker(models_registry, stack_settings, start_worker,
                                                     codecs, tmp_path):
    root = tmp_path / "models"
    for v in models_registry.versions():
        shutil.copytree(models_registry.root / v, root / v)
    reg = Registry(root)
    first, second = reg.versions()
    reg.promote(first)
    settings = stack_settings.replace(scoring={"models_dir": root, "reload_interval_s": 0.3,
                                               "budget_ms": 1000.0})
    worker = start_worker(settings)

    def send(batch: list[dict]) -> None:
        produce(settings, settings.topics.transactions,
                [(t["card_id"].encode(), codecs.transaction.encode(t)) for t in batch])

    send(txns(0, 100))
    out = consume_all(settings, settings.topics.decisions, 100, timeout_s=90, settle_s=0.5)
    assert worker.running, worker.tail()
    assert {codecs.decision.decode(m.value())["model_version"] for m in out} == {first}

    # Promote while traffic flows: 12 chunks over ~3 s.
    reg.promote(second)
    for k in range(12):
        send(txns(100 + 50 * k, 50))
        time.sleep(0.25)
    total = 100 + 12 * 50
    out = consume_all(settings, settings.topics.decisions, total, timeout_s=90, settle_s=1.0)
    assert worker.running, worker.tail()
    ds = [codecs.decision.decode(m.value()) for m in out]
    assert Counter(d["transaction_id"] for d in ds) == Counter(t["transaction_id"]
                                                               for t in txns(0, total))
    versions = [d["model_version"] for d in sorted(ds, key=lambda d: int(
        d["transaction_id"].split("-")[1]))]
    switch = versions.index(second)
    assert set(versions[:switch]) == {first} and set(versions[switch:]) == {second}
    assert not any(d["fallback"] for d in ds)

    # A shadow: scored on live traffic, on its own topic; decisions do not change.
    reg.shadow(first)
    time.sleep(1.0)
    send(txns(total, 40))
    shadow = consume_all(settings, settings.topics.decisions_shadow, 40, timeout_s=60)
    decided = consume_all(settings, settings.topics.decisions, total + 40, timeout_s=60)
    assert {codecs.decision.decode(m.value())["model_version"] for m in shadow} == {first}
    late = [codecs.decision.decode(m.value()) for m in decided]
    assert {d["model_version"] for d in late
            if int(d["transaction_id"].split("-")[1]) >= total} == {second}


def test_labels_on_the_topic_teach_the_learner_which_survives_a_restart(
        models_registry, stack_settings, start_worker, codecs, redis_server, tmp_path):
    import redis

    from fraudstream.scorers.online import LEARNER_KEY, OnlineLearner

    root = tmp_path / "models"
    version = models_registry.versions()[0]
    shutil.copytree(models_registry.root / version, root / version)
    Registry(root).promote(version)
    prefix = f"learn-{uuid.uuid4().hex[:8]}"
    settings = stack_settings.replace(
        scoring={"models_dir": root, "budget_ms": 1000.0},
        features={"backend": "redis", "redis_url": redis_server.url, "redis_prefix": prefix})
    client = redis.Redis.from_url(redis_server.url)

    def learned() -> int:
        """Labels learned, over every partition's learner (read from Redis)."""
        total = 0
        for p in range(settings.kafka.partitions):
            data = client.get(f"{prefix}:{p}:".encode() + LEARNER_KEY)
            total += OnlineLearner.loads(data).labels if data else 0
        return total

    def label(t: dict, fraud: bool) -> tuple[bytes, bytes]:
        return t["card_id"].encode(), codecs.label.encode({
            "transaction_id": t["transaction_id"], "card_id": t["card_id"],
            "merchant_id": t["merchant_id"], "is_fraud": fraud, "fraud_type": None,
            "source": "chargeback", "event_time": t["event_time"],
            "label_time": T0_MS + 60_000})

    def wait_learned(n: int) -> None:
        deadline = time.monotonic() + 90
        while learned() < n:
            assert time.monotonic() < deadline, (learned(), worker.tail())
            time.sleep(0.5)

    batch = txns(0, 120)
    worker = start_worker(settings)
    produce(settings, settings.topics.transactions,
            [(t["card_id"].encode(), codecs.transaction.encode(t)) for t in batch])
    consume_all(settings, settings.topics.decisions, 120, timeout_s=90, settle_s=0.2)
    produce(settings, settings.topics.labels, [label(t, i % 3 == 0)
                                                for i, t in enumerate(batch[:60])])
    wait_learned(60)
    assert worker.stop() == 0, worker.tail()

    worker = start_worker(settings)  # a restart: the learners are kept in the state store
    produce(settings, settings.topics.labels, [label(t, i % 3 == 0)
                                                for i, t in enumerate(batch[60:])])
    wait_learned(120)
    assert learned() == 120 and worker.running
