"""Malformed transaction records, one kind at a time, with the dead-letter reason each must
get. Used by ``fraudstream produce --bad-ratio`` (demos) and by the tests.

Each kind returns the bytes to send and the ``(error_kind, field)`` the worker must write in
the dead letter.
"""

from __future__ import annotations

import io
import json
import struct
import time
from collections.abc import Callable
from typing import Any

import fastavro
import orjson
from confluent_kafka.schema_registry import Schema

from fraudstream.schemas.codec import Codecs, schema_text

Expected = tuple[str, str | None]  # (error_kind, field)


def _writer_schema(drop: str | None = None, retype: tuple[str, str] | None = None) -> str:
    schema = json.loads(schema_text("transaction"))
    schema["name"] = "TransactionVariant"
    fields = []
    for f in schema["fields"]:
        if f["name"] == drop:
            continue
        if retype and f["name"] == retype[0]:
            f = {"name": f["name"], "type": retype[1]}
        fields.append(f)
    schema["fields"] = fields
    return json.dumps(schema)


class MalformedFactory:
    """Turns a good transaction dict into a malformed record of a chosen kind."""

    def __init__(self, codecs: Codecs, input_format: str = "avro", max_bytes: int = 65536,
                 clock: Callable[[], float] = time.time) -> None:
        """``clock``: the worker's wall clock, as seconds. The one bound the worker checks
        against the wall clock is how far ahead an event_time may be, so ``future_time``
        puts the event a day ahead of both the transaction and ``clock()`` (test data may
        lie far in the past)."""
        self.codecs = codecs
        self.clock = clock
        self.format = input_format
        self.max_bytes = max_bytes
        self._variants: dict[str, tuple[bytes, Any]] = {}
        registry = codecs.transaction.registry
        for name, text in (
            ("missing_field", _writer_schema(drop="merchant_id")),
            ("wrong_type", _writer_schema(retype=("amount", "string"))),
        ):
            sid = registry.register_schema(f"fraudstream-test-{name}", Schema(text, "AVRO"))
            header = struct.pack(">bI", 0, sid)
            self._variants[name] = (header, fastavro.parse_schema(json.loads(text)))
        self.kinds: dict[str, Callable[[dict[str, Any]], tuple[bytes, Expected]]] = {
            "garbage": self.garbage,
            "unknown_schema": self.unknown_schema,
            "truncated": self.truncated,
            "missing_field": self.missing_field,
            "wrong_type": self.wrong_type,
            "nan_amount": lambda t: self._good(dict(t, amount=float("nan")), "amount"),
            "negative_amount": lambda t: self._good(dict(t, amount=-t["amount"]), "amount"),
            "absurd_amount": lambda t: self._good(dict(t, amount=1e12), "amount"),
            "future_time": lambda t: self._good(dict(t, event_time=max(
                t["event_time"], int(self.clock() * 1000)) + 86_400_000), "event_time"),
            "card_number": lambda t: self._good(dict(t, card_id="4111111111111111"), "card_id"),
            # a card number in another identifier (after a customer_id ending in a digit)
            "card_number_in_merchant": lambda t: self._good(
                dict(t, customer_id="cust_123", merchant_id="4111111111111111"), "merchant_id"),
            # a right-to-left override and a terminal escape
            "control_character": lambda t: self._good(dict(t, device_id="dev\u202e\x1b[2J"),
                                                      "device_id"),
            "bad_channel": lambda t: self._good(dict(t, channel="carrier-pigeon"), "channel"),
            # a well-formed ISO 4217 code that no rates table for card spend holds (gold)
            "unknown_currency": lambda t: self._good(dict(t, currency="XAU"), "currency"),
            "oversize": self.oversize,
        }
        if input_format == "json":
            for kind in ("unknown_schema", "truncated"):
                self.kinds.pop(kind)

    def make(self, kind: str, txn: dict[str, Any]) -> tuple[bytes, Expected]:
        return self.kinds[kind](txn)

    def _encode(self, txn: dict[str, Any]) -> bytes:
        if self.format == "json":
            return orjson.dumps(txn, option=orjson.OPT_SERIALIZE_NUMPY)
        return self.codecs.transaction.encode(txn)

    def _good(self, txn: dict[str, Any], field: str) -> tuple[bytes, Expected]:
        if self.format == "json" and txn.get("amount") != txn.get("amount"):
            # JSON has no NaN: send the token a careless producer would write
            raw = self._encode(dict(txn, amount=0.0)).replace(b'"amount":0.0', b'"amount":NaN')
            return raw, ("decode", None)
        return self._encode(txn), ("validation", field)

    def garbage(self, txn: dict[str, Any]) -> tuple[bytes, Expected]:
        return b"\xde\xad\xbe\xef not a transaction \xff", ("decode", None)

    def unknown_schema(self, txn: dict[str, Any]) -> tuple[bytes, Expected]:
        body = self.codecs.transaction.encode(txn)
        return struct.pack(">bI", 0, 999_999) + body[5:], ("schema", None)

    def truncated(self, txn: dict[str, Any]) -> tuple[bytes, Expected]:
        body = self.codecs.transaction.encode(txn)
        return body[: len(body) // 2], ("decode", None)

    def missing_field(self, txn: dict[str, Any]) -> tuple[bytes, Expected]:
        if self.format == "json":
            return self._encode({k: v for k, v in txn.items() if k != "merchant_id"}), (
                "validation", "merchant_id")
        header, schema = self._variants["missing_field"]
        out = io.BytesIO(header)
        out.seek(len(header))
        fastavro.schemaless_writer(out, schema, txn)
        return out.getvalue(), ("schema", "merchant_id")

    def wrong_type(self, txn: dict[str, Any]) -> tuple[bytes, Expected]:
        if self.format == "json":
            return self._encode(dict(txn, amount=str(txn["amount"]))), ("validation", "amount")
        header, schema = self._variants["wrong_type"]
        out = io.BytesIO(header)
        out.seek(len(header))
        fastavro.schemaless_writer(out, schema, dict(txn, amount=str(txn["amount"])))
        return out.getvalue(), ("schema", "amount")

    def oversize(self, txn: dict[str, Any]) -> tuple[bytes, Expected]:
        big = dict(txn, device_id="d" * 120, customer_id="c" * (self.max_bytes + 10))
        return self._encode(big), ("oversize", None)
