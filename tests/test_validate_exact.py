"""What validation returns, and what it refuses with which reason, is pinned: generated
transactions (as Avro, JSON and ISO-time records) and ~20,000 variants with odd or bad
values in every field (card numbers plain, grouped, glued or in other scripts; control and
format characters; IP addresses valid and not; codes with a trailing newline; numbers of
every kind) are validated, and the digest of every outcome - the normalized transaction,
float bits included, or the refused field and its reason (the dead letter's) - is compared
with the digest the validation gave before it took shortcuts for the common case
(computed then, with the same code as :func:`outcomes`, and stored here).

Any change of a result or of a reason changes the digest. A deliberate change of the
rules is a new digest here, with the reason in the commit."""

from __future__ import annotations

import hashlib
import random
import struct
from collections import Counter
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import numpy as np

from fraudstream.schemas.fx import Rates
from fraudstream.schemas.validate import ValidationError, validate_label, validate_transaction
from fraudstream.streams.traffic.generator import GeneratorConfig, generate_history
from tests.conftest import DAY_MS, T0_MS

#: Digest of the outcomes before the shortcuts (see the module docstring); changed once
#: since, on purpose: zero amounts accepted, negative ones refused as "must not be negative".
EXPECTED = "72957dc47cd25b36787c1b0d32a79eda7cacdedc19e25dfe0a774abce6aebf40"
#: A table of its own: a change of the shipped rates must not move the digest.
RATES = Rates.from_mapping({"version": "exact-1", "reference": "EUR",
                            "rates": {"EUR": 1.0, "USD": 1.08, "JPY": 160.0, "GBP": 0.85}})
NOW_MS = T0_MS + 2 * DAY_MS
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

TEXTS = [
    "", " ", "\t", "a" * 128, "a" * 129, "é" * 128, "x\x00y", "x\x1by", "x\ny", "x\u200by",
    "x\u202ey", "\ufeffx", "x\ud800", "x\u2028", "x\u2029", "x\x85", "é", "ß", "日本語",
    "🙂", "card_000197", "pb-1", "4111111111111111", "4111 1111 1111 1111",
    "4111-1111-1111-1111", "card-4111111111111111", "card 4111 1111 1111 1111 x",
    "４１１１１１１１１１１１１１１１", "٤١١١١١١١١١١١١١١١", "4111111111111112",
    "1234567890123", "4222222222222", "42222222222222222222",
    "123e4567-e89b-12d3-a456-426614174000",
    "2026-12-02 12:00:00", "+33 6 12 34 56 78 90 12", "order 4111  1111 1111 1111",
    "x4111111111111111y", "4111111111111111\n", None, 5, 1.5, True, b"bytes",
]
CURRENCIES = ["EUR", "USD", "JPY", "GBP", "XXX", "eur", "EURO", "EU", "EUR\n", "ＥＵＲ",
              "E1R", "", None, 1]
COUNTRIES = ["FR", "BE", "fr", "FRA", "F", "F\n", "ＦＲ", "F1", "", None, 2]
MCCS = ["5411", "0000", "541", "54110", "54a1", "٥٤١١", "5411\n", "", None, 5411]
CHANNELS = ["pos", "ecom", "atm", "moto", "contactless", "POS", "web", "", None, 1]
IPS = [
    "81.182.63.80", "0.0.0.0", "255.255.255.255", "10.0.0.1", "256.1.1.1", "01.2.3.4",
    "1.2.3.04", "1.2.3", "1.2.3.4.5", "1..3.4", "::1", "2001:db8::1", "fe80::1%eth0",
    "::ffff:1.2.3.4", "1.2.3.4 ", " 1.2.3.4", "1.2.3.4\n", "١.٢.٣.٤", "4111111111111111",
    "4111.1111.1111.1111", "1.2.3.4/24", "192.168.001.1", "1e1.1.1.1", "+1.2.3.4",
    "1_0.1.1.1", "0x7f.0.0.1", "1.2.3.4\x00", "999.999.999.999", "", None, 3,
]
NUMBERS = [0, 0.0, -0.0, -1.0, 0.01, 25, 999_999.99, 1_000_000.0, 1_000_000.01, 1e300,
           5e-324, float("nan"), float("inf"), float("-inf"), True, "12", None, 2**70,
           np.float64(12.5), np.float32(0.1), np.int64(7), np.float64("nan")]
