"""The batch step without Kafka: every record ends as one decision or one dead letter."""

from __future__ import annotations

from collections import Counter

import orjson
import pytest

from fraudstream.schemas.codec import Codecs, make_registry
from fraudstream.schemas.validate import looks_like_pan, mask_pans
from fraudstream.scorers.rules import RuleSet, RulesScorer
from fraudstream.streams.pipeline import Limits, Pipeline, RawRecord
from fraudstream.streams.settings import TopicSettings
from fraudstream.streams.traffic.malformed import MalformedFactory
from tests.conftest import T0_MS

LIMITS = Limits(max_record_bytes=65536, max_future_ms=300_000, max_amount=1_000_000.0)


@pytest.fixture
def unit_codecs() -> Codecs:
    return Codecs(make_registry("mock://unit"), TopicSettings())


def txn(i: int, **changes: object) -> dict:
    base = {
        "transaction_id": f"t{i}", "event_time": T0_MS, "card_id": f"card_{i}",
        "customer_id": None, "merchant_id": "m1", "terminal_id": None, "amount": 25.0,
        "currency": "EUR", "mcc": "5411", "country": "FR", "card_country": "FR", "lat": None,
        "lon": None, "device_id": None, "ip": None, "channel": "pos",
    }
    base.update(changes)
    return base


def raw(values: list[bytes], partition: int = 0) -> list[RawRecord]:
    return [RawRecord("transactions", partition, i, b"k", v, 1_700_000_000_000 + i)
            for i, v in enumerate(values)]


def nothing_seen(partition: int, keys: list[bytes]) -> list[bytes | None]:
    return [None] * len(keys)


@pytest.mark.parametrize("fmt", ["avro", "json"])
def test_every_malformed_kind_becomes_a_dead_letter_naming_the_field(unit_codecs, fmt):
    def clock() -> float:  # the worker's wall clock, an hour after the data
        return (T0_MS + 3_600_000) / 1000

    factory = MalformedFactory(unit_codecs, fmt, LIMITS.max_record_bytes, clock=clock)
    pipeline = Pipeline(unit_codecs, RulesScorer(RuleSet.default()), LIMITS, input_format=fmt,
                        clock=clock)
    good = txn(0)
    encode = unit_codecs.transaction.encode if fmt == "avro" else orjson.dumps
    values, expected = [encode(good)], []
    for i, kind in enumerate(sorted(factory.kinds)):
        value, want = factory.make(kind, txn(i + 1))
        values.append(value)
        expected.append((kind, want))
    result = pipeline.process(raw(values), nothing_seen)

    assert [k for k, _ in result.decisions] == [b"t0"]
    assert len(result.dead_letters) == len(expected)
    for (kind, (error_kind, field)), (_key, value) in zip(
        expected, result.dead_letters, strict=True
    ):
        letter = unit_codecs.dead_letter.decode(value)
        assert (letter["error_kind"], letter["field"]) == (error_kind, field), kind
        assert letter["reason"], kind
        assert b"4111111111111111" not in (letter["value"] or b""), kind


def test_decisions_come_out_in_input_order_and_carry_what_consumers_need(unit_codecs):
    pipeline = Pipeline(unit_codecs, RulesScorer(RuleSet.default()), LIMITS)
    values = [unit_codecs.transaction.encode(txn(i)) for i in range(20)]
    values.append(unit_codecs.transaction.encode(
        txn(99, merchant_id="merchant_blocked_demo_0001")))
    result = pipeline.process(raw(values), nothing_seen)
    assert [k for k, _ in result.decisions] == [f"t{i}".encode() for i in [*range(20), 99]]
    last = unit_codecs.decision.decode(result.decisions[-1][1])
    assert last["decision"] == "decline" and last["reasons"]
    assert last["source_timestamp"].timestamp() * 1000 == 1_700_000_000_020
    assert set(last["timings_ms"]) >= {"decode", "dedupe", "rules", "total"}
    assert result.outcomes["decline"] == 1 and sum(result.outcomes.values()) == 21
    assert [e[1].split(b"|")[1] for e in result.new_entries] == [k for k, _ in result.decisions]


