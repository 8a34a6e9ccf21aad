"""The common transaction read from its Avro body and validated in one pass.

The worker reads every record of ``transactions`` (:mod:`fraudstream.schemas.transaction_reader`,
about 5.5 us) into the dict fastavro gives, then validates it
(:func:`fraudstream.schemas.validate.validate_transaction`, about 5 us): a dict built, a
``datetime`` built for the event time and taken apart again, seventeen lookups, a second
dict. :func:`read_checked` goes from the bytes to the normalized transaction directly,
for the record every producer sends: short ASCII strings, every check passed.

It returns exactly what ``validate_transaction(codec.decode(data), ...)`` returns for
such a record (the same keys in the same order, the same values and types), and None for
anything else: a string of 64 bytes or more, one that is not printable ASCII, a union
branch other than null or the value, a value any check would refuse, bytes that end early
or go on after the record. The caller then takes the long way, which reads the record
again and names the error or the field at fault (tests/test_transaction_fast.py compares
the two on generated, odd, refused and corrupt records).

The checks are :func:`fraudstream.schemas.validate._usual`'s, in the same words.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable
from typing import Any

from fraudstream.schemas.fx import Rates
from fraudstream.schemas.validate import (
    _IPV4,
    _LONG_RUN,
    _THIRTEEN,
    CHANNELS,
    MIN_EVENT_TIME_MS,
    _priced,
)

#: (data, start of the body, latest event time taken, max amount, rates) -> the
#: transaction or None.
CheckedReader = Callable[[bytes, int, int, float, Rates], "dict[str, Any] | None"]
_DOUBLE = struct.Struct("<d").unpack_from
#: Bytes that may be part of a card number (digits, space, dash) to ``0``, the rest to
#: ``x``: a record without 13 of them in a row holds no card number in any field.
_RUN_BYTES = bytes(0x30 if chr(b) in "0123456789 -" else 0x78 for b in range(256))
_RUN_OF_13 = b"0" * 13
#: The last millisecond fastavro turns into a ``datetime`` (9999-12-31): a later event
#: time is a decode error on the long way, so it is not taken here.
_MAX_DATETIME_MS = 253_402_300_799_999


def read_checked(data: bytes, p: int, latest_ms: int, max_amount: float,
                 rates: Rates) -> dict[str, Any] | None:
    """The normalized transaction of the Avro body at ``data[p:]`` (which must end with
    the record), or None: read and validate it the long way (see the module).
    ``latest_ms``: the latest event time taken (now plus the future allowed)."""
    try:
        # A string's length byte: zigzag, so an even byte under 0x80 is a length of 0-63.
        # Anything else (a longer or a negative length) is left to the long way.
        n_txn = data[p]  # transaction_id
        if n_txn & 0x81:
            return None
        p += 1
        end = p + (n_txn >> 1)
        txn_id = data[p:end].decode()
        # event_time: timestamp-millis. Times from 1970-07 to 2039-09 take 6 bytes.
        b0, b1, b2, b3, b4, b5 = data[end:end + 6]
        if not (b0 & b1 & b2 & b3 & b4 & 0x80 and not b5 & 0x80):
            return None
        z = (b0 & 0x7F | (b1 & 0x7F) << 7 | (b2 & 0x7F) << 14 | (b3 & 0x7F) << 21
             | (b4 & 0x7F) << 28 | b5 << 35)
        event_time = (z >> 1) ^ -(z & 1)
        if not MIN_EVENT_TIME_MS <= event_time <= latest_ms \
                or event_time > _MAX_DATETIME_MS:
            return None
        p = end + 6
        n_card = data[p]  # card_id
        if n_card & 0x81:
            return None
        p += 1
        end = p + (n_card >> 1)
        card_id = data[p:end].decode()
        b = data[end]  # customer_id: ["null", "string"]
        if b == 0:
            customer_id, n_cust = None, 0
            p = end + 1
        elif b == 2:
            n_cust = data[end + 1]
            if n_cust & 0x81:
                return None
            p = end + 2
            end = p + (n_cust >> 1)
            customer_id = data[p:end].decode()
            p = end
        else:
            return None
        n_merch = data[p]  # merchant_id
        if n_merch & 0x81:
            return None
        p += 1
        end = p + (n_merch >> 1)
        merchant_id = data[p:end].decode()
        b = data[end]  # terminal_id: ["null", "string"]
        if b == 0:
            terminal_id, n_term = None, 0
            p = end + 1
        elif b == 2:
            n_term = data[end + 1]
            if n_term & 0x81:
                return None
            p = end + 2
            end = p + (n_term >> 1)
            terminal_id = data[p:end].decode()
            p = end
        else:
            return None
        (amount,) = _DOUBLE(data, p)
        if not 0.0 <= amount < math.inf:
            return None
        amount += 0.0  # -0.0 is 0.0
        p += 8
        # currency: a string of 3 (length byte 6), as every valid one is
        if data[p] != 6:
            return None
        currency = data[p + 1:p + 4].decode()
        p += 4
        b = data[p]  # mcc: ["null", "string"] of 4 (length byte 8)
        if b == 0:
            mcc = None
            p += 1
        elif b == 2 and data[p + 1] == 8:
            mcc = data[p + 2:p + 6].decode()
            p += 6
        else:
            return None
        if data[p] != 4:  # country: a string of 2
            return None
        country = data[p + 1:p + 3].decode()
        p += 3
        b = data[p]  # card_country: ["null", "string"] of 2
        if b == 0:
            card_country = None
            p += 1
        elif b == 2 and data[p + 1] == 4:
            card_country = data[p + 2:p + 4].decode()
            p += 4
        else:
            return None
        b = data[p]  # lat, lon: ["null", "double"], both or neither
        if b == 0:
            if data[p + 1] != 0:
                return None
            lat = lon = None
            p += 2
        elif b == 2 and data[p + 9] == 2:
            (lat,) = _DOUBLE(data, p + 1)
            (lon,) = _DOUBLE(data, p + 10)
            if not (-90.0 <= lat <= 90.0 and -180.0 <= lon <= 180.0):
                return None
            p += 18
        else:
            return None
        b = data[p]  # device_id: ["null", "string"]
        if b == 0:
            device_id, n_dev = None, 0
            p += 1
        elif b == 2:
            n_dev = data[p + 1]
            if n_dev & 0x81:
                return None
            p += 2
            end = p + (n_dev >> 1)
            device_id = data[p:end].decode()
            p = end
        else:
            return None
        b = data[p]  # ip: ["null", "string"]
        if b == 0:
            ip = None
            p += 1
        elif b == 2:
            n = data[p + 1]
            if n & 0x81:
                return None
            p += 2
            end = p + (n >> 1)
            ip = data[p:end].decode()
            if _IPV4.fullmatch(ip) is None:
                return None
            p = end
        else:
            return None
        n = data[p]  # channel
        if n & 0x81:
            return None
        p += 1
        end = p + (n >> 1)
        channel = data[p:end].decode()
    except (IndexError, ValueError, struct.error):  # short bytes, not UTF-8
        return None
    if end != len(data) or channel not in CHANNELS:
        return None
    # Every string printable ASCII (one test over all of them; ``ip`` matched the
    # pattern, ``channel`` is a known one); the required ones not blank; all shorter than 64.
    text = "|".join((txn_id, card_id, merchant_id, currency, country, customer_id or "",
                     terminal_id or "", mcc or "", card_country or "", device_id or ""))
    if not (text.isascii() and text.isprintable() and txn_id and card_id and merchant_id
            and (" " not in text or txn_id.strip() and card_id.strip()
                 and merchant_id.strip())):
        return None
    # ASCII from here: isalpha and isupper are [A-Z], isdigit is [0-9]
    if not (currency.isalpha() and currency.isupper() and country.isalpha()
            and country.isupper()
            and (card_country is None or card_country.isalpha() and card_country.isupper())
            and (mcc is None or mcc.isdigit())):
        return None
    # No card number in an identifier: none can hold 13 digits when all are shorter than
    # 13 (length byte 26); nor when the record's bytes hold no 13 digits, spaces or dashes
    # in a row (one pass in C over them; a run in the binary fields, rare, only costs the
    # search per identifier). An IP address that matched the pattern holds none.
    if max(n_txn, n_card, n_merch, n_cust, n_term, n_dev) >= 26 \
            and _RUN_OF_13 in data.translate(_RUN_BYTES):
        ids = [v for v in (txn_id, card_id, merchant_id, customer_id, terminal_id, device_id)
               if v is not None]
        if any(map(_LONG_RUN.search, ids)) and any(map(_THIRTEEN.search, ids)):
            return None
    return _priced(txn_id, event_time, card_id, merchant_id, amount, currency, mcc, country,
                   card_country, lat, lon, ip, channel, customer_id, terminal_id, device_id,
                   rates, max_amount)
