"""Validation of a decoded transaction, and card-number masking for anything we write.

:func:`validate_transaction` takes a dict from Avro or JSON and returns a normalized
Transaction dict, or raises :class:`ValidationError` naming the field and the reason: the
worker turns that into a dead-letter record. JSON input is held to the same types as the
Avro schema (an ``event_time`` may also be an ISO-8601 string there).
"""

from __future__ import annotations

import ipaddress
import math
import re
import unicodedata
from datetime import UTC, datetime, timedelta
from typing import Any

from fraudstream.schemas.fx import Rates

CHANNELS = frozenset({"pos", "ecom", "atm", "moto", "contactless"})
#: Every string field that names something (a transaction, card, merchant, customer,
#: terminal, device, address): none may hold a card number. Every string field of a
#: transaction or label, identifiers or not, is refused when it holds a control character.
TRANSACTION_IDS = ("transaction_id", "card_id", "merchant_id", "customer_id", "terminal_id",
                   "device_id", "ip")
LABEL_IDS = ("transaction_id", "card_id", "merchant_id", "fraud_type")
MIN_EVENT_TIME_MS = 946_684_800_000  # 2000-01-01: anything older is a unit mistake
MAX_ID_LEN = 128
_NO_FUTURE_CHECK = 2**62
_CURRENCY = re.compile(r"[A-Z]{3}")
_COUNTRY = re.compile(r"[A-Z]{2}")
_MCC = re.compile(r"[0-9]{4}")
#: A dotted-quad IPv4 address as ``ipaddress`` takes it (octets 0-255 in ASCII digits, no
#: leading zero): what matches needs no ``ip_address`` call; the rest goes to it.
_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_IPV4 = re.compile(rf"{_OCTET}(?:\.{_OCTET}){{3}}")
_PAN_TEXT = re.compile(r"^[0-9][0-9 -]{11,22}[0-9]$")
#: Maximal runs of digits joined by single spaces or dashes (what masking looks at), and
#: by single spaces only (what a card number inside a longer identifier looks like: a
#: dash joins the groups of UUIDs and dates, so dashes only count for a whole value).
_RUN_BYTES = re.compile(rb"[0-9](?:[ -]?[0-9])*")
_RUN_SPACED = re.compile(r"[0-9](?: ?[0-9])*")
_THIRTEEN = re.compile(r"[0-9](?:[ -]?[0-9]){12}")
_THIRTEEN_BYTES = re.compile(rb"[0-9](?:[ -]?[0-9]){12}")
#: What every match of ``_THIRTEEN`` starts with: a digit and 12 more digits, spaces or
#: dashes. Half the cost of ``_THIRTEEN`` on identifiers without such a run (most).
_LONG_RUN = re.compile(r"[0-9][0-9 -]{12}")
#: Unicode categories refused in any string field: controls (NUL, ESC, newline, C1),
#: format characters (right-to-left overrides, zero-width, BOM), lone surrogates, and the
#: line and paragraph separators.
_REFUSED_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})


PAN_REASON = ("looks like or holds a raw card number (13-19 digits passing the Luhn "
              "check); send a token")


class ValidationError(Exception):
    """A transaction field is missing, of the wrong type or out of range."""

    kind = "validation"

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = f"{field}: {reason}"


def luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def looks_like_pan(value: str) -> bool:
    """True for 13-19 digits (spaces or dashes allowed) passing the Luhn check."""
    if not _PAN_TEXT.match(value):
        return False
    digits = value.replace(" ", "").replace("-", "")
    return 13 <= len(digits) <= 19 and luhn_ok(digits)


def _groups(run: str) -> list[tuple[int, int]]:
    """(start, end) of each group of digits of a run (groups split by one separator)."""
    out, start = [], 0
    for i, ch in enumerate(run):
        if not "0" <= ch <= "9":
            out.append((start, i))
            start = i + 1
    out.append((start, len(run)))
    return out


