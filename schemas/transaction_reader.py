"""The Transaction record's Avro body, read by hand: the worker decodes one per record.

fastavro's ``schemaless_reader`` walks the schema for every record: about 9-10 us a
transaction here. :func:`read_transaction` reads ``transaction.avsc`` field after field in
straight-line code and builds the dict fastavro builds: the same keys in the same order,
``str`` and ``float`` values, ``None`` for a null branch, and the ``timestamp-millis``
event time as the timezone-aware ``datetime`` fastavro gives (the same value, computed
exactly in integers).

It serves only the schema it was written for: :func:`reader_for` returns None when
``transaction.avsc`` has other fields or types, and the codec uses it only for records
whose writer schema is that same schema. It reads only what it takes as is and raises on
anything else: a union branch other than ``0x00``/``0x02``, a negative length, a varint
of ten bytes or more, a string that is not UTF-8, a body that ends early, a time out of
``datetime``'s range. The codec then reads the record again with fastavro, so the record
it returns on such bytes, or the error and with it the dead letter, is fastavro's
(tests/test_codec_reader.py compares the two on varied and on corrupt records).

Avro binary: long as zigzag varint; double as 8 bytes little-endian; string as its length
then UTF-8; ``["null", X]`` as the branch index (``0x00`` null, ``0x02`` X) then X.
Every read is bounded by the record's bytes: a huge length ends past the end, and the
next byte read or the final check refuses it; nothing loops on the input's say-so.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

_DOUBLE = struct.Struct("<d").unpack_from
#: fastavro's epoch for timestamp-millis (``datetime.UTC`` is ``timezone.utc``).
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MS = timedelta(milliseconds=1)

#: (field, Avro type) of the schema this reader was written for, in order.
FIELDS = (
    ("transaction_id", "string"), ("event_time", "timestamp-millis"), ("card_id", "string"),
    ("customer_id", "?string"), ("merchant_id", "string"), ("terminal_id", "?string"),
    ("amount", "double"), ("currency", "string"), ("mcc", "?string"), ("country", "string"),
    ("card_country", "?string"), ("lat", "?double"), ("lon", "?double"),
    ("device_id", "?string"), ("ip", "?string"), ("channel", "string"),
)

Reader = Callable[[bytes, int], tuple[dict[str, Any], int]]


class Unusual(ValueError):
    """Bytes this reader does not take as is; fastavro reads them instead."""


def _long(data: bytes, p: int) -> tuple[int, int]:
    """The zigzag varint at ``p`` and where it ends. Up to 9 bytes (63 bits), where
    fastavro's 64-bit arithmetic and Python's agree; longer ones are left to fastavro."""
    n = shift = 0
    while True:
        b = data[p]
        p += 1
        n |= (b & 0x7F) << shift
        if not b & 0x80:
            return (n >> 1) ^ -(n & 1), p
        shift += 7
        if shift > 56:
            raise Unusual("varint of 10 bytes or more")


def _size(data: bytes, p: int) -> tuple[int, int]:
    """A string's length written in more than one byte, or negative (refused)."""
    n, p = _long(data, p)
    if n < 0:
        raise Unusual(f"negative length {n}")
    return n, p


def peek_event_time(data: bytes, p: int) -> int:
    """The ``event_time`` of a transaction in our schema at ``p`` (its first fields:
    ``transaction_id``, ``event_time``), without reading the rest; raises on bytes that
    do not hold them."""
    n, p = _size(data, p)
    t, end = _long(data, p + n)
    if end > len(data):
        raise Unusual("truncated")
    return t


