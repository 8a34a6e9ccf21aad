"""The Decision record's Avro body, written by hand: the worker encodes one per transaction.

fastavro's ``schemaless_writer`` walks the schema for every record: about 20 us a
decision here, a tenth of the worker's cost per transaction. :class:`DecisionWriter` writes
the same bytes for ``decision.avsc`` with its fields in a fixed order, and reuses the bytes
of what decisions share: the stage-times map and ``decided_at`` of a micro-batch, and the
strings of few values (reason codes, versions, stages, currencies). A timestamp of our
era is a six-byte varint, written in one expression. It serves only the
schema it was written for: :func:`writer_for` returns None when ``decision.avsc`` has other
fields or types, and the codec then uses fastavro (tests/test_codec_writer.py compares the
two on varied records). A record it does not write as is (a ``datetime`` for a timestamp,
a missing field) goes to fastavro, so conversions and errors are fastavro's.

Avro binary: long as zigzag varint; double as 8 bytes little-endian; string as its length
then UTF-8; enum as its index; boolean as one byte; ``["null", X]`` as the branch index then
X; arrays and maps as one block (count, items) and a 0 count, or a lone 0 when empty.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Mapping
from typing import Any

_DOUBLE = struct.Struct("<d").pack
_SMALL = tuple(bytes([i << 1]) for i in range(64))  # zigzag of 0..63: one byte

#: (field, Avro type) of the schema this writer was written for, in order.
FIELDS = (
    ("transaction_id", "string"), ("card_id", "string"), ("decision", "enum"),
    ("score", "double"), ("reasons", "array<string>"), ("model_version", "string"),
    ("stage", "string"), ("fallback", "boolean"), ("timings_ms", "map<double>"),
    ("late_ms", "double"), ("event_time", "long"), ("source_timestamp", "long"),
    ("decided_at", "long"), ("amount", "?double"), ("currency", "?string"),
    ("amount_ref", "?double"), ("rules_version", "?string"), ("variant", "?string"),
    ("rates_version", "?string"),
)
OUTCOMES = ("approve", "review", "decline")
#: Encoded strings kept per writer (reason codes, versions, stages, currencies).
STRING_CACHE = 4096


def _long(n: int) -> bytes:
    if 0 <= n < 64:
        return _SMALL[n]
    n = (n << 1) ^ (n >> 63)
    if 0x8_0000_0000 <= n < 0x400_0000_0000:  # six bytes: epoch ms from 1970-07 to 2039-09
        return bytes((n & 0x7F | 0x80, n >> 7 & 0x7F | 0x80, n >> 14 & 0x7F | 0x80,
                      n >> 21 & 0x7F | 0x80, n >> 28 & 0x7F | 0x80, n >> 35))
    out = bytearray()
    while n & ~0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _string(value: str) -> bytes:
    data = value.encode()
    return _long(len(data)) + data


def decision_fields(txn: Mapping[str, Any], source_timestamp: int, amount_ref: float,
                    timings_ms: Mapping[str, float], late_ms: float, decided_at: int,
                    rules_version: str | None, rates_version: str | None = None
                    ) -> dict[str, Any]:
    """A decision's fields that are not its verdict's (decision, score, reasons, model and
    stage, fallback, variant): the record is ``{**decision_fields(...), **verdict}``."""
    return {
        "transaction_id": txn["transaction_id"],
        "card_id": txn["card_id"],
        "timings_ms": timings_ms,
        "late_ms": late_ms,
        "event_time": txn["event_time"],
        "source_timestamp": source_timestamp,
        "decided_at": decided_at,
        "amount": txn["amount"],
        "currency": txn["currency"],
        "amount_ref": amount_ref,
        "rules_version": rules_version,
        "rates_version": rates_version,
    }


class DecisionWriter:
    def __init__(self, header: bytes,
                 fallback: Callable[[Mapping[str, Any]], bytes] | None = None) -> None:
        self.header = header
        #: Encodes what this writer does not take as is (fastavro, in the codec).
        self.fallback = fallback
        self._outcome = {name: _long(i) for i, name in enumerate(OUTCOMES)}
        self._map: Mapping[str, float] | None = None
        self._map_bytes = b""
        #: Encoded strings of the fields with few values (stage, version, currency,
        #: reason codes), and the last ``decided_at`` (a batch's decisions share it).
        self._strings: dict[str, bytes] = {}
        self._decided_at: tuple[int, bytes] = (-1, b"")

    def encode(self, d: Mapping[str, Any]) -> bytes:
        try:
            return self._encode(d)
        except Exception:
            if self.fallback is None:
                raise
            return self.fallback(d)

    def encode_decided(self, txn: Mapping[str, Any], verdict: Mapping[str, Any],
                       reasons: list[str], source_timestamp: int, amount_ref: float,
                       timings_ms: Mapping[str, float], late_ms: float, decided_at: int,
                       rules_version: str | None, rates_version: str | None = None) -> bytes:
        """The bytes of ``encode({**decision_fields(txn, ...), **verdict, "reasons":
        reasons})``, without building either dict (the worker's decision, one per
        transaction)."""
        try:
            return self._write(
                txn["transaction_id"], txn["card_id"], verdict["decision"], verdict["score"],
                reasons, verdict["model_version"], verdict["stage"], verdict["fallback"],
                timings_ms, late_ms, txn["event_time"], source_timestamp, decided_at,
                txn["amount"], txn["currency"], amount_ref, rules_version,
                verdict.get("variant"), rates_version)
        except Exception:
            if self.fallback is None:
                raise
            return self.fallback({
                **decision_fields(txn, source_timestamp, amount_ref, timings_ms, late_ms,
                                  decided_at, rules_version, rates_version),
                **verdict, "reasons": reasons})

    def _encode(self, d: Mapping[str, Any]) -> bytes:
        return self._write(
            d["transaction_id"], d["card_id"], d["decision"], d["score"], d["reasons"],
            d["model_version"], d["stage"], d["fallback"], d["timings_ms"],
            d.get("late_ms", 0.0), d["event_time"], d["source_timestamp"], d["decided_at"],
            d.get("amount"), d.get("currency"), d.get("amount_ref"), d.get("rules_version"),
            d.get("variant"), d.get("rates_version"))

    def _write(self, transaction_id: str, card_id: str, decision: str, score: float,
               reasons: list[str], model_version: str, stage: str, fallback: bool,
               timings: Mapping[str, float], late_ms: float, event_time: int,
               source_timestamp: int, decided_at: int, amount: float | None,
               currency: str | None, amount_ref: float | None, rules_version: str | None,
               variant: str | None, rates_version: str | None) -> bytes:
        if timings is not self._map:  # a batch's decisions share one map
            self._map, self._map_bytes = timings, _double_map(timings)
        if decided_at != self._decided_at[0]:
            self._decided_at = (decided_at, _long(decided_at))
        known = self._strings.get
        return b"".join((
            self.header,
            _string(transaction_id),
            _string(card_id),
            self._outcome[decision],
            _DOUBLE(score),
            _long(len(reasons)) + b"".join([known(r) or self._known(r) for r in reasons])
            + b"\x00" if reasons else b"\x00",
            known(model_version) or self._known(model_version),
            known(stage) or self._known(stage),
            b"\x01" if fallback else b"\x00",
            self._map_bytes,
            _DOUBLE(late_ms),
            _long(event_time),
            _long(source_timestamp),
            self._decided_at[1],
            b"\x00" if amount is None else b"\x02" + _DOUBLE(amount),
            b"\x00" if currency is None else b"\x02" + (known(currency)
                                                        or self._known(currency)),
            b"\x00" if amount_ref is None else b"\x02" + _DOUBLE(amount_ref),
            b"\x00" if rules_version is None else b"\x02" + (known(rules_version)
                                                             or self._known(rules_version)),
            b"\x00" if variant is None else b"\x02" + _string(variant),
            b"\x00" if rates_version is None else b"\x02" + (known(rates_version)
                                                             or self._known(rates_version)),
        ))

    def _known(self, value: str) -> bytes:
        """``value`` encoded, and kept for the next decisions (a bounded cache: cleared
        when full, so free text in a field costs only the cache's use)."""
        data = _string(value)  # raises on what is not a str: the record goes to fastavro
        if len(self._strings) >= STRING_CACHE:
            self._strings.clear()
        self._strings[value] = data
        return data


def _double_map(m: Mapping[str, float]) -> bytes:
    if not m:
        return b"\x00"
    return _long(len(m)) + b"".join(_string(k) + _DOUBLE(v) for k, v in m.items()) + b"\x00"


def _type_name(t: Any) -> str:
    if isinstance(t, list):
        if len(t) == 2 and t[0] == "null":
            return "?" + _type_name(t[1])
        return "union"
    if isinstance(t, dict):
        kind = t.get("type")
        if kind == "array":
            return f"array<{_type_name(t['items'])}>"
        if kind == "map":
            return f"map<{_type_name(t['values'])}>"
        if kind == "enum":
            return "enum" if tuple(t.get("symbols", ())) == OUTCOMES else "enum?"
        return _type_name(kind)
    return str(t)


def writer_for(schema: Mapping[str, Any], header: bytes,
               fallback: Callable[[Mapping[str, Any]], bytes] | None = None
               ) -> DecisionWriter | None:
    """A writer for ``schema`` (the JSON of decision.avsc), or None when it is not the
    schema this writer knows; ``fallback`` encodes what it does not take as is."""
    fields = tuple((f["name"], _type_name(f["type"])) for f in schema.get("fields", ()))
    return DecisionWriter(header, fallback) if fields == FIELDS else None