def _pan_spans(run: str, glued: bool) -> list[tuple[int, int]]:
    """Spans of ``run`` (digits and single separators) that are a card number: a range of
    whole groups of 13-19 digits passing the Luhn check. ``glued`` (binary Avro): a range
    at the start of the run may also drop its first one or two digits, and at the end its
    last one. A string's one-byte length prefix is a digit for 24-28 characters, after a
    field that may end in a digit; the next field's first byte may be a digit.
    A card number is written in at most 7 groups (4-4-4-4-3 is 5), so a range spans at most
    7: work is linear in the run, and runs of one-digit groups cost little."""
    groups = _groups(run)
    last = len(groups) - 1
    longest = 22 if glued else 19
    spans = []
    for i, (start, _) in enumerate(groups):
        count = 0
        for j in range(i, min(last, i + 6) + 1):
            count += groups[j][1] - groups[j][0]
            if count > longest:
                break
            if count < 13:
                continue
            end = groups[j][1]
            digits = run[start:end].replace(" ", "").replace("-", "")
            heads = (0, 1, 2) if glued and i == 0 else (0,)
            tails = (0, 1) if glued and j == last else (0,)
            found = [(h, t) for h in heads for t in tails
                     if 13 <= len(digits) - h - t <= 19
                     and luhn_ok(digits[h:len(digits) - t])]
            if found:
                head, tail = found[0]
                spans.append((start + head, end - tail))
    return spans


def contains_pan(value: str) -> bool:
    """True when ``value`` is a card number (13-19 digits passing the Luhn check, spaces or
    dashes allowed), or holds one: 13-19 digits, contiguous or grouped by single spaces,
    between non-digits. Digits of other scripts (fullwidth, Arabic-Indic) count as
    digits. A numeric identifier of 13-19 digits passes the Luhn check one time in ten:
    identifiers must be tokens, not long digit strings."""
    if value.isascii():
        if _THIRTEEN.search(value) is None:
            return False
    else:
        value = unicodedata.normalize("NFKC", value)
        value = "".join(str(unicodedata.decimal(c, c)) if c.isdecimal() else c
                        for c in value)
    if looks_like_pan(value.strip()):
        return True
    return any(_pan_spans(m.group(0), glued=False)
               for m in _RUN_SPACED.finditer(value) if len(m.group(0)) >= 13)


def control_character(value: str) -> str | None:
    """A description of the first control or format character in ``value``, or None."""
    if value.isascii() and value.isprintable():
        return None
    for i, ch in enumerate(value):
        category = unicodedata.category(ch)
        if category in _REFUSED_CATEGORIES:
            name = unicodedata.name(ch, "control character")
            return f"U+{ord(ch):04X} ({name}, category {category}) at position {i}"
    return None


def may_hold_pan(data: bytes) -> bool:
    """False when ``data`` has no run of 13 digits (single spaces or dashes between them
    allowed): then it holds no card number. Cheap on megabytes."""
    return _THIRTEEN_BYTES.search(data) is not None


def mask_pans(data: bytes | None, glued: bool = False) -> bytes | None:
    """Replace every digit of card-number-like runs with ``*`` except the last four.

    Length is kept, so Avro or JSON bytes keep their shape. Used on every byte string the
    service writes that came from outside (dead letters). A run of digits joined by single
    spaces or dashes is searched for whole groups that make a card number. ``glued``: the
    bytes may be binary Avro, where digits of a length byte or of the next field can be
    glued to the number (see :func:`_pan_spans`); it masks more, so text does without.
    """
    if not data:
        return data
    out: bytearray | None = None
    for m in _RUN_BYTES.finditer(data):
        run = m.group(0)
        if len(run) < 13:
            continue
        for start, end in _pan_spans(run.decode(), glued=glued):
            if out is None:
                out = bytearray(data)
            keep = 4
            for i in range(m.start() + end - 1, m.start() + start - 1, -1):
                if 48 <= data[i] <= 57:
                    if keep:
                        keep -= 1
                    else:
                        out[i] = 42  # "*"
    return data if out is None else bytes(out)


def _string(rec: dict[str, Any], name: str, required: bool = True) -> str | None:
    value = rec.get(name)
    if value is None:
        if required:
            raise ValidationError(name, "missing")
        return None
    if not isinstance(value, str):
        raise ValidationError(name, f"expected a string, got {type(value).__name__}")
    if required and not value.strip():
        raise ValidationError(name, "empty")
    if len(value) > MAX_ID_LEN:
        raise ValidationError(name, f"longer than {MAX_ID_LEN} characters")
    if not (value.isascii() and value.isprintable()):  # control_character's own shortcut
        bad = control_character(value)
        if bad is not None:
            raise ValidationError(name, f"contains a control character {bad}")
    return value


