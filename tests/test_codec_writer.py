"""The hand-written Decision encoder writes fastavro's bytes (schemas/decision_writer.py)."""

from __future__ import annotations

import io
import json
import random

import fastavro

from fraudstream.schemas.codec import Codecs, make_registry, parsed_schema, schema_text
from fraudstream.schemas.decision_writer import DecisionWriter, writer_for
from fraudstream.streams.settings import TopicSettings
from tests.conftest import T0_MS


def _fastavro(header: bytes, record: dict) -> bytes:
    out = io.BytesIO()
    out.write(header)
    fastavro.schemaless_writer(out, parsed_schema("decision"), record)
    return out.getvalue()


#: Times around the six-byte varints (zigzag 2**35 to 2**42): the writer's fast path.
EDGES = (2**34 - 1, 2**34, 2**41 - 1, 2**41, -2**34, -2**34 - 1, -2**41)


def _decisions(n: int) -> list[dict]:
    rng = random.Random(5)
    names = ["card_count_1h", "merchant_fraud_rate_7d", "R12", "fallback:timeout", "événement",
             "features_degraded", "x" * 200]
    shared = {"decode": 1.25, "dedupe": 0.5, "features": 12.0, "rules": 0.75, "model": 3.5,
              "total": 18.0}
    out = []
    for i in range(n):
        out.append({
            "transaction_id": f"txn-{i}-{'é' * (i % 3)}" + "z" * rng.randrange(0, 150),
            "card_id": f"card_{rng.randrange(10**9):09d}",
            "decision": rng.choice(["approve", "review", "decline"]),
            "score": rng.choice([0.0, 1.0, rng.random(), 1e-300, float(i)]),
            "reasons": rng.sample(names, rng.randrange(0, 4)),
            "model_version": rng.choice(["rules@default-3", "v20261202-012650-0fa46a70"]),
            "stage": rng.choice(["rules", "model", "shadow"]),
            "fallback": rng.random() < 0.5,
            "timings_ms": shared if i % 5 else {},
            "late_ms": rng.choice([0.0, 12.5, 1e6]),
            "event_time": rng.choice([T0_MS + rng.randrange(-10**10, 10**10), *EDGES]),
            "source_timestamp": rng.choice([0, 63, 64, 127, 128, T0_MS, -1, -64, -65]),
            "decided_at": T0_MS + i // 7,  # a batch's decisions share it
            "amount": rng.choice([None, 0.01, 12, 999_999.99]),
            "currency": rng.choice([None, "EUR", "JPY"]),
            "amount_ref": rng.choice([None, 10.5, 0.0]),
            "rules_version": rng.choice([None, "2026.12.1", "v-é"]),
            "variant": rng.choice([None, "champion", "canary"]),
            "rates_version": rng.choice([None, "2026-12-01", "fx-é"]),
        })
    return out


def test_the_hand_written_writer_gives_fastavros_bytes():
    header = b"\x00\x00\x00\x00\x07"
    writer = writer_for(json.loads(schema_text("decision")), header)
    assert writer is not None  # the shipped schema is the one it knows
    for record in _decisions(3000):
        assert writer.encode(record) == _fastavro(header, record), record
    for far in (2**62, -2**63, 2**63 - 1):  # the longest varints
        record = {**_decisions(1)[0], "event_time": far, "decided_at": far}
        assert writer.encode(record) == _fastavro(header, record)


def test_the_writer_keeps_fastavros_bytes_when_its_string_cache_fills(monkeypatch):
    from fraudstream.schemas import decision_writer

    monkeypatch.setattr(decision_writer, "STRING_CACHE", 3)
    header = b"\x00\x00\x00\x00\x07"
    writer = writer_for(json.loads(schema_text("decision")), header)
    assert writer is not None
    for record in _decisions(500):
        assert writer.encode(record) == _fastavro(header, record), record
    assert len(writer._strings) <= 3


def test_the_codec_round_trips_decisions_through_the_writer():
    codec = Codecs(make_registry("mock://writer"), TopicSettings()).decision
    assert isinstance(getattr(codec.encode, "__self__", None), DecisionWriter)
    for record in _decisions(200):
        back = codec.decode(codec.encode(record))
        assert back["transaction_id"] == record["transaction_id"]
        assert back["reasons"] == record["reasons"] and back["late_ms"] == record["late_ms"]