def test_a_seen_transaction_id_gets_its_stored_decision_not_a_new_one(unit_codecs):
    pipeline = Pipeline(unit_codecs, RulesScorer(RuleSet.default()), LIMITS)
    stored = b"stored-decision-bytes"
    asked: list[tuple[int, list[bytes]]] = []

    def seen(partition: int, keys: list[bytes]) -> list[bytes | None]:
        asked.append((partition, keys))
        return [stored if k.endswith(b"|t1") else None for k in keys]

    values = [unit_codecs.transaction.encode(txn(i)) for i in range(3)]
    values.append(unit_codecs.transaction.encode(txn(2, amount=9999.0)))  # repeat in batch
    result = pipeline.process(raw(values, partition=2), seen)
    day = b"%05d|" % (T0_MS // 86_400_000)
    # one lookup per partition per batch; keys lead with the event day (for expiry)
    assert asked == [(2, [day + b"t0", day + b"t1", day + b"t2", day + b"t2"])]
    got = dict(Counter(k for k, _ in result.decisions))
    assert got == {b"t0": 1, b"t1": 1, b"t2": 2}
    assert result.decisions[1] == (b"t1", stored)
    assert result.decisions[2][1] == result.decisions[3][1]
    assert [e[1] for e in result.new_entries] == [day + b"t0", day + b"t2"]
    assert result.duplicates == 2


def test_the_absurd_amount_bound_follows_the_currency(unit_codecs):
    pipeline = Pipeline(unit_codecs, RulesScorer(RuleSet.default()), LIMITS)
    values = [unit_codecs.transaction.encode(t) for t in (
        txn(1, amount=1_176_019.14, currency="NGN", country="NG"),  # about 735 EUR
        txn(2, amount=1_176_019.14, currency="EUR"),
    )]
    result = pipeline.process(raw(values), nothing_seen)
    assert [k for k, _ in result.decisions] == [b"t1"]
    assert result.dlq_reasons == {"validation:amount": 1}


@pytest.mark.parametrize("fmt", ["avro", "json"])
def test_a_zero_amount_is_decided_and_a_negative_one_refused(unit_codecs, fmt):
    """A zero amount is a card verification (and a card tester's first move): decided,
    with its features. A negative amount is still a dead letter naming the field."""
    from fraudstream.state.engine import FeatureEngine, MemoryStore
    from fraudstream.state.features import FeatureConfig

    pipeline = Pipeline(unit_codecs, RulesScorer(RuleSet.default()), LIMITS, input_format=fmt,
                        features=FeatureEngine(FeatureConfig(), MemoryStore()))
    encode = unit_codecs.transaction.encode if fmt == "avro" else orjson.dumps
    values = [encode(txn(1, amount=0.0)), encode(txn(2, amount=-0.01)),
              encode(txn(3, amount=0.0, card_id="card_1"))]
    result = pipeline.process(raw(values), nothing_seen)
    decided = {k: unit_codecs.decision.decode(v) for k, v in result.decisions}
    assert set(decided) == {b"t1", b"t3"}
    assert decided[b"t1"]["amount"] == 0.0 and decided[b"t1"]["amount_ref"] == 0.0
    assert result.features is not None
    assert result.features.vectors[1]["card_count_1h"] == 2  # both verifications counted
    assert result.dlq_reasons == {"validation:amount": 1}
    [(_key, value)] = result.dead_letters
    assert "must not be negative" in unit_codecs.dead_letter.decode(value)["reason"]


def test_card_numbers_are_recognised_and_masked():
    assert looks_like_pan("4111111111111111") and looks_like_pan("4111 1111 1111 1111")
    assert not looks_like_pan("card_000123") and not looks_like_pan("4111111111111112")
    masked = mask_pans(b'{"card_id":"4111111111111111","amount":12}')
    assert masked == b'{"card_id":"************1111","amount":12}'
    assert mask_pans(b"order 1234567890123 ok") == b"order 1234567890123 ok"  # fails Luhn


def test_labels_feed_the_features_and_a_bad_label_is_a_dead_letter(unit_codecs):
    from fraudstream.state.engine import FeatureEngine, MemoryStore
    from fraudstream.state.features import FeatureConfig

    store = MemoryStore()
    pipeline = Pipeline(unit_codecs, RulesScorer(RuleSet.default()), LIMITS,
                        features=FeatureEngine(FeatureConfig(), store), log_features=True)
    now = T0_MS
    label = {"transaction_id": "old", "card_id": "card_9", "merchant_id": "m1",
             "is_fraud": True, "fraud_type": None, "source": "chargeback",
             "event_time": now - 5 * 86_400_000, "label_time": now - 2 * 86_400_000}
    labels = [RawRecord("labels", 0, 0, b"card_9", unit_codecs.label.encode(label), now),
              RawRecord("labels", 0, 1, b"card_9", b"not avro", now)]
    result = pipeline.process(raw([unit_codecs.transaction.encode(txn(1))]), nothing_seen,
                              labels)
    [(key, value)] = result.dead_letters
    dead = unit_codecs.dead_letter.decode(value)
    assert (dead["source_topic"], dead["source_offset"], dead["error_kind"]) == ("labels", 1,
                                                                                 "decode")
    assert result.features is not None and result.features.labels_counted == 1
    [(log_key, log_value)] = result.feature_log
    logged = unit_codecs.feature_vector.decode(log_value)
    assert log_key == b"t1" and logged["values"]["merchant_fraud_count_7d"] == 1.0
    assert "features" in result.timings_ms and result.feature_writes


def test_degraded_features_are_named_in_the_decision(unit_codecs):
    from fraudstream.state.engine import FeatureEngine, StateUnavailable
    from fraudstream.state.features import FeatureConfig

    class Down:
        def readable(self, partition):
            return [partition]

        def read(self, keys):
            raise StateUnavailable("down")

    pipeline = Pipeline(unit_codecs, RulesScorer(RuleSet.default()), LIMITS,
                        features=FeatureEngine(FeatureConfig(), Down()))
    result = pipeline.process(raw([unit_codecs.transaction.encode(txn(1))]), nothing_seen)
    [(_key, value)] = result.decisions
    assert "features_degraded" in unit_codecs.decision.decode(value)["reasons"]
    assert result.feature_writes == [] and result.labels_again == 0

    # Labels in a batch the store cannot read are not taken: they are to come again.
    now = T0_MS
    label = {"transaction_id": "t1", "card_id": "card_1", "merchant_id": "m1",
             "is_fraud": True, "fraud_type": None, "source": "chargeback",
             "event_time": now, "label_time": now}
    labels = [RawRecord("labels", 0, o, b"card_1", unit_codecs.label.encode(label), now)
              for o in (7, 8)]
    result = pipeline.process(raw([unit_codecs.transaction.encode(txn(2))]), nothing_seen,
                              labels)
    assert result.labels_again == 2 and len(result.decisions) == 1


def test_the_event_time_high_water_mark_is_the_newest_decided_per_partition(unit_codecs):
    """What the worker's state expiry measures from (not the wall clock): nothing before a
    first decision, then the newest event_time decided on each partition."""
    pipeline = Pipeline(unit_codecs, RulesScorer(RuleSet.default()), LIMITS)
    assert pipeline.event_time_hwm == {}
    encode = unit_codecs.transaction.encode
    pipeline.process(raw([encode(txn(1, event_time=T0_MS - 5_000)),
                          encode(txn(2, event_time=T0_MS - 9_000)), b"not avro"], 0),
                     nothing_seen)
    pipeline.process(raw([encode(txn(3, event_time=T0_MS - 40 * 86_400_000))], 2),
                     nothing_seen)
    pipeline.process(raw([encode(txn(4, event_time=T0_MS - 7_000))], 0), nothing_seen)
    assert pipeline.event_time_hwm == {0: T0_MS - 5_000, 2: T0_MS - 40 * 86_400_000}


@pytest.mark.parametrize("ms", [2_193_528_273_693, 1_079_919_129_416])  # 2039, 2004
def test_avro_event_times_are_read_to_the_millisecond_whatever_the_year(unit_codecs, ms):
    """fastavro hands timestamp-millis over as a datetime; converting it through a float
    lost a millisecond for some times (these two among them)."""
    from datetime import UTC, datetime, timedelta

    from fraudstream.schemas.fx import Rates
    from fraudstream.schemas.validate import validate_transaction

    when = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(milliseconds=ms)
    assert int(when.timestamp() * 1000) == ms - 1  # the float way is 1 ms short here
    record = unit_codecs.transaction.decode(unit_codecs.transaction.encode(txn(0, event_time=ms)))
    assert isinstance(record["event_time"], datetime)
    valid = validate_transaction(record, now_ms=ms, max_future_ms=0, max_amount=1e9,
                                 rates=Rates.load())
    assert valid["event_time"] == ms


def test_a_prepared_batch_decided_after_a_pickle_round_trip_decides_the_same(unit_codecs):
    """A replay prepares batches in one process and decides them in another."""
    import pickle

    def clock() -> float:
        return (T0_MS + 60_000) / 1000

    pipeline = Pipeline(unit_codecs, RulesScorer(RuleSet.default()), LIMITS, clock=clock)
    encode = unit_codecs.transaction.encode
    values = [encode(txn(1)), encode(txn(2, amount=9_000.0)), b"not avro", encode(txn(1)),
              encode(txn(3, country="US"))]
    staged = pipeline.prepare(raw(values), lambda p, keys: [None] * len(keys))
    copy = pickle.loads(pickle.dumps(staged))
    assert [(r.partition, r.offset, r.timestamp_ms, t) for r, t in copy.valid] == [
        (r.partition, r.offset, r.timestamp_ms, t) for r, t in staged.valid]
    assert [r.offset for r, _t in copy.fresh] == [0, 1, 4]  # the repeat and the bad one out
    assert all(r.value is None for r, _t in copy.valid)  # values stay behind

    def decided(result):
        rows = [unit_codecs.decision.decode(v) for _k, v in result.decisions]
        return [{k: v for k, v in d.items() if k != "timings_ms"} for d in rows]

    there, here = pipeline.decide(copy), pipeline.decide(staged)
    assert decided(there) == decided(here) and len(here.decisions) == 4
    assert there.duplicates == here.duplicates == 1
    assert len(there.dead_letters) == len(here.dead_letters) == 1
    assert len({d["decision"] for d in decided(here)}) > 1  # not all alike