def _no_pans(out: dict[str, Any], names: tuple[str, ...]) -> None:
    for name in names:
        value = out.get(name)
        # an ASCII value without 13 digits in a row: contains_pan's own shortcut
        if value is not None and (not value.isascii() or _THIRTEEN.search(value)) \
                and contains_pan(value):
            raise ValidationError(name, PAN_REASON)


def _number(rec: dict[str, Any], name: str, required: bool = True) -> float | None:
    value = rec.get(name)
    if value is None:
        if required:
            raise ValidationError(name, "missing")
        return None
    if type(value) is not float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValidationError(name, f"expected a number, got {type(value).__name__}")
        value = float(value)
    if not math.isfinite(value):
        raise ValidationError(name, f"not a finite number ({value})")
    return value


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MS = timedelta(milliseconds=1)


def _millis(value: datetime) -> int:
    """Epoch milliseconds, exactly: ``int(value.timestamp() * 1000)`` goes through a float
    and lands 1 ms short for some times before 2004 and after 2038. A naive datetime is
    taken as UTC."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return (value - _EPOCH) // _MS


def time_ms(rec: dict[str, Any], name: str = "event_time") -> int:
    """A decoded record's time field in epoch ms (Avro datetime, ISO text with a zone, or
    millis); raises :class:`ValidationError` naming the field."""
    value = rec.get(name)
    if value is None:
        raise ValidationError(name, "missing")
    if isinstance(value, datetime):  # fastavro decodes timestamp-millis to datetime
        return _millis(value)
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError as exc:
            raise ValidationError(name, f"not an ISO-8601 time: {value!r}") from exc
        if parsed.tzinfo is None:
            raise ValidationError(name, "ISO-8601 time without a time zone")
        return _millis(parsed)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValidationError(name, f"expected epoch millis, got {type(value).__name__}")
    return value


def validate_transaction(
    rec: dict[str, Any], now_ms: int, max_future_ms: int, max_amount: float, *, rates: Rates
) -> dict[str, Any]:
    """Return the normalized transaction, or raise :class:`ValidationError`.

    The result carries ``amount_ref``, the amount in ``rates.reference`` (what features,
    rules and models use), next to the original ``amount`` and ``currency``. A currency the
    rates table lacks is refused (field ``currency``): deciding it would compare an amount
    of unknown value with thresholds in the reference currency. ``max_amount`` is in the
    reference currency too."""
    out = _usual(rec, now_ms, max_future_ms, max_amount, rates)
    return out if out is not None else _checked(rec, now_ms, max_future_ms, max_amount, rates)


def _usual(rec: dict[str, Any], now_ms: int, max_future_ms: int, max_amount: float,
           rates: Rates) -> dict[str, Any] | None:
    """The common transaction, checked in one pass: its strings ASCII and printable (one
    test over all of them), no run of 13 digits in an identifier (one search over all of
    them), codes, numbers and times of the exact types Avro gives. It returns what
    :func:`_checked` returns for such a record, and None at anything else: :func:`_checked`
    then checks field by field, in order, and names the field at fault."""
    get = rec.get
    required = (get("transaction_id"), get("card_id"), get("merchant_id"), get("currency"),
                get("country"), get("channel"))
    customer_id, terminal_id, device_id = get("customer_id"), get("terminal_id"), get("device_id")
    mcc, card_country, ip = get("mcc"), get("card_country"), get("ip")
    optional = [v for v in (customer_id, terminal_id, device_id, mcc, card_country, ip)
                if v is not None]
    try:
        text = "|".join((*required, *optional))  # a TypeError: a value is not a string
    except TypeError:
        return None
    # printable ASCII: the only blank is a space; no field is longer than all of them
    if not (text.isascii() and text.isprintable() and all(required)
            and (" " not in text or all(map(str.strip, required)))
            and (len(text) <= MAX_ID_LEN
                 or max(map(len, (*required, *optional))) <= MAX_ID_LEN)):
        return None
    txn_id, card_id, merchant_id, currency, country, channel = required
    # one search per identifier: over them joined it would cost 4x (the search gives up
    # at once on a string shorter than 13)
    ids = [v for v in (txn_id, card_id, merchant_id, customer_id, terminal_id, device_id, ip)
           if v is not None]
    if any(map(_LONG_RUN.search, ids)) and any(map(_THIRTEEN.search, ids)):
        return None
    # ASCII from here: isalpha and isupper are [A-Z], isdigit is [0-9]
    if not (len(currency) == 3 and currency.isalpha() and currency.isupper()
            and len(country) == 2 and country.isalpha() and country.isupper()
            and (card_country is None or len(card_country) == 2 and card_country.isalpha()
                 and card_country.isupper())
            and (mcc is None or len(mcc) == 4 and mcc.isdigit())
            and channel in CHANNELS
            and (ip is None or _IPV4.fullmatch(ip) is not None)):
        return None
    value = get("event_time")
    if type(value) is datetime and value.tzinfo is not None:
        event_time = (value - _EPOCH) // _MS
    elif type(value) is int:
        event_time = value
    else:
        return None
    if not MIN_EVENT_TIME_MS <= event_time <= now_ms + max_future_ms:
        return None
    amount, lat, lon = get("amount"), get("lat"), get("lon")
    if type(amount) is not float or not 0.0 <= amount < math.inf:
        return None
    amount += 0.0  # -0.0 is 0.0
    if lat is not None or lon is not None:
        if type(lat) is not float or type(lon) is not float \
                or not (-90.0 <= lat <= 90.0 and -180.0 <= lon <= 180.0):
            return None
    return _priced(txn_id, event_time, card_id, merchant_id, amount, currency, mcc, country,
                   card_country, lat, lon, ip, channel, customer_id, terminal_id, device_id,
                   rates, max_amount)


def _priced(txn_id: str, event_time: int, card_id: str, merchant_id: str, amount: float,
            currency: str, mcc: str | None, country: str, card_country: str | None,
            lat: float | None, lon: float | None, ip: str | None, channel: str,
            customer_id: str | None, terminal_id: str | None, device_id: str | None,
            rates: Rates, max_amount: float) -> dict[str, Any] | None:
    """The last step of a common path (:func:`_usual`, and the one-pass read of
    schemas/transaction_fast.py): the amount in the reference currency, and the normalized
    transaction; None when the currency has no rate or the amount is over the maximum
    (:func:`_checked` then names which)."""
    rate = rates.rate(currency)
    if rate is None:
        return None
    amount_ref = amount / rate
    if amount_ref > max_amount:
        return None
    return _transaction(txn_id, event_time, card_id, merchant_id, amount, currency, amount_ref,
                        mcc, country, card_country, lat, lon, ip, channel, customer_id,
                        terminal_id, device_id)


def _transaction(txn_id: str, event_time: int, card_id: str, merchant_id: str | None,
                 amount: float, currency: str, amount_ref: float, mcc: str | None,
                 country: str | None, card_country: str | None, lat: float | None,
                 lon: float | None, ip: str | None, channel: str | None,
                 customer_id: str | None, terminal_id: str | None,
                 device_id: str | None) -> dict[str, Any]:
    """The normalized transaction, its keys in the one order both checks give."""
    return {
        "transaction_id": txn_id,
        "event_time": event_time,
        "card_id": card_id,
        "merchant_id": merchant_id,
        "amount": amount,
        "currency": currency,
        "amount_ref": amount_ref,
        "mcc": mcc,
        "country": country,
        "card_country": card_country,
        "lat": lat,
        "lon": lon,
        "ip": ip,
        "channel": channel,
        "customer_id": customer_id,
        "terminal_id": terminal_id,
        "device_id": device_id,
    }


def _checked(rec: dict[str, Any], now_ms: int, max_future_ms: int, max_amount: float,
             rates: Rates) -> dict[str, Any]:
    """:func:`validate_transaction` field by field: the first field at fault, in the
    record's order, is the one named."""
    txn_id = _string(rec, "transaction_id")
    card_id = _string(rec, "card_id")
    assert card_id is not None
    merchant_id = _string(rec, "merchant_id")

    event_time = time_ms(rec)
    if event_time < MIN_EVENT_TIME_MS:
        raise ValidationError("event_time", f"{event_time} is before 2000 (seconds, not millis?)")
    if event_time > now_ms + max_future_ms:
        ahead = (event_time - now_ms) / 1000
        raise ValidationError("event_time", f"{ahead:.0f}s in the future")

    amount = _number(rec, "amount")
    assert amount is not None
    if amount < 0:  # zero: a card verification (and a card tester's favourite), decided
        raise ValidationError("amount", f"must not be negative, got {amount}")
    amount += 0.0  # -0.0 is 0.0
    currency = _string(rec, "currency")
    if not _CURRENCY.fullmatch(currency or ""):
        raise ValidationError("currency", f"expected an ISO 4217 code, got {currency!r}")
    assert currency is not None
    rate = rates.rate(currency)
    if rate is None:
        raise ValidationError("currency", f"no exchange rate for {currency!r} in rates table "
                                          f"{rates.version}")
    amount_ref = amount / rate
    if amount_ref > max_amount:
        raise ValidationError("amount", f"{amount} {currency} (about {amount_ref:.0f} "
                                        f"{rates.reference}) is over the maximum "
                                        f"{max_amount:.0f} {rates.reference}")
    country = _string(rec, "country")
    if not _COUNTRY.fullmatch(country or ""):
        raise ValidationError("country", f"expected an ISO 3166 alpha-2 code, got {country!r}")
    card_country = _string(rec, "card_country", required=False)
    if card_country is not None and not _COUNTRY.fullmatch(card_country):
        raise ValidationError("card_country", f"expected an ISO 3166 code, got {card_country!r}")
    mcc = _string(rec, "mcc", required=False)
    if mcc is not None and not _MCC.fullmatch(mcc):
        raise ValidationError("mcc", f"expected 4 digits, got {mcc!r}")
    channel = _string(rec, "channel")
    if channel not in CHANNELS:
        raise ValidationError("channel", f"expected one of {sorted(CHANNELS)}, got {channel!r}")

    lat = _number(rec, "lat", required=False)
    lon = _number(rec, "lon", required=False)
    if (lat is None) != (lon is None):
        raise ValidationError("lat" if lat is None else "lon", "lat and lon come together")
    if lat is not None and not -90.0 <= lat <= 90.0:
        raise ValidationError("lat", f"{lat} out of [-90, 90]")
    if lon is not None and not -180.0 <= lon <= 180.0:
        raise ValidationError("lon", f"{lon} out of [-180, 180]")

    ip = _string(rec, "ip", required=False)
    if ip is not None:
        if contains_pan(ip):
            raise ValidationError("ip", PAN_REASON)
        if _IPV4.fullmatch(ip) is None:
            try:
                ipaddress.ip_address(ip)
            except ValueError as exc:
                raise ValidationError("ip", f"not an IP address: {ip!r}") from exc

    out = _transaction(txn_id, event_time, card_id, merchant_id, amount, currency, amount_ref,
                       mcc, country, card_country, lat, lon, ip, channel,
                       _string(rec, "customer_id", required=False),
                       _string(rec, "terminal_id", required=False),
                       _string(rec, "device_id", required=False))
    _no_pans(out, TRANSACTION_IDS)
    return out


