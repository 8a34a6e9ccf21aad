"""The worker's /metrics: what it counts matches what it did, no card identifier in it,
and Prometheus's own checker accepts it."""

from __future__ import annotations

import shutil
import subprocess
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from fraudstream.streams.embedded.broker import free_port
from fraudstream.streams.traffic.malformed import MalformedFactory
from tests.conftest import consume_all, produce
from tests.test_e2e import encoded, generated

pytestmark = pytest.mark.e2e


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        return resp.read().decode()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def total(values: dict, name: str, **match: str) -> float:
    return sum(v for (n, labels), v in values.items()
               if n == name and all(dict(labels).get(k) == x for k, x in match.items()))


def test_metrics_count_what_the_worker_did(stack_settings, codecs, start_worker):
    port = free_port()
    settings = stack_settings.replace(worker={"metrics_port": port})
    txns = generated(300, seed=21)
    factory = MalformedFactory(codecs, "avro", settings.codec.max_record_bytes)
    bad = [factory.make(kind, t)[0] for kind, t in zip(sorted(factory.kinds)[:5], txns[:5],
                                                       strict=True)]
    worker = start_worker(settings)
    produce(settings, settings.topics.transactions,
            encoded(codecs, txns) + [(b"bad", v) for v in bad])
    consume_all(settings, settings.topics.decisions, len(txns), timeout_s=90)
    consume_all(settings, settings.topics.dlq, len(bad), timeout_s=30, settle_s=0.2)
    assert worker.running, worker.tail()

    deadline = time.monotonic() + 20
    while True:  # the batch's metrics are updated once its results are acknowledged
        values = samples(text := scrape(port))
        if total(values, "fraudstream_transactions_total") >= len(txns) + len(bad) or \
                time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert total(values, "fraudstream_transactions_total") == len(txns) + len(bad)
    assert total(values, "fraudstream_decisions_total") == len(txns)
    assert total(values, "fraudstream_decisions_total", stage="rules") == len(txns)
    assert total(values, "fraudstream_dead_letters_total") == len(bad)
    assert total(values, "fraudstream_decision_latency_seconds_count") == len(txns)
    assert total(values, "fraudstream_stage_seconds_count", stage="features") >= 1
    assert total(values, "fraudstream_batch_size_sum") == len(txns) + len(bad)
    assert {dict(labels)["partition"] for (n, labels) in values
            if n == "fraudstream_consumer_lag"} <= {"0", "1", "2"}
    for t in txns:  # no card (or transaction) identifier anywhere in the scrape
        assert t["card_id"] not in text and t["transaction_id"] not in text

    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool is missing: `make test-deps` installs the prometheus package")
    check = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True,
                           text=True, timeout=30)
    assert check.returncode == 0, check.stdout + check.stderr