def test_another_schema_gets_no_hand_written_writer():
    schema = json.loads(schema_text("decision"))
    schema["fields"].append({"name": "variant", "type": "string", "default": "champion"})
    assert writer_for(schema, b"\x00\x00\x00\x00\x01") is None
    schema = json.loads(schema_text("decision"))
    schema["fields"][3]["type"] = "float"  # score as float: other bytes
    assert writer_for(schema, b"\x00\x00\x00\x00\x01") is None


def test_what_the_writer_does_not_take_as_is_goes_to_fastavro():
    """A datetime for a timestamp (fastavro converts it), and a missing field (fastavro's
    own error): the codec behaves as fastavro does."""
    import datetime as dt

    import pytest

    codec = Codecs(make_registry("mock://writer-fallback"), TopicSettings()).decision
    record = _decisions(1)[0]
    when = dt.datetime.fromtimestamp(T0_MS / 1000, tz=dt.UTC)
    as_dates = {**record, "event_time": when, "decided_at": when}
    assert codec.decode(codec.encode(as_dates))["decided_at"] == when
    assert codec.encode(as_dates) == codec.encode({**record, "event_time": T0_MS,
                                                   "decided_at": T0_MS})
    incomplete = {k: v for k, v in record.items() if k != "card_id"}
    with pytest.raises(Exception) as mine:
        codec.encode(incomplete)
    with pytest.raises(Exception) as theirs:
        _fastavro(b"", incomplete)
    assert type(mine.value) is type(theirs.value)


_COMMON = ("transaction_id", "card_id", "timings_ms", "late_ms", "event_time",
           "source_timestamp", "decided_at", "amount", "currency", "amount_ref",
           "rules_version", "rates_version")
_VERDICT = ("decision", "score", "model_version", "stage", "fallback", "variant")


def _parts(record: dict) -> tuple[dict, dict, list[str]]:
    """A decision as the worker holds it: the transaction, the verdict and the reasons."""
    txn = {k: record[k] for k in ("transaction_id", "card_id", "event_time", "amount",
                                  "currency")}
    verdict = {k: record[k] for k in _VERDICT if k != "variant" or record[k] is not None}
    verdict["reasons"] = ["ignored: the reasons argument wins"]
    return txn, verdict, record["reasons"]


def _decided(writer: DecisionWriter, record: dict) -> bytes:
    txn, verdict, reasons = _parts(record)
    return writer.encode_decided(txn, verdict, reasons, record["source_timestamp"],
                                 record["amount_ref"], record["timings_ms"], record["late_ms"],
                                 record["decided_at"], record["rules_version"],
                                 record["rates_version"])


def test_a_decision_written_from_its_parts_is_the_merged_records_bytes():
    """The worker writes a decision from the transaction and the verdict, with no dict
    built: the bytes are those of the merged record, through the writer or fastavro."""
    codec = Codecs(make_registry("mock://writer-parts"), TopicSettings()).decision
    assert codec.writer is not None
    for record in _decisions(2000):
        txn, verdict, reasons = _parts(record)
        merged = {**{k: record[k] for k in _COMMON}, **verdict, "reasons": reasons}
        assert _decided(codec.writer, record) == codec.encode(merged) \
            == _fastavro(codec.writer.header, merged), record


def test_a_decision_from_parts_the_writer_does_not_take_goes_to_fastavro():
    import datetime as dt

    import pytest

    codec = Codecs(make_registry("mock://writer-parts-fallback"), TopicSettings()).decision
    assert codec.writer is not None
    record = _decisions(1)[0]
    when = dt.datetime.fromtimestamp(T0_MS / 1000, tz=dt.UTC)
    as_date = {**record, "event_time": when}
    assert _decided(codec.writer, as_date) == _decided(codec.writer,
                                                       {**record, "event_time": T0_MS})
    with pytest.raises(Exception) as mine:
        _decided(codec.writer, {**record, "decision": "maybe"})  # not an outcome
    with pytest.raises(Exception) as theirs:
        _fastavro(b"", {**record, "decision": "maybe"})
    assert type(mine.value) is type(theirs.value)
