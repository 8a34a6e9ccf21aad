"""End to end on the embedded broker and registry, with real worker processes."""

from __future__ import annotations

import random
import time
from collections import Counter, defaultdict

import pytest

from fraudstream.schemas.codec import Codecs
from fraudstream.scorers.rules import RuleSet, RulesScorer
from fraudstream.streams.settings import Settings
from fraudstream.streams.traffic.generator import TrafficGenerator
from fraudstream.streams.traffic.malformed import MalformedFactory
from fraudstream.streams.traffic.world import GeneratorConfig
from tests.conftest import T0_MS, consume_all, expired_in_log, produce

pytestmark = pytest.mark.e2e


def generated(n: int, seed: int = 1) -> list[dict]:
    gen = TrafficGenerator(GeneratorConfig(seed=seed))
    now = T0_MS - n * 5
    return [gen.next_transaction(now + 5 * i) for i in range(n)]


def encoded(codecs: Codecs, txns: list[dict]) -> list[tuple[bytes, bytes]]:
    return [(t["card_id"].encode(), codecs.transaction.encode(t)) for t in txns]


def test_every_transaction_gets_exactly_one_decision(stack_settings, codecs, start_worker):
    txns = generated(3000)
    worker = start_worker()
    records = encoded(codecs, txns)
    # payment teams' producers compress as they like: every codec Kafka has is read
    for i, codec in enumerate(("none", "gzip", "snappy", "lz4", "zstd")):
        produce(stack_settings, stack_settings.topics.transactions, records[i::5], codec)
    out = consume_all(stack_settings, stack_settings.topics.decisions, len(txns), settle_s=3)
    assert worker.running, worker.tail()

    ids = Counter(m.key().decode() for m in out)
    assert set(ids) == {t["transaction_id"] for t in txns}
    assert max(ids.values()) == 1, [k for k, v in ids.items() if v > 1][:5]
    decisions = [codecs.decision.decode(m.value()) for m in out]
    by_id = {t["transaction_id"]: t for t in txns}
    for d in decisions:
        txn = by_id[d["transaction_id"]]
        assert d["card_id"] == txn["card_id"]
        assert d["decision"] in ("approve", "review", "decline")
        assert 0.0 <= d["score"] <= 1.0
        assert d["model_version"].startswith("rules@") and d["stage"] == "rules"
        assert not d["fallback"]
        assert {"decode", "rules", "total"} <= set(d["timings_ms"])
        assert d["decided_at"] >= d["source_timestamp"]
    # the rules do decide something on generated fraud-laden traffic
    assert Counter(d["decision"] for d in decisions)["approve"] < len(decisions)
    assert consume_all(stack_settings, stack_settings.topics.dlq, 0, timeout_s=1) == []


def test_malformed_records_go_to_the_dlq_with_their_reason(stack_settings, codecs, start_worker):
    txns = generated(1500, seed=2)
    factory = MalformedFactory(codecs, "avro", stack_settings.codec.max_record_bytes)
    kinds = sorted(factory.kinds)
    assert len(kinds) >= 6
    rng = random.Random(3)
    records, expected_bad = [], {}
    good_ids = set()
    for i, txn in enumerate(txns):
        if rng.random() < 0.10 or i < len(kinds):
            kind = kinds[i % len(kinds)]
            value, expected = factory.make(kind, txn)
            records.append((txn["card_id"].encode(), value))
            expected_bad[txn["transaction_id"], kind] = expected
        else:
            records.append((txn["card_id"].encode(), codecs.transaction.encode(txn)))
            good_ids.add(txn["transaction_id"])
    worker = start_worker()
    produce(stack_settings, stack_settings.topics.transactions, records)

    decided = consume_all(stack_settings, stack_settings.topics.decisions, len(good_ids))
    dead = consume_all(stack_settings, stack_settings.topics.dlq, len(expected_bad))
    assert worker.running, worker.tail()
    assert {m.key().decode() for m in decided} == good_ids
    assert len(decided) == len(good_ids)
    assert len(dead) == len(expected_bad)

    letters = [codecs.dead_letter.decode(m.value()) for m in dead]
    per_kind: Counter[tuple[str, str | None]] = Counter()
    for letter in letters:
        assert letter["source_topic"] == stack_settings.topics.transactions
        assert letter["value"] is not None and letter["reason"]
        assert b"4111111111111111" not in letter["value"], "card number must be masked"
        assert "4111111111111111" not in letter["reason"]
        if letter["field"]:
            assert letter["reason"].startswith(letter["field"])
        per_kind[letter["error_kind"], letter["field"]] += 1
    assert per_kind == Counter(expected_bad.values())


