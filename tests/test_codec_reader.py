"""The hand-written Transaction reader gives fastavro's dicts and fastavro's errors
(schemas/transaction_reader.py)."""

from __future__ import annotations

import io
import json
import random
import re
import struct
from datetime import datetime
from typing import Any

import fastavro
import pytest
from confluent_kafka.schema_registry import Schema

from fraudstream.schemas import codec as codec_module
from fraudstream.schemas.codec import Codecs, DecodeError, make_registry, parsed_schema, schema_text
from fraudstream.schemas.transaction_reader import read_transaction, reader_for
from fraudstream.scorers.rules import RuleSet, RulesScorer
from fraudstream.streams.pipeline import Limits, Pipeline, RawRecord
from fraudstream.streams.settings import TopicSettings
from fraudstream.streams.traffic.generator import GeneratorConfig, generate_history
from tests.conftest import T0_MS

HEADER = b"\x00\x00\x00\x00\x01"
#: Event times: small and boundary zigzag varints (1 to 7 bytes: 6 bytes hold 2**34 to
#: 2**41 - 1), before 1970, 2000 and 2004, after 2038, datetime's first and last millisecond.
TIMES = [0, 1, -1, 63, 64, -64, -65, 8191, 8192, 2**34 - 1, 2**34, -(2**34), -(2**34) - 1,
         2**41 - 1, 2**41, -(2**41), -(2**41) - 1, 946_684_800_000, 1_079_919_129_416,
         1_000_000_000_000, 2_193_528_273_693, 4_102_444_800_000, -2_208_988_800_000,
         253_402_300_799_999, -62_135_596_800_000, T0_MS]
#: Past datetime's range (fastavro fails to convert them): 10-byte varints among them.
OUT_OF_RANGE = [253_402_300_800_000, -62_135_596_800_001, 2**62, -(2**62), 2**63 - 1,
                -(2**63)]
DOUBLES = [0.0, -0.0, 1e-300, 5e-324, 1.7976931348623157e308, -1.7976931348623157e308,
           float("inf"), float("-inf"), float("nan"), 0.01, 999_999.99, -12.5]
TEXTS = ["", "a", "EUR", "é", "ünïcødé-ид", "日本語の店", "🙂💳", "\u00a0\u2028", "x" * 63,
         "y" * 64, "z" * 127, "é" * 64, "w" * 8191, "v" * 8192]


def _fastavro(data: bytes) -> dict[str, Any]:
    return fastavro.schemaless_reader(io.BytesIO(data[5:]), parsed_schema("transaction"), None)


def _encode(record: dict[str, Any]) -> bytes:
    out = io.BytesIO()
    out.write(HEADER)
    fastavro.schemaless_writer(out, parsed_schema("transaction"), record)
    return out.getvalue()


def _canon(record: dict[str, Any]) -> list[tuple[str, str, Any]]:
    """Keys in order, exact types, and values compared bit for bit (NaN, -0.0) and with
    their time zone."""
    out = []
    for key, value in record.items():
        if isinstance(value, float):
            value = struct.pack("<d", value).hex()
        elif isinstance(value, datetime):
            value = (value.isoformat(), value.tzinfo)
        out.append((key, type(value).__name__, value))
    return out


def _random_records(n: int, seed: int, longest: int = 10_000) -> list[dict[str, Any]]:
    """Strings of up to ``longest`` characters."""
    rng = random.Random(seed)
    texts = [t for t in TEXTS if len(t) <= longest]

    def text() -> str:
        if rng.random() < 0.5:
            return rng.choice(texts)
        alphabet = "abcXYZ019_-éß中🙂\u0301"
        return "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, min(90, longest))))

    def maybe(value: Any) -> Any:
        return None if rng.random() < 0.4 else value

    def double() -> float:
        return rng.choice(DOUBLES) if rng.random() < 0.5 else rng.uniform(-1e6, 1e6)

    def millis() -> int:
        if rng.random() < 0.5:
            return rng.choice(TIMES)
        return rng.randrange(-62_135_596_800_000, 253_402_300_800_000)

    return [{
        "transaction_id": text(), "event_time": millis(), "card_id": text(),
        "customer_id": maybe(text()), "merchant_id": text(), "terminal_id": maybe(text()),
        "amount": double(), "currency": text(), "mcc": maybe(text()), "country": text(),
        "card_country": maybe(text()), "lat": maybe(double()), "lon": maybe(double()),
        "device_id": maybe(text()), "ip": maybe(text()), "channel": text(),
    } for _ in range(n)]


