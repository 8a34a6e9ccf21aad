"""Velocity features in event time: what they are, their names and their semantics.

No Faust, Kafka, Redis or Prometheus here: the worker (:mod:`fraudstream.state.engine` driven by
:mod:`fraudstream.streams.worker.app`) and the offline builder (:mod:`fraudstream.state.offline`)
call the same compiled kernel (:mod:`fraudstream.state.kernel`), so training and serving see
the same numbers.

Each entity keeps one compact record (:mod:`fraudstream.state.records`), read and written
once per micro-batch:

- a card: the events of the last hour (exact 1 min / 10 min / 1 h windows), hourly buckets
  for 24 h, daily buckets for 7 d / 30 d (count, sum, max, sum of squares), the merchants,
  countries and devices seen in the last 30 days, the last location;
- a merchant, device or IP (one partial record per source partition): hourly and daily
  buckets, the recent event times (exact 1 h count), the cards seen in 24 h, and for
  merchants the fraud labels by the day they became available.

Windows (``t`` is the event's own time, UTC):

- 1 min, 10 min, 1 h: events with ``t - w < ts <= t``, exact.
- 24 h: the hourly buckets of hours ``hour(t) - 23 .. hour(t)``; 7 d and 30 d: the daily
  buckets of days ``day(t) - 6 .. day(t)`` and ``- 29 .. ``. A bucket holds every event of
  its hour or day seen so far, so these windows are hour- or day-aligned.
- Windowed values include the current event; the amount ratio and z-score compare the
  amount with the card's *earlier* 30 days.
- Amounts are the event's ``amount_ref``: converted into the reference currency by the
  validator (:mod:`fraudstream.schemas.fx`), so a card spending in JPY and EUR gets sums in one
  unit.

Lateness: an event older than the entity's latest event time minus the allowed lateness
is still counted (in every bucket still kept) and gets features, flagged
``event_too_late``; one within the lateness lands in its own buckets, flagged
``event_late`` when it arrived out of order.

Merchant fraud counts use only labels already available: a label becomes available at
``label_time + label_delay``, and counts for events of later days only (the complete days
``day(t) - W .. day(t) - 1``), so no label from the future can leak into a feature.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

MINUTE_MS = 60_000
HOUR_MS = 3_600_000
DAY_MS = 86_400_000

CARD_WINDOWS = (("1m", MINUTE_MS), ("10m", 10 * MINUTE_MS), ("1h", HOUR_MS),
                ("24h", DAY_MS), ("7d", 7 * DAY_MS), ("30d", 30 * DAY_MS))
MERCHANT_DAYS = (1, 7, 30)

#: At most this many recent events per entity (a card-testing burst beyond it is capped:
#: its 1 h count stops growing at this value).
MAX_RECENT = 512
#: At most this many merchants / countries / devices (cards, for a device or IP) remembered
#: per entity; the least recently seen is forgotten first.
MAX_SEEN = 256



def _names() -> tuple[str, ...]:
    names: list[str] = []
    for w, _ in CARD_WINDOWS:
        names += [f"card_count_{w}", f"card_sum_{w}", f"card_mean_{w}", f"card_max_{w}"]
    names += [
        "card_secs_since_prev", "card_has_prev",
        "card_amount_over_mean_30d", "card_amount_zscore_30d", "card_has_history_30d",
        "card_distinct_merchants_24h", "card_distinct_countries_24h",
        "card_distinct_devices_24h",
        "card_first_merchant", "card_first_country", "card_first_device",
        "card_geo_kmh", "card_geo_known",
        "hour_of_day", "is_night", "is_weekend",
        "has_location", "has_device", "has_ip",
        "event_late", "event_too_late",
    ]
    for d in MERCHANT_DAYS:
        names += [f"merchant_count_{d}d", f"merchant_mean_amount_{d}d"]
    for d in MERCHANT_DAYS:
        names += [f"merchant_fraud_count_{d}d", f"merchant_fraud_rate_{d}d"]
    names += ["device_cards_24h", "device_count_1h", "ip_cards_24h", "ip_count_1h",
              "features_degraded"]
    return tuple(names)


#: The feature vector's names, in order. A model artifact records these; changing them is
#: a new :data:`FEATURE_VERSION`.
FEATURE_NAMES: tuple[str, ...] = _names()
#: v2: every amount is ``amount_ref``, in the rates table's reference currency (v1 summed
#: raw amounts across currencies).
FEATURE_VERSION = "v2"
INDEX = {name: i for i, name in enumerate(FEATURE_NAMES)}


@lru_cache(maxsize=1 << 16)
def token_id(value: str) -> int:
    """A stable 32-bit token for a merchant, country, device or card in a seen-set: the
    state never holds the identifiers themselves."""
    return zlib.crc32(value.encode())


@dataclass(frozen=True)
class FeatureConfig:
    allowed_lateness_ms: int = HOUR_MS
    label_delay_ms: int = 0


class Vector(Mapping[str, float]):
    """One event's features: a list of floats in :data:`FEATURE_NAMES` order, readable by
    name (the rules scorer reads ``features["card_count_1m"]``)."""

    __slots__ = ("row",)

    def __init__(self, row: list[float]) -> None:
        self.row = row

    def __getitem__(self, name: str) -> float:
        return self.row[INDEX[name]]

    def get(self, name: str, default: Any = None) -> Any:  # type: ignore[override]
        """``Mapping.get`` in one call (it is the rules' feature read, per rule and event)."""
        i = INDEX.get(name)
        return default if i is None else self.row[i]

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(FEATURE_NAMES)

    def __len__(self) -> int:
        return len(FEATURE_NAMES)

    def __repr__(self) -> str:
        return f"Vector({dict(zip(FEATURE_NAMES, self.row, strict=True))!r})"


def degraded_vector(event: Mapping[str, Any]) -> Vector:
    """Features when the state could not be read: event-only fields, zeros elsewhere,
    ``features_degraded = 1``."""
    v = [0.0] * len(FEATURE_NAMES)
    event_fields(v, event)
    v[INDEX["features_degraded"]] = 1.0
    return Vector(v)


def event_fields(v: list[float], event: Mapping[str, Any]) -> None:
    """Features of the event alone: time of day (UTC), weekend, which optional fields it has."""
    t = event["event_time"]
    hour = (t // HOUR_MS) % 24
    v[INDEX["hour_of_day"]] = float(hour)
    v[INDEX["is_night"]] = 1.0 if hour < 6 else 0.0
    v[INDEX["is_weekend"]] = 1.0 if (t // DAY_MS + 3) % 7 >= 5 else 0.0  # 1970-01-01: Thu
    v[INDEX["has_location"]] = 1.0 if event.get("lat") is not None and \
        event.get("lon") is not None else 0.0
    v[INDEX["has_device"]] = 1.0 if event.get("device_id") else 0.0
    v[INDEX["has_ip"]] = 1.0 if event.get("ip") else 0.0
