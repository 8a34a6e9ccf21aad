"""A running worker picks up a promotion and a shadow from the models_registry, with no restart,
no gap and no duplicate decision."""

from __future__ import annotations

import os
import re
import shutil
import signal
import time
import urllib.request
import uuid
from collections import Counter

import pytest

from fraudstream.scorers.registry import Registry
from fraudstream.streams.embedded.broker import free_ports
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


def _learning(settings, models_registry, tmp_path, redis_url: str, **worker):
    """Settings of a worker with a promoted model and the Redis backend (a fresh key
    prefix), and ``learned()``: the labels learned, over every partition's learner."""
    import redis

    from fraudstream.scorers.online import LEARNER_KEY, OnlineLearner

    root = tmp_path / "models"
    version = models_registry.versions()[0]
    shutil.copytree(models_registry.root / version, root / version)
    Registry(root).promote(version)
    prefix = f"learn-{uuid.uuid4().hex[:8]}"
    settings = settings.replace(
        scoring={"models_dir": root, "budget_ms": 1000.0},
        features={"backend": "redis", "redis_url": redis_url, "redis_prefix": prefix},
        **({"worker": worker} if worker else {}))
    client = redis.Redis.from_url(redis_url, socket_timeout=5)

    def learned() -> int:
        total = 0
        for p in range(settings.kafka.partitions):
            data = client.get(f"{prefix}:{p}:".encode() + LEARNER_KEY)
            total += OnlineLearner.loads(data).labels if data else 0
        return total

    return settings, learned


def _label(codecs, t: dict, fraud: bool) -> tuple[bytes, bytes]:
    return t["card_id"].encode(), codecs.label.encode({
        "transaction_id": t["transaction_id"], "card_id": t["card_id"],
        "merchant_id": t["merchant_id"], "is_fraud": fraud, "fraud_type": None,
        "source": "chargeback", "event_time": t["event_time"],
        "label_time": T0_MS + 60_000})


def _wait_learned(learned, n: int, worker, timeout_s: float = 90.0) -> None:
    deadline = time.monotonic() + timeout_s
    while learned() < n:
        if time.monotonic() > deadline:
            log = worker.log.read_text(errors="replace").splitlines()
            warnings = [line for line in log if "WARNING" in line or "ERROR" in line]
            pytest.fail(f"{learned()} of {n} labels learned; the worker's warnings:\n"
                        + "\n".join(warnings[-20:]) + "\n" + worker.tail(10))
        time.sleep(0.5)


def _joinable(settings, codecs, batch: list[dict]) -> list[dict]:
    """The transactions decided with their features: a label can teach the learner only
    what was logged then (one decided while the store was unavailable has no features)."""
    out = consume_all(settings, settings.topics.decisions, len(batch), timeout_s=90,
                      settle_s=0.2)
    degraded = {d["transaction_id"] for d in map(codecs.decision.decode,
                                                (m.value() for m in out))
                if "features_degraded" in d["reasons"]}
    return [t for t in batch if t["transaction_id"] not in degraded]


def test_labels_on_the_topic_teach_the_learner_which_survives_a_restart(
        models_registry, stack_settings, start_worker, codecs, redis_server, tmp_path):
    settings, learned = _learning(stack_settings, models_registry, tmp_path, redis_server.url)
    batch = txns(0, 120)
    worker = start_worker(settings)
    produce(settings, settings.topics.transactions,
            [(t["card_id"].encode(), codecs.transaction.encode(t)) for t in batch])
    joinable = {t["transaction_id"] for t in _joinable(settings, codecs, batch)}
    assert len(joinable) > 100  # a Redis that hangs a moment degrades a batch, not all
    first = sum(t["transaction_id"] in joinable for t in batch[:60])
    produce(settings, settings.topics.labels, [_label(codecs, t, i % 3 == 0)
                                                for i, t in enumerate(batch[:60])])
    _wait_learned(learned, first, worker)
    assert worker.stop() == 0, worker.tail()

    worker = start_worker(settings)  # a restart: the learners are kept in the state store
    produce(settings, settings.topics.labels, [_label(codecs, t, i % 3 == 0)
                                                for i, t in enumerate(batch[60:])])
    _wait_learned(learned, len(joinable), worker)
    time.sleep(1.0)  # nothing learned twice (labels read again after the restart)
    assert learned() == len(joinable) and worker.running


def test_labels_that_come_while_redis_hangs_are_learned_once_it_answers(
        models_registry, stack_settings, start_worker, codecs, start_redis, tmp_path):
    """Redis stops answering (SIGSTOP: connections open, no reply) while labels arrive:
    the worker cannot take them, so it does not acknowledge them, and learns every one,
    once, when Redis answers again."""
    server = start_redis()
    port = free_ports(1)[0]
    settings, learned = _learning(stack_settings, models_registry, tmp_path, server.url,
                                  metrics_port=port, metrics_address="127.0.0.1")
    batch = txns(0, 90)
    worker = start_worker(settings)
    produce(settings, settings.topics.transactions,
            [(t["card_id"].encode(), codecs.transaction.encode(t)) for t in batch])
    assert len(_joinable(settings, codecs, batch)) == len(batch), worker.tail()
    assert server.proc is not None
    os.kill(server.proc.pid, signal.SIGSTOP)
    try:
        produce(settings, settings.topics.labels, [_label(codecs, t, i % 3 == 0)
                                                    for i, t in enumerate(batch)])
        deadline = time.monotonic() + 60
        while _metric(port, "fraudstream_online_labels_total", 'result="again"') < 1:
            assert time.monotonic() < deadline and worker.running, worker.tail()
            time.sleep(0.2)
        time.sleep(2.0)  # a few more tries against the hung server
    finally:
        os.kill(server.proc.pid, signal.SIGCONT)
    _wait_learned(learned, len(batch), worker)
    time.sleep(1.0)
    assert learned() == len(batch) and worker.running
    assert _metric(port, "fraudstream_online_labels_total", 'result="learned"') == len(batch)
    assert _metric(port, "fraudstream_online_labels_total", 'result="unjoined"') == 0


def _metric(port: int, name: str, labels: str = "") -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    pattern = rf"^{name}\{{[^}}]*{re.escape(labels)}[^}}]*\}} (\S+)$" if labels else \
        rf"^{name}(?:\{{[^}}]*\}})? (\S+)$"
    return sum(float(m) for m in re.findall(pattern, text, re.M))
