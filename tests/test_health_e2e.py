"""Readiness through a large recovery, and a SIGTERM under load, with real workers on the
embedded broker. Minutes: ``make test-slow``."""

from __future__ import annotations

import os
import signal
import time
import urllib.error
import urllib.request

import pytest
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic

from fraudstream.state.records import card_record
from fraudstream.streams.embedded.broker import free_port, free_ports
from tests.conftest import T0_MS, consume_all
from tests.test_canary_e2e import PacedProducer
from tests.test_e2e import encoded, generated

pytestmark = pytest.mark.slow

#: What the README states: a worker given SIGTERM finishes the batch in hand, commits and
#: leaves the group within this many seconds (measured: about 3 s at 400 transactions/s).
SIGTERM_BOUND_S = 15.0


def _status(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=3) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError as exc:
        return 0, str(exc)


def test_readyz_is_false_while_a_million_cards_recover_and_true_after(
        stack_settings, codecs, start_worker):
    """A worker on a fresh machine restores 1M card records from the changelog: /readyz
    says so (503, state restoring) until they are in, then 200, and it decides."""
    port = free_port()
    settings = stack_settings.replace(worker={"metrics_port": port,
                                              "metrics_address": "127.0.0.1"})
    changelog = f"{settings.worker.app_id}-state-changelog"
    partitions = settings.kafka.partitions
    admin = AdminClient({"bootstrap.servers": settings.kafka.bootstrap})
    for fut in admin.create_topics([NewTopic(changelog, partitions, 1)]).values():
        fut.result(30)
    value = card_record(0, T0_MS, None, [[T0_MS, 10.0, float("nan"), float("nan")]],
                        [[T0_MS // 3_600_000, 1, 10.0, 10.0]],
                        [[T0_MS // 86_400_000, 1, 10.0, 10.0, 100.0]], [[7, T0_MS]], [], [])
    producer = Producer({**settings.kafka.client_config(), "linger.ms": 50,
                         "batch.num.messages": 10_000, "queue.buffering.max.kbytes": 262144})
    cards = 1_000_000
    for i in range(cards):
        while True:
            try:
                producer.produce(changelog, key=b"c|card_%07d" % i, value=value,
                                 partition=i % partitions)
                break
            except BufferError:
                producer.poll(0.1)
    assert producer.flush(300) == 0

    worker = start_worker(settings)
    seen: list[tuple[float, int, str]] = []
    t0 = time.monotonic()
    while time.monotonic() - t0 < 300:
        status, body = _status(port, "/readyz")
        seen.append((time.monotonic() - t0, status, body))
        if status == 200:
            break
        assert worker.running, worker.tail()
        time.sleep(0.1)
    assert seen[-1][1] == 200, (seen[-3:], worker.tail())
    restoring = [s for s in seen if s[1] == 503 and "state: restoring" in s[2]]
    assert restoring, [s[2] for s in seen][:: max(1, len(seen) // 10)]
    log = worker.log.read_text(errors="replace")
    assert "restored" in log and "changelog records" in log, worker.tail()
    print(f"\n/readyz 503 for {seen[-1][0]:.1f} s ({len(restoring)} probes said restoring), "
          f"then 200")

    txns = generated(20)
    from tests.conftest import produce

    produce(settings, settings.topics.transactions, encoded(codecs, txns))
    assert len(consume_all(settings, settings.topics.decisions, 20, 60)) == 20


def test_sigterm_under_load_exits_in_bounded_time_and_nothing_is_lost(
        stack_settings, codecs, start_worker, tmp_path):
    """Two workers share the load; one gets SIGTERM mid-stream. It exits within the bound,
    the other takes its partitions, and every transaction has exactly one decision."""
    ports = free_ports(2)
    workers = [start_worker(stack_settings.replace(
        worker={"metrics_port": port, "metrics_address": "127.0.0.1",
                "data_dir": tmp_path / f"state-{k}"})) for k, port in enumerate(ports)]
    deadline = time.monotonic() + 120
    while not all(_status(p, "/readyz")[0] == 200 for p in ports):
        assert time.monotonic() < deadline, [w.tail() for w in workers]
        time.sleep(0.5)
    txns = generated(6000, seed=5)
    topic = stack_settings.topics.transactions
    records = [(0, topic, k, v) for k, v in encoded(codecs, txns)]
    paced = PacedProducer(stack_settings, records, per_tick=20, tick_s=0.05)  # ~400/s
    try:
        while paced.sent < 2000:
            time.sleep(0.2)
        proc = workers[0].proc
        assert proc is not None
        t0 = time.monotonic()
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(60)
        took = time.monotonic() - t0
        assert took < SIGTERM_BOUND_S, (took, workers[0].tail())
        print(f"\nSIGTERM under load: exited in {took:.1f} s (code {proc.returncode})")
        while paced.sent < len(records):
            time.sleep(0.5)
    finally:
        paced.stop()
    keys = {t["transaction_id"].encode() for t in txns}
    decisions = consume_all(stack_settings, stack_settings.topics.decisions, len(txns), 120,
                            settle_s=3.0, keys=keys)
    by_id: dict[bytes, set[bytes]] = {}
    for m in decisions:
        by_id.setdefault(m.key(), set()).add(m.value())
    missing = keys - set(by_id)
    assert not missing, f"{len(missing)} transactions never decided"
    conflicting = [k for k, values in by_id.items() if len(values) > 1]
    assert not conflicting, f"{len(conflicting)} transactions decided twice, differently"
    assert _status(ports[1], "/healthz")[0] == 200