def read_transaction(data: bytes, p: int) -> tuple[dict[str, Any], int]:
    """The Transaction at ``data[p:]`` and where it ends; raises on anything unusual (see
    the module). A length byte with the high or the low bit set (a length over 63, or a
    negative one) goes through :func:`_size`; strings slice past the end silently, and the
    final check refuses a record that claims more bytes than it has."""
    n = data[p]  # transaction_id: string
    if n & 0x81:
        n, p = _size(data, p)
    else:
        n >>= 1
        p += 1
    transaction_id = data[p:p + n].decode()
    p += n
    # event_time: timestamp-millis. Times from 1970-07 to 2039-09 take 6 bytes.
    b0, b1, b2, b3, b4, b5 = data[p:p + 6]
    if b0 & b1 & b2 & b3 & b4 & 0x80 and not b5 & 0x80:
        n = (b0 & 0x7F | (b1 & 0x7F) << 7 | (b2 & 0x7F) << 14 | (b3 & 0x7F) << 21
             | (b4 & 0x7F) << 28 | b5 << 35)
        ms = (n >> 1) ^ -(n & 1)
        p += 6
    else:
        ms, p = _long(data, p)
    # fastavro: epoch + timedelta(microseconds=ms * 1000), equal and exact for an int
    event_time = _EPOCH + _MS * ms
    n = data[p]  # card_id: string
    if n & 0x81:
        n, p = _size(data, p)
    else:
        n >>= 1
        p += 1
    card_id = data[p:p + n].decode()
    p += n
    customer_id, p = _optional_string(data, p)
    n = data[p]  # merchant_id: string
    if n & 0x81:
        n, p = _size(data, p)
    else:
        n >>= 1
        p += 1
    merchant_id = data[p:p + n].decode()
    p += n
    terminal_id, p = _optional_string(data, p)
    (amount,) = _DOUBLE(data, p)  # amount: double
    p += 8
    n = data[p]  # currency: string
    if n & 0x81:
        n, p = _size(data, p)
    else:
        n >>= 1
        p += 1
    currency = data[p:p + n].decode()
    p += n
    mcc, p = _optional_string(data, p)
    n = data[p]  # country: string
    if n & 0x81:
        n, p = _size(data, p)
    else:
        n >>= 1
        p += 1
    country = data[p:p + n].decode()
    p += n
    card_country, p = _optional_string(data, p)
    b = data[p]  # lat: ["null", "double"]
    if b == 0:
        lat = None
        p += 1
    elif b == 2:
        (lat,) = _DOUBLE(data, p + 1)
        p += 9
    else:
        raise Unusual(f"lat: union branch byte {b}")
    b = data[p]  # lon: ["null", "double"]
    if b == 0:
        lon = None
        p += 1
    elif b == 2:
        (lon,) = _DOUBLE(data, p + 1)
        p += 9
    else:
        raise Unusual(f"lon: union branch byte {b}")
    device_id, p = _optional_string(data, p)
    ip, p = _optional_string(data, p)
    n = data[p]  # channel: string
    if n & 0x81:
        n, p = _size(data, p)
    else:
        n >>= 1
        p += 1
    channel = data[p:p + n].decode()
    p += n
    if p > len(data):
        raise Unusual(f"record claims {p} bytes, has {len(data)}")
    return {
        "transaction_id": transaction_id, "event_time": event_time, "card_id": card_id,
        "customer_id": customer_id, "merchant_id": merchant_id, "terminal_id": terminal_id,
        "amount": amount, "currency": currency, "mcc": mcc, "country": country,
        "card_country": card_country, "lat": lat, "lon": lon, "device_id": device_id,
        "ip": ip, "channel": channel,
    }, p


def _optional_string(data: bytes, p: int) -> tuple[str | None, int]:
    b = data[p]
    if b == 0:
        return None, p + 1
    if b != 2:
        raise Unusual(f"union branch byte {b}")
    n = data[p + 1]
    if n & 0x81:
        n, p = _size(data, p + 1)
    else:
        n >>= 1
        p += 2
    return data[p:p + n].decode(), p + n


def _type_name(t: Any) -> str:
    if isinstance(t, list):
        if len(t) == 2 and t[0] == "null":
            return "?" + _type_name(t[1])
        return "union"
    if isinstance(t, dict):
        if "logicalType" in t:
            return f"{t['logicalType']}" if t.get("type") == "long" else "logical?"
        return _type_name(t.get("type"))
    return str(t)


def reader_for(schema: Mapping[str, Any]) -> Reader | None:
    """A reader for ``schema`` (the JSON of transaction.avsc), or None when it is not the
    schema this reader knows."""
    if schema.get("type") != "record":
        return None
    fields = tuple((f["name"], _type_name(f["type"])) for f in schema.get("fields", ()))
    return read_transaction if fields == FIELDS else None