@pytest.mark.slow  # 26 s: make test-slow (CI runs both)
def test_sigkill_mid_stream_loses_nothing_and_never_changes_a_decision(
    stack_settings: Settings, codecs, start_worker
):
    txns = generated(6000, seed=4)
    first = start_worker()
    records = encoded(codecs, txns)
    produce(stack_settings, stack_settings.topics.transactions, records[:3000])
    # wait until the worker is mid-stream, then kill it without warning
    consume_all(stack_settings, stack_settings.topics.decisions, 1000, settle_s=0)
    produce(stack_settings, stack_settings.topics.transactions, records[3000:])
    first.kill()
    second = start_worker()
    out = consume_all(stack_settings, stack_settings.topics.decisions, len(txns), settle_s=5)
    assert second.running, second.tail()

    values: dict[str, set[bytes]] = defaultdict(set)
    for m in out:
        values[m.key().decode()].add(m.value())
    assert set(values) == {t["transaction_id"] for t in txns}, "a transaction has no decision"
    changed = {k: v for k, v in values.items() if len(v) > 1}
    assert not changed, f"{len(changed)} transactions got two different decisions"


@pytest.mark.parametrize("store", ["rocksdb", "memory"])
def test_a_repeated_transaction_id_gets_its_first_decision_again(
    stack_settings, codecs, start_worker, store
):
    txns = generated(200, seed=5)
    worker = start_worker(stack_settings.replace(worker={"store": store}))
    produce(stack_settings, stack_settings.topics.transactions, encoded(codecs, txns))
    consume_all(stack_settings, stack_settings.topics.decisions, len(txns), settle_s=0)
    # a producer retry / replay of the same ids (same key: card_id), with content that
    # would be decided otherwise
    changed = [dict(t, amount=9_999.0, channel="ecom", merchant_id="merchant_blocked_demo_0001")
               for t in txns[:50]]
    assert all(s.outcome == "decline" for s in RulesScorer(RuleSet.default()).score_batch(changed))
    produce(stack_settings, stack_settings.topics.transactions, encoded(codecs, changed))
    out = consume_all(stack_settings, stack_settings.topics.decisions, len(txns) + 50,
                      settle_s=2)
    assert worker.running, worker.tail()
    values: dict[str, list[bytes]] = defaultdict(list)
    for m in out:
        values[m.key().decode()].append(m.value())
    for t in txns[:50]:
        assert len(values[t["transaction_id"]]) == 2
        assert len(set(values[t["transaction_id"]])) == 1, "second decision differs"


def test_dedupe_state_is_rebuilt_from_the_changelog_on_a_fresh_machine(
    stack_settings: Settings, codecs, start_worker, tmp_path
):
    """A worker with no local RocksDB (new machine, or partitions moved to it) restores
    the dedupe table from its changelog topic before deciding."""
    txns = generated(500, seed=6)
    first = start_worker()
    produce(stack_settings, stack_settings.topics.transactions, encoded(codecs, txns))
    consume_all(stack_settings, stack_settings.topics.decisions, len(txns), settle_s=0)
    assert first.stop() == 0, first.tail()

    fresh = stack_settings.replace(worker={"data_dir": tmp_path / "fresh-machine"})
    second = start_worker(fresh)
    changed = [dict(t, amount=9_999.0, merchant_id="merchant_blocked_demo_0001") for t in txns]
    assert all(s.outcome == "decline" for s in RulesScorer(RuleSet.default()).score_batch(changed))
    produce(stack_settings, stack_settings.topics.transactions, encoded(codecs, changed))
    out = consume_all(stack_settings, stack_settings.topics.decisions, 2 * len(txns),
                      settle_s=2)
    assert second.running, second.tail()
    values: dict[str, set[bytes]] = defaultdict(set)
    for m in out:
        values[m.key().decode()].add(m.value())
    differing = [k for k, v in values.items() if len(v) != 1]
    assert not differing, f"{len(differing)} of {len(txns)} ids decided anew after recovery"


