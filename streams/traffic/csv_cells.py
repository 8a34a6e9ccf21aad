"""One cell of a user's history file: card numbers told apart and tokenized, times and
values parsed to what the transaction schema holds. Each parser raises ValueError saying
what it expected (:mod:`fraudstream.streams.traffic.csv_source` names the column)."""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import math
import re
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MS = timedelta(milliseconds=1)
_PAN = re.compile(r"^[0-9][0-9 -]*[0-9](\.0+)?$")  # "4111 1111 ...", "4111...1111.0"
_PAN_SCI = re.compile(r"^[0-9](\.[0-9]+)?[eE]\+?(1[2-8])$")  # spreadsheet: 4.111111111111111e+15
_CHANNELS = {"pos": "pos", "ecom": "ecom", "atm": "atm", "moto": "moto",
             "contactless": "contactless", "online": "ecom", "internet": "ecom", "web": "ecom",
             "cnp": "ecom", "card_present": "pos", "nfc": "contactless"}
_TRUE = frozenset({"1", "1.0", "true", "t", "yes", "y", "fraud"})
_FALSE = frozenset({"0", "0.0", "false", "f", "no", "n", "genuine", "legit"})


def _card_digits(value: str) -> str | None:
    v = value.strip()
    if _PAN_SCI.match(v):
        digits = str(int(Decimal(v)))
    elif _PAN.match(v):
        digits = "".join(c for c in v.partition(".")[0] if c.isdigit())
    else:
        return None
    return digits if 13 <= len(digits) <= 19 else None


def looks_like_card_number(value: str) -> bool:
    """13-19 digits, spaces or dashes allowed, also as a spreadsheet would write them
    (``...1111.0``, ``4.111111111111111e+15``). No Luhn check: we err on the safe side."""
    return _card_digits(value) is not None


def tokenize_card(value: str, key: bytes | str) -> str:
    """Keyed, stable token for a card number: ``tok_`` + 16 hex of HMAC-SHA256(key, digits).

    Formatting (spaces, dashes, ``.0``) does not change the token; without the key it cannot
    be reversed by enumerating card numbers.
    """
    digits = _card_digits(value) or "".join(c for c in value if c.isdigit())
    k = key.encode() if isinstance(key, str) else key
    return "tok_" + hmac.new(k, digits.encode(), hashlib.sha256).hexdigest()[:16]


def parse_event_time(value: str, time_format: str = "auto") -> int:
    """Epoch millis (UTC) from a cell; raises ValueError saying what was expected."""
    v = value.strip()
    if time_format in ("auto", "epoch_s", "epoch_ms"):
        try:
            num = float(v)
        except ValueError:
            if time_format != "auto":
                raise ValueError(f"expected an epoch number, got {v!r}") from None
        else:
            if not math.isfinite(num):
                raise ValueError(f"not a finite time: {v!r}")
            if time_format == "epoch_ms":
                return round(num)
            if time_format == "auto" and abs(num) >= 1e11:  # 1e11 s is year 5138: millis
                return round(num / 1000) if abs(num) >= 1e14 else round(num)
            return round(num * 1000)
    try:
        if time_format in ("auto", "iso"):
            dt = datetime.fromisoformat(v)
        else:
            dt = datetime.strptime(v, time_format)
    except ValueError:
        want = "an ISO-8601 time or epoch number" if time_format == "auto" else time_format
        raise ValueError(f"expected {want}, got {v!r}") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return (dt - _EPOCH) // _MS


def text(v: str) -> str:
    return v


def _number(v: str) -> float:
    try:
        x = float(v)
    except ValueError:
        raise ValueError(f"cannot read {v!r} as a number") from None
    if not math.isfinite(x):
        raise ValueError(f"not a finite number: {v!r}")
    return x


def _amount(v: str) -> float:
    x = _number(v)
    if x < 0:
        raise ValueError(f"must not be negative, got {v!r}")
    return x


def _ranged(limit: float) -> Any:
    def parse(v: str) -> float:
        x = _number(v)
        if not -limit <= x <= limit:
            raise ValueError(f"{v!r} out of [-{limit:g}, {limit:g}]")
        return x
    return parse


def _code(n: int, what: str) -> Any:
    pattern = re.compile(rf"^[A-Z]{{{n}}}$")

    def parse(v: str) -> str:
        if not pattern.match(v.upper()):
            raise ValueError(f"expected {what}, got {v!r}")
        return v.upper()
    return parse


_MCC = re.compile(r"([0-9]{1,4})(\.0*)?")
# A dotted quad as ipaddress writes it (no leading zeros): already in its normal form.
_IPV4 = re.compile(r"(?:(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])\.){3}"
                   r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])")


def _mcc(v: str) -> str:
    m = _MCC.fullmatch(v)
    if not m:
        raise ValueError(f"expected a 4-digit merchant category code, got {v!r}")
    return m.group(1).zfill(4)


def _channel(v: str) -> str:
    if v.lower() not in _CHANNELS:
        raise ValueError(f"expected one of pos, ecom, atm, moto, contactless, got {v!r}")
    return _CHANNELS[v.lower()]


def _ip(v: str) -> str:
    if _IPV4.fullmatch(v):
        return v
    try:
        return str(ipaddress.ip_address(v))
    except ValueError:
        raise ValueError(f"not an IP address: {v!r}") from None


def _label(v: str) -> bool:
    if v.lower() in _TRUE:
        return True
    if v.lower() in _FALSE:
        return False
    raise ValueError(f"expected 1/0, true/false or yes/no, got {v!r}")


PARSE = {
    "amount": _amount, "lat": _ranged(90.0), "lon": _ranged(180.0),
    "currency": _code(3, "an ISO 4217 code like EUR"),
    "country": _code(2, "an ISO 3166 alpha-2 code like FR"),
    "card_country": _code(2, "an ISO 3166 alpha-2 code like FR"),
    "mcc": _mcc, "channel": _channel, "ip": _ip, "label": _label,
}
