"""``fraudstream retrain`` on the embedded stack: a history on the live topics gives the
same training rows as the same history from a file (the worker's feature code, a label
counted only once available), unusable records are reported with their reason (card
numbers masked) and not used, and the artifact reaches the artifacts topic."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
from confluent_kafka import Producer

from fraudstream.scorers import train as T
from fraudstream.state.features import FeatureConfig
from fraudstream.streams.autopilot.source import topic_events
from fraudstream.streams.control.artifacts import download
from fraudstream.streams.replay.ranges import Bound, ReplayConfig
from fraudstream.streams.topics import ensure_topics
from tests.conftest import DAY_MS, ROOT, T0_MS

pytestmark = pytest.mark.e2e

PAN = "4111111111111111"


@pytest.fixture
def history(stack_settings, codecs):
    """Five days of generated traffic on the topics (Kafka time = event time, labels at
    their label time), plus a transaction carrying a card number and one of garbage."""
    from fraudstream.streams.traffic.generator import arrival_events, generate_history
    from fraudstream.streams.traffic.world import GeneratorConfig

    txns, labels = generate_history(
        GeneratorConfig(seed=5, n_cards=400, label_delay_days=0.5, label_delay_spread_days=0.2,
                        id_prefix="rt"), T0_MS - 6 * DAY_MS, 5.0, 2500)
    topics = stack_settings.topics
    ensure_topics(stack_settings)
    producer = Producer({**stack_settings.kafka.client_config(), "linger.ms": 50})
    records = sorted([(t["event_time"], topics.transactions, t) for t in txns]
                     + [(lab["label_time"], topics.labels, lab) for lab in labels],
                     key=lambda r: r[0])
    for at, topic, rec in records:
        codec = codecs.transaction if topic == topics.transactions else codecs.label
        producer.produce(topic, key=rec["card_id"].encode(), value=codec.encode(rec),
                         timestamp=at)
    leaked = dict(txns[100], transaction_id="rt-leak", card_id=PAN)
    producer.produce(topics.transactions, key=b"x", value=codecs.transaction.encode(leaked),
                     timestamp=txns[100]["event_time"])
    producer.produce(topics.transactions, key=b"y", value=b"\x00not avro",
                     timestamp=txns[100]["event_time"])
    assert producer.flush(30) == 0
    return arrival_events(txns, labels)


def test_the_topics_give_the_rows_a_history_file_gives(stack_settings, codecs, history):
    errors: Counter[str] = Counter()
    events = topic_events(stack_settings, codecs, ReplayConfig(challenger="-",
                                                               start=Bound("offset", 0)), errors)
    from_topics = T.build_dataset(events, FeatureConfig())
    from_file = T.build_dataset(history, FeatureConfig())
    assert len(from_topics) == len(from_file) > 10_000
    a, b = np.argsort(from_topics.txn_keys), np.argsort(from_file.txn_keys)
    assert (from_topics.txn_keys[a] == from_file.txn_keys[b]).all()
    assert (from_topics.y[a] == from_file.y[b]).all() and from_topics.y.sum() > 50
    # every feature of every transaction, label-based merchant features included
    same = np.isclose(from_topics.X[a], from_file.X[b], rtol=1e-6, atol=1e-6).all(axis=1)
    assert same.mean() >= 0.999, f"{(~same).sum()} rows differ"
    assert sum(errors.values()) == 2, errors
    assert not any(PAN in reason for reason in errors), errors


@pytest.mark.slow  # 25 s: make test-slow (CI runs both)
def test_retrain_writes_an_artifact_and_puts_it_on_the_artifacts_topic(
        stack_settings, history, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("FRAUDSTREAM_")}
    env.update(stack_settings.to_env())
    out = subprocess.run([sys.executable, "-m", "fraudstream", "retrain", "--from", "0",
                          "--out", str(tmp_path / "models"), "--trees", "30", "--quiet"],
                         env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert PAN not in out.stdout + out.stderr
    topic = stack_settings.topics.transactions
    assert f"not used: 1 x {topic} card_id: looks like or holds a raw card number" \
        in out.stderr, out.stderr
    assert f"not used: 1 x {topic} schema: unknown schema id" in out.stderr, out.stderr

    summary = json.loads(out.stdout)
    version = summary["version"]
    assert summary["test"]["ensemble"]["average_precision"] > 0.3
    assert summary["windows"]["test"]["transactions"] > 2000
    fetched = download(stack_settings, version, tmp_path / "elsewhere")
    assert (fetched / "metadata.json").read_bytes() == \
        (tmp_path / "models" / version / "metadata.json").read_bytes()

    # A share of the training window's unlabelled transactions, on a range with time
    # bounds (where the training window ends is known from them before reading).
    def run(share: str, *bounds: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "fraudstream", "retrain", *bounds,
                               "--genuine-sample", share, "--out", str(tmp_path / "models"),
                               "--trees", "30", "--quiet", "--no-upload"], env=env, cwd=ROOT,
                              capture_output=True, text=True, timeout=300)

    def meta_of(out: subprocess.CompletedProcess) -> dict:
        assert out.returncode == 0, out.stderr
        return json.loads((tmp_path / "models" / json.loads(out.stdout)["version"]
                           / "metadata.json").read_text())

    out = run("0.3", "--from", "0")
    assert out.returncode == 1 and "time bounds at both ends" in out.stderr, out.stderr
    wide = run("0.3", "--from", f"@{T0_MS - 7 * DAY_MS}", "--to", f"@{T0_MS}")
    assert wide.returncode == 1 and "wider than its data" in wide.stderr, wide.stderr
    days = ("--from", f"@{T0_MS - 6 * DAY_MS}", "--to", f"@{T0_MS - DAY_MS}")
    small, whole = meta_of(run("0.3", *days)), meta_of(run("1", *days))
    s = small["sampling"]
    assert whole["sampling"] is None and s["genuine_share"] == 0.3
    assert s["sampled_out"] > 0.5 * small["windows"]["train"]["transactions"]
    assert small["windows"]["valid"] == whole["windows"]["valid"]
    assert small["windows"]["test"] == whole["windows"]["test"]
    assert small["metrics"]["test"]["ensemble"]["average_precision"] > 0.3