def test_two_workers_share_the_partitions_and_decide_everything_once(
    stack_settings: Settings, codecs, start_worker, tmp_path
):
    """Scaling out: a second worker joins mid-stream; the group rebalances, each worker
    takes its share of partitions, and no transaction is lost or decided differently."""
    txns = generated(6000, seed=8)
    records = encoded(codecs, txns)
    first = start_worker()
    produce(stack_settings, stack_settings.topics.transactions, records[:2000])
    consume_all(stack_settings, stack_settings.topics.decisions, 500, settle_s=0)
    second = start_worker(stack_settings.replace(worker={"data_dir": tmp_path / "second"}))
    for i in range(2000, 6000, 500):  # traffic keeps coming while the group rebalances
        produce(stack_settings, stack_settings.topics.transactions, records[i:i + 500])
        time.sleep(0.5)
    deadline = time.monotonic() + 60  # the second worker's share arrives with the rebalance
    while "newly assigned partitions" not in second.log.read_text():
        assert time.monotonic() < deadline and second.running, second.tail()
        time.sleep(0.5)
    out = consume_all(stack_settings, stack_settings.topics.decisions, len(txns), settle_s=3,
                      timeout_s=120, keys={t["transaction_id"].encode() for t in txns})
    assert first.running and second.running, first.tail() + second.tail()

    values: dict[str, set[bytes]] = defaultdict(set)
    for m in out:
        values[m.key().decode()].add(m.value())
    assert set(values) == {t["transaction_id"] for t in txns}
    assert not [k for k, v in values.items() if len(v) > 1]
    log = second.log.read_text()
    assert "newly assigned partitions" in log
    assert f"| {stack_settings.topics.transactions} " in log, "second got no input partition"


def test_dedupe_forgets_ids_older_than_the_retention(stack_settings, codecs, start_worker):
    day = 86_400_000
    recent = generated(100, seed=9)
    old = [dict(t, transaction_id=f"old-{t['transaction_id']}",
                event_time=t["event_time"] - 10 * day) for t in generated(100, seed=10)]
    worker = start_worker(stack_settings.replace(
        worker={"dedupe_retention_days": 7.0, "dedupe_expiry_interval_s": 1.0}))
    produce(stack_settings, stack_settings.topics.transactions, encoded(codecs, recent + old))
    consume_all(stack_settings, stack_settings.topics.decisions, 200, settle_s=0)
    deadline = time.monotonic() + 30
    # the old ones by event time: 10 days behind the newest event decided, not the clock
    while expired_in_log(worker, "dedupe") < 100:
        assert time.monotonic() < deadline, worker.tail()
        time.sleep(0.5)
    assert expired_in_log(worker, "dedupe") == 100, worker.tail()  # the recent ones stay
    again = [dict(t, merchant_id="merchant_blocked_demo_0001") for t in recent + old]
    produce(stack_settings, stack_settings.topics.transactions, encoded(codecs, again))
    out = consume_all(stack_settings, stack_settings.topics.decisions, 400, settle_s=2)
    assert worker.running, worker.tail()
    values: dict[str, list[bytes]] = defaultdict(list)
    for m in out:
        values[m.key().decode()].append(m.value())
    assert all(len(set(values[t["transaction_id"]])) == 1 for t in recent)  # remembered
    for t in old:  # forgotten: decided afresh, and the blocked merchant now declines
        first, second = values[t["transaction_id"]]
        assert codecs.decision.decode(second)["decision"] == "decline" != (
            codecs.decision.decode(first)["decision"])
