"""What a stored feature record is: a flat little-endian float64 array.

A card's or entity's state is one record, read and written once per micro-batch by
:mod:`fraudstream.state.engine` and worked on by :mod:`fraudstream.state.kernel`. Decoding is
``np.frombuffer`` (no parsing, no Python objects per event); every value is a float64, which
holds event times, offsets and 32-bit tokens exactly.

Card record (``CARD_CODE``)::

    [code, last_offset, max_ts, loc_ts, loc_lat, loc_lon,
     n_recent, n_hours, n_days, n_merchants, n_countries, n_devices,
     recent    n_recent    x [ts, amount, lat, lon]      (lat, lon NaN: no location)
     hours     n_hours     x [hour, n, sum, max]
     days      n_days      x [day, n, sum, max, sum of squares]
     merchants n_merchants x [token, last seen]          (likewise countries, devices)]

Merchant, device and IP partial record (``ENTITY_CODE``)::

    [code, last_offset, last_label_offset, max_ts,
     n_recent, n_hours, n_days, n_fraud_days, n_cards,
     recent x [ts], hours x [hour, n, sum], days x [day, n, sum],
     fraud_days x [day available, n], cards x [card token, last seen]]

``loc_ts`` is NaN when the card has no location yet. Rows are sorted by time (recent) or
index (buckets); seen sets keep their insertion order, which decides which entry is
forgotten first when a set is full.

Records of the earlier JSON layout (version 1, a JSON array) are still read: they are
converted on read, and written back in this layout.
"""

from __future__ import annotations

import math
import struct
from typing import Any

import numpy as np
import orjson

#: The first value of a record says what it is (and its layout version).
CARD_CODE = 2.1
ENTITY_CODE = 2.2

CARD_HEAD = 12
CARD_WIDTHS = (4, 4, 5, 2, 2, 2)
ENTITY_HEAD = 9
ENTITY_WIDTHS = (1, 3, 3, 2, 2)

_JSON_VERSION = 1


def card_record(last_offset: float, max_ts: float, loc: Any, recent: Any, hours: Any,
                days: Any, merchants: Any, countries: Any, devices: Any) -> bytes:
    """A card record from its parts (lists of rows; seen sets as (token, ts) rows)."""
    loc = loc if loc is not None else (math.nan, math.nan, math.nan)
    sections = [_rows(recent, 4), _rows(hours, 4), _rows(days, 5), _rows(merchants, 2),
                _rows(countries, 2), _rows(devices, 2)]
    head = [CARD_CODE, last_offset, max_ts, *loc, *(len(s) // w for s, w in
                                                     zip(sections, CARD_WIDTHS, strict=True))]
    return np.concatenate([np.array(head, dtype="<f8"), *sections]).tobytes()


def entity_record(last_offset: float, last_label_offset: float, max_ts: float, recent: Any,
                  hours: Any, days: Any, fraud_days: Any, cards: Any) -> bytes:
    """A merchant, device or IP partial record from its parts."""
    sections = [_rows([[t] for t in recent], 1), _rows(hours, 3), _rows(days, 3),
                _rows(fraud_days, 2), _rows(cards, 2)]
    head = [ENTITY_CODE, last_offset, last_label_offset, max_ts,
            *(len(s) // w for s, w in zip(sections, ENTITY_WIDTHS, strict=True))]
    return np.concatenate([np.array(head, dtype="<f8"), *sections]).tobytes()


def _rows(rows: Any, width: int) -> np.ndarray:
    flat = np.array([[math.nan if x is None else float(x) for x in r] for r in rows],
                    dtype="<f8").reshape(-1)
    if flat.size % width or any(len(r) != width for r in rows):
        raise ValueError(f"rows of {width} values expected")
    return flat


def sections(record: bytes) -> tuple[np.ndarray, list[np.ndarray]]:
    """(head, [section as rows x width]) of a record; ValueError if it is not one."""
    if len(record) % 8:
        raise ValueError("a feature record is a whole number of float64 values")
    a = np.frombuffer(record, dtype="<f8")
    if a.size and a[0] == CARD_CODE:
        head_n, widths, counts_at = CARD_HEAD, CARD_WIDTHS, 6
    elif a.size and a[0] == ENTITY_CODE:
        head_n, widths, counts_at = ENTITY_HEAD, ENTITY_WIDTHS, 4
    else:
        raise ValueError("not a feature record")
    if a.size < head_n:
        raise ValueError("a feature record shorter than its head")
    out, pos = [], head_n
    for i, w in enumerate(widths):
        n = a[counts_at + i]
        if not (n >= 0 and n == int(n)) or pos + int(n) * w > a.size:
            raise ValueError("a feature record's counts do not match its length")
        out.append(a[pos:pos + int(n) * w].reshape(-1, w))
        pos += int(n) * w
    if pos != a.size:
        raise ValueError("a feature record's counts do not match its length")
    return a[:head_n], out


#: What a record of the version 1 JSON layout starts with.
LEGACY_MARK = b"["


def is_legacy(record: bytes) -> bool:
    return record[:1] == LEGACY_MARK


def from_legacy(record: bytes, card: bool) -> bytes:
    """The record of the version 1 JSON layout, in this layout (ValueError or TypeError if it
    is not one)."""
    r = orjson.loads(record)
    n = 10 if card else 9
    if not isinstance(r, list) or len(r) != n or r[0] != _JSON_VERSION:
        raise ValueError(f"not a version {_JSON_VERSION} feature record of {n} fields")
    if card:
        _v, last, max_ts, loc, recent, hours, days, merchants, countries, devices = r
        return card_record(last, max_ts, loc, recent, hours, days, _seen(merchants),
                           _seen(countries), _seen(devices))
    _v, last, last_label, max_ts, recent, hours, days, fraud_days, cards = r
    return entity_record(last, last_label, max_ts, recent, hours, days, fraud_days,
                         _seen(cards))


def _seen(seen: dict[str, float]) -> list[list[float]]:
    return [[int(tok, 16), ts] for tok, ts in seen.items()]


def record_max_ts(record: bytes) -> float:
    """The latest event time a card or entity record holds (for idle expiry)."""
    if is_legacy(record):
        r = orjson.loads(record)
        return float(r[2] if len(r) == 10 else r[3])
    if len(record) < 8 * ENTITY_HEAD or len(record) % 8:
        raise ValueError("not a feature record")
    code, = struct.unpack_from("<d", record, 0)
    if code not in (CARD_CODE, ENTITY_CODE):
        raise ValueError("not a feature record")
    return struct.unpack_from("<d", record, 16 if code == CARD_CODE else 24)[0]