def _generated(n: int) -> list[dict[str, Any]]:
    txns, _ = generate_history(GeneratorConfig(seed=7, n_cards=300, id_prefix="cr"), T0_MS,
                               1.0, n)
    return txns[:n]


def _outcome(decode: Any, data: bytes) -> tuple[Any, ...]:
    try:
        return ("record", _canon(decode(data)))
    except DecodeError as exc:  # fastavro names its buffer object: not the same twice
        return ("error", exc.kind, exc.field, re.sub(r" at 0x[0-9a-f]+", "", exc.reason))


@pytest.fixture
def codec() -> codec_module.AvroCodec:
    return Codecs(make_registry("mock://reader"), TopicSettings()).transaction


def test_the_hand_written_reader_gives_fastavros_dict():
    """Generated traffic, and records of extreme values: None optionals, non-ASCII and
    long strings (lengths of two and three bytes), NaN, infinities and -0.0, event times
    from year 1 to 9999 whose varints take 1 to 9 bytes."""
    records = _generated(1000) + _random_records(4000, seed=11)
    for ms in TIMES:
        records.append({**records[0], "event_time": ms})
    for record in records:
        data = _encode(record)
        mine, end = read_transaction(data, 5)
        assert end == len(data)
        assert _canon(mine) == _canon(_fastavro(data)), record


def test_the_codec_reads_its_own_schema_without_fastavro(codec, monkeypatch):
    records = _generated(300) + _random_records(300, seed=12)
    expected = [_fastavro(codec.encode(r)) for r in records]

    def not_called(*_args: Any, **_kwargs: Any) -> None:
        raise AssertionError("fastavro read a record of the project's own schema")

    monkeypatch.setattr(codec_module.fastavro, "schemaless_reader", not_called)
    for record, want in zip(records, expected, strict=True):
        assert _canon(codec.decode(codec.encode(record))) == _canon(want)


#: Bytes written over or into a record: null and other union branches, lengths negative,
#: huge (2**62), of 10 bytes and more, written in two bytes (0 and -1), invalid UTF-8.
PATCHES = (b"\x00", b"\x01", b"\x02", b"\x04", b"\x7f", b"\x80", b"\xff",
           b"\xff" * 9 + b"\x01", b"\xfe" + b"\xff" * 8 + b"\x7f", b"\x80" * 12, b"\xc3\x28",
           b"\xed\xa0\x80", b"\x81\x01", b"\x80\x00", b"\x81\x00")


def _mutations(data: bytes, rng: random.Random) -> list[bytes]:
    """Every truncation, trailing bytes, and at every position five of :data:`PATCHES`
    or a random byte, written over the record's bytes or inserted."""
    out = [data[:i] for i in range(len(data))] + [data + b"\x00", data + b"\x02zz"]
    for i in range(5, len(data)):
        for patch in [*rng.sample(PATCHES, 5), bytes([rng.randrange(256)])]:
            out.append(data[:i] + patch + data[i + len(patch):])
            out.append(data[:i] + patch + data[i:])
    return out


def test_corrupt_and_truncated_records_fail_as_with_fastavro_alone(codec):
    """Same record or same error (kind, field, reason: the dead letter) as the fastavro
    path, on every mutation of varied records; nothing else is raised."""
    rng = random.Random(3)
    base = _random_records(20, seed=13, longest=64) + _generated(10)
    base.append({**base[0], "event_time": T0_MS, "customer_id": None, "lat": 1.5, "lon": -2.5})
    # every string empty: a length byte 0x00 made 0x01 (-1) leaves a record that reads
    # through to its end if -1 were taken as 0
    empty = {k: "" if isinstance(v, str) else v for k, v in base[-1].items()}
    base += [empty, {**empty, **{k: "" for k, v in empty.items() if v is None}}]
    header = codec.encode(base[0])[:5]
    seen = {"record": 0, "error": 0}
    for record in base:
        data = codec.encode(record)
        for bad in _mutations(data, rng):
            mine = _outcome(codec.decode, bad)
            assert mine == _outcome(codec._fastavro_decode, bad), (data, bad)
            seen[mine[0]] += 1
    assert seen["record"] > 1000 and seen["error"] > 1000  # both sides were exercised
    for ms in OUT_OF_RANGE:  # a time datetime cannot hold: fastavro's OverflowError
        data = header + _encode({**base[0], "event_time": ms})[5:]
        mine = _outcome(codec.decode, data)
        assert mine[:2] == ("error", "decode") and "OverflowError" in mine[3]
        assert mine == _outcome(codec._fastavro_decode, data)