COORDS = [None, 0.0, 90.0, 90.0001, -90.0, -90.0001, 180.0, -180.0, 180.0001, 48.8,
          float("nan"), "1", True, 12, np.float64(45.5)]
TIMES: list[Any] = [
    NOW_MS, NOW_MS + 300_000, NOW_MS + 300_001, 946_684_800_000, 946_684_799_999, 0, -1,
    1_079_919_129_416, 2_193_528_273_693, True, 1.5e12, None, "2026-01-05T00:00:00Z",
    "2026-01-05T00:00:00", "2026-01-05T00:00:00+01:00", "garbage", "",
    EPOCH + timedelta(milliseconds=T0_MS), datetime(2026, 1, 5, 12, 0),
    datetime(2026, 1, 5, 12, 0, tzinfo=timezone(timedelta(hours=-5))),
    EPOCH + timedelta(milliseconds=1_079_919_129_416),
    EPOCH + timedelta(microseconds=T0_MS * 1000 + 999),
]
POOLS: dict[str, list[Any]] = {
    "transaction_id": TEXTS, "card_id": TEXTS, "merchant_id": TEXTS, "customer_id": TEXTS,
    "terminal_id": TEXTS, "device_id": TEXTS, "ip": IPS + TEXTS, "currency": CURRENCIES,
    "country": COUNTRIES, "card_country": COUNTRIES, "mcc": MCCS, "channel": CHANNELS,
    "amount": NUMBERS, "lat": COORDS, "lon": COORDS, "event_time": TIMES,
}


def records() -> list[dict[str, Any]]:
    txns, _ = generate_history(GeneratorConfig(seed=5, n_cards=400, id_prefix="ve"),
                               T0_MS, 1.0, 3000)
    out: list[dict[str, Any]] = []
    for t in txns:
        out.append(t)  # as JSON gives it
        out.append({**t, "event_time": EPOCH + timedelta(milliseconds=t["event_time"])})
    rng = random.Random(9)
    fields = sorted(POOLS)
    for field in fields:  # every value of every pool, once each
        for value in POOLS[field]:
            out.append({**rng.choice(txns), field: value})
    for _ in range(20_000):  # one to three fields changed, or one left out
        rec = dict(rng.choice(txns))
        for field in rng.sample(fields, rng.choice((1, 1, 2, 3))):
            rec[field] = rng.choice(POOLS[field])
        if rng.random() < 0.05:
            del rec[rng.choice(fields)]
        out.append(rec)
    return out


def _canon(value: Any) -> Any:
    if isinstance(value, float):
        return ("f", struct.pack("<d", value).hex())
    if isinstance(value, dict):
        return [(k, type(v).__name__, _canon(v)) for k, v in value.items()]
    return value


def outcomes() -> tuple[str, Counter[str]]:
    """The digest of every outcome, and how many were refused by field."""
    digest = hashlib.sha256()
    refused: Counter[str] = Counter()
    for rec in records():
        try:
            out: Any = ("ok", _canon(validate_transaction(
                rec, now_ms=NOW_MS, max_future_ms=300_000, max_amount=1_000_000.0,
                rates=RATES)))
        except ValidationError as exc:
            out = ("refused", exc.field, exc.reason)
            refused[exc.field] += 1
        digest.update(repr(out).encode())
    for rec in records()[:400:7]:  # labels share the string checks
        label = {"transaction_id": rec.get("transaction_id"), "card_id": rec.get("card_id"),
                 "merchant_id": rec.get("merchant_id"), "is_fraud": True,
                 "fraud_type": rec.get("device_id"), "event_time": rec.get("event_time"),
                 "label_time": NOW_MS}
        try:
            out = ("ok", _canon(validate_label(label)))
        except ValidationError as exc:
            out = ("refused", exc.field, exc.reason)
        digest.update(repr(out).encode())
    return digest.hexdigest(), refused


def test_validation_results_and_reasons_are_unchanged():
    digest, refused = outcomes()
    # every field is refused somewhere: the variants reach each check
    assert set(refused) >= set(POOLS), set(POOLS) - set(refused)
    assert digest == EXPECTED