def validate_history_transaction(rec: dict[str, Any], rates: Rates,
                                 max_amount: float = math.inf) -> dict[str, Any]:
    """:func:`validate_transaction` for a record of history (a file, a generated stream):
    no bound on how far in the future its event time is, since "now" is the history's."""
    return validate_transaction(rec, now_ms=_NO_FUTURE_CHECK, max_future_ms=0,
                                max_amount=max_amount, rates=rates)


def validate_label(rec: dict[str, Any]) -> dict[str, Any]:
    """Return the normalized label, or raise :class:`ValidationError`."""
    txn_id = _string(rec, "transaction_id")
    card_id = _string(rec, "card_id")
    assert card_id is not None
    is_fraud = rec.get("is_fraud")
    if not isinstance(is_fraud, bool):
        raise ValidationError("is_fraud", f"expected a boolean, got {type(is_fraud).__name__}")
    event_time = time_ms(rec)
    label_time = time_ms(rec, "label_time")
    if label_time < MIN_EVENT_TIME_MS:
        raise ValidationError("label_time", f"{label_time} is before 2000 (seconds, not millis?)")
    out = {
        "transaction_id": txn_id,
        "card_id": card_id,
        "merchant_id": _string(rec, "merchant_id", required=False),
        "is_fraud": is_fraud,
        "fraud_type": _string(rec, "fraud_type", required=False),
        "event_time": event_time,
        "label_time": label_time,
    }
    _no_pans(out, LABEL_IDS)
    return out
