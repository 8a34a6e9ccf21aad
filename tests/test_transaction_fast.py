"""The one-pass reader (schemas/transaction_fast.py) gives what decoding then validating
gives, or leaves the record to them: on generated transactions, on every odd or refused
value of the exact-validation variants, and on corrupt bytes."""

from __future__ import annotations

import io
import random
from typing import Any

import fastavro
import pytest

from fraudstream.schemas.codec import Codecs, DecodeError, make_registry, parsed_schema
from fraudstream.schemas.fx import Rates
from fraudstream.schemas.transaction_fast import read_checked
from fraudstream.schemas.validate import ValidationError, validate_transaction
from fraudstream.scorers.rules import RuleSet, RulesScorer
from fraudstream.streams.pipeline import Limits, Pipeline, RawRecord
from fraudstream.streams.settings import TopicSettings
from fraudstream.streams.traffic.generator import GeneratorConfig, generate_history
from tests.conftest import T0_MS
from tests.test_validate_exact import NOW_MS, _canon, records

MAX_FUTURE_MS = 300_000
MAX_AMOUNT = 1_000_000.0
#: The shipped table: every currency the generator uses has a rate in it.
RATES = Rates.load()


@pytest.fixture(scope="module")
def codec() -> Any:
    return Codecs(make_registry("mock://transaction-fast"), TopicSettings()).transaction


def _avro(codec: Any, record: dict[str, Any]) -> bytes | None:
    """The record in our schema's wire format; None for values the schema cannot hold."""
    out = io.BytesIO()
    out.write(codec.checked_reader()[0])
    try:
        fastavro.schemaless_writer(out, parsed_schema("transaction"), record)
    except Exception:
        return None
    return out.getvalue()


def _long_way(codec: Any, data: bytes) -> tuple[str, Any]:
    try:
        return ("ok", _canon(validate_transaction(
            codec.decode(data), now_ms=NOW_MS, max_future_ms=MAX_FUTURE_MS,
            max_amount=MAX_AMOUNT, rates=RATES)))
    except (DecodeError, ValidationError) as exc:
        return ("refused", type(exc).__name__, str(exc))


def _one_pass(data: bytes) -> dict[str, Any] | None:
    return read_checked(data, 5, NOW_MS + MAX_FUTURE_MS, MAX_AMOUNT, RATES)


def _compare(codec: Any, blobs: list[bytes]) -> tuple[int, int]:
    """Every record the one pass takes is one the long way accepts, with the same
    result; returns (taken, accepted by the long way)."""
    taken = accepted = 0
    for data in blobs:
        slow = _long_way(codec, data)
        fast = _one_pass(data)
        accepted += slow[0] == "ok"
        if fast is not None:
            taken += 1
            assert ("ok", _canon(fast)) == slow, data
    return taken, accepted


def test_every_generated_transaction_is_taken_in_one_pass_with_the_same_result(codec):
    txns, _ = generate_history(GeneratorConfig(seed=21, n_cards=300, id_prefix="tf"),
                               T0_MS, 1.0, 3000)
    blobs = [codec.encode(t) for t in txns]
    taken, accepted = _compare(codec, blobs)
    assert taken == accepted == len(blobs)


def test_odd_and_refused_values_are_left_to_the_long_way_or_agree(codec):
    blobs = [b for b in (_avro(codec, r) for r in records()) if b is not None]
    taken, accepted = _compare(codec, blobs)
    assert len(blobs) > 10_000
    # the variants reach both sides: most valid ones are taken, the refused never are
    assert accepted > 5_000 and taken > 0.8 * accepted


def test_records_holding_a_card_number_or_a_long_identifier(codec):
    base = generate_history(GeneratorConfig(seed=22, n_cards=10, id_prefix="tf"),
                            T0_MS, 1.0, 100)[0][0]
    for field in ("transaction_id", "card_id", "merchant_id", "customer_id", "terminal_id",
                  "device_id"):
        pan = _avro(codec, {**base, field: "4111111111111111"})
        grouped = _avro(codec, {**base, field: "ref 4111 1111 1111 1111"})
        numeric = _avro(codec, {**base, field: "4111111111111112"})  # fails Luhn
        long_id = _avro(codec, {**base, field: "shop-0042-terminal-000000000042-x"})
        assert pan and grouped and numeric and long_id
        assert _one_pass(pan) is None and _long_way(codec, pan)[0] == "refused"
        assert _one_pass(grouped) is None and _long_way(codec, grouped)[0] == "refused"
        # 13 digits in a row: the long way decides (here: no card number, accepted)
        assert _one_pass(numeric) is None and _long_way(codec, numeric)[0] == "ok"
        # long, but no 13 digits in a row: taken, with the same result
        assert _compare(codec, [long_id]) == (1, 1)


def test_corrupt_and_truncated_bytes_agree_or_are_left_to_the_long_way(codec):
    txns, _ = generate_history(GeneratorConfig(seed=23, n_cards=100, id_prefix="tf"),
                               T0_MS, 1.0, 500)
    rng = random.Random(4)
    blobs = []
    for t in txns:
        data = bytearray(codec.encode(t))
        cut = rng.randrange(5, len(data))
        blobs.append(bytes(data[:cut]))  # truncated
        blobs.append(bytes(data) + bytes([rng.randrange(256)]))  # one trailing byte
        for _ in range(3):  # one byte changed
            i = rng.randrange(5, len(data))
            changed = bytearray(data)
            changed[i] = rng.randrange(256)
            blobs.append(bytes(changed))
    taken, accepted = _compare(codec, blobs)
    assert 0 < taken <= accepted < len(blobs)


def test_the_pipeline_reads_a_mixed_batch_as_the_long_way_does(codec):
    """The worker's batch step with the one pass and without: the same transactions
    accepted, the same dead letters, in the same order."""
    txns, _ = generate_history(GeneratorConfig(seed=24, n_cards=50, id_prefix="tf"),
                               T0_MS, 1.0, 400)
    blobs: list[bytes | None] = [codec.encode(t) for t in txns[:300]]
    blobs[10] = _avro(codec, {**txns[10], "card_id": "4111111111111111"})
    blobs[20] = _avro(codec, {**txns[20], "currency": "eur"})
    blobs[30] = blobs[30][:40]  # type: ignore[index]
    blobs[40] = None
    blobs[50] = _avro(codec, {**txns[50], "amount": 5e6})
    recs = [RawRecord("transactions", 0, i, b"k", b, T0_MS) for i, b in enumerate(blobs)]
    codecs = Codecs(make_registry("mock://transaction-fast-pipeline"), TopicSettings())

    def staged(one_pass: bool) -> tuple[Any, Any]:
        pipeline = Pipeline(codecs, RulesScorer(RuleSet.default()),
                            Limits(65536, MAX_FUTURE_MS, MAX_AMOUNT, RATES),
                            clock=lambda: NOW_MS / 1000)
        if not one_pass:
            pipeline._checked = None
        s = pipeline.prepare(recs, lambda _p, keys: [None] * len(keys))
        return ([(r.offset, _canon(t)) for r, t in s.valid],
                [(d[0], d[1]) for d in s.out.dead_letters])

    fast, slow = staged(True), staged(False)
    assert fast == slow
    assert len(fast[0]) == 295 and len(fast[1]) == 5