def test_hostile_lengths_are_dead_letters_not_a_hang():
    """A length of 2**62 or -1, and a 10-byte varint: a dead letter each, at once."""
    codecs = Codecs(make_registry("mock://reader-hostile"), TopicSettings())
    good = codecs.transaction.encode(_generated(1)[0])
    header = good[:5]
    huge = b"\xfe" + b"\xff" * 7 + b"\x7f"  # zigzag varint of 2**62 - 1
    values = [header + huge + good[6:], header + b"\x01" + good[6:],
              header + good[5:6] + b"\xff" * 9 + b"\x01" + good[6:], good[:-3], good + b"\x00"]
    pipeline = Pipeline(codecs, RulesScorer(RuleSet.default()),
                        Limits(max_record_bytes=65536, max_future_ms=300_000, max_amount=1e6),
                        clock=lambda: T0_MS / 1000)
    records = [RawRecord("transactions", 0, i, b"k", v, T0_MS) for i, v in enumerate(values)]
    result = pipeline.process(records, lambda _p, keys: [None] * len(keys))
    assert not result.decisions and len(result.dead_letters) == len(values)
    for value, (_key, letter) in zip(values, result.dead_letters, strict=True):
        got = codecs.dead_letter.decode(letter)
        with pytest.raises(DecodeError) as before:
            codecs.transaction._fastavro_decode(value)
        assert (got["error_kind"], got["field"]) == (before.value.kind, before.value.field)
        assert re.sub(r" at 0x[0-9a-f]+", "", got["reason"]) == re.sub(
            r" at 0x[0-9a-f]+", "", before.value.reason)


def test_another_schema_gets_no_hand_written_reader():
    shipped = json.loads(schema_text("transaction"))
    assert reader_for(shipped) is not None
    changes = [
        lambda s: s["fields"].append({"name": "note", "type": ["null", "string"],
                                      "default": None}),
        lambda s: s["fields"][6].update(type="float"),  # amount
        lambda s: s["fields"][1].update(type="long"),  # event_time without its logical type
        lambda s: s["fields"][11].update(type=["double", "null"]),  # lat, branches swapped
        lambda s: s["fields"].insert(8, s["fields"].pop(9)),  # country before mcc
    ]
    for change in changes:
        schema = json.loads(schema_text("transaction"))
        change(schema)
        assert reader_for(schema) is None, schema


def test_other_writer_schemas_are_resolved_by_fastavro_and_ours_read_by_hand(codec,
                                                                             monkeypatch):
    """A writer with its fields in another order (the reader must match them by name, a
    reading in order would swap currency and country), and our own schema registered
    under another id (read by hand, as fastavro would read it without resolution)."""
    record = _generated(1)[0]
    evolved = json.loads(schema_text("transaction"))
    fields = evolved["fields"]
    fields[7], fields[9] = fields[9], fields[7]  # currency <-> country
    sid = codec.registry.register_schema("reordered-value", Schema(json.dumps(evolved), "AVRO"))
    out = io.BytesIO()
    out.write(struct.pack(">bI", 0, sid))
    fastavro.schemaless_writer(out, fastavro.parse_schema(evolved), record)
    back = codec.decode(out.getvalue())
    assert (back["currency"], back["country"]) == (record["currency"], record["country"])

    compact = json.dumps(json.loads(schema_text("transaction")), separators=(",", ":"))
    same = codec.registry.register_schema("same-value", Schema(compact, "AVRO"))
    assert same != codec.schema_id
    data = struct.pack(">bI", 0, same) + codec.encode(record)[5:]
    want = _canon(_fastavro(data))

    def not_called(*_args: Any, **_kwargs: Any) -> None:
        raise AssertionError("fastavro read a record of the project's own schema")

    monkeypatch.setattr(codec_module.fastavro, "schemaless_reader", not_called)
    assert _canon(codec.decode(data)) == want


def test_a_record_of_another_id_is_read_with_its_schema_not_by_hand(codec):
    """Pinned: raw records of the project's schema under the unknown id 999999 are a
    schema error, whatever their body."""
    body = codec.encode(_generated(1)[0])[5:]
    with pytest.raises(DecodeError) as err:
        codec.decode(struct.pack(">bI", 0, 999_999) + body)
    assert err.value.kind == "schema"

