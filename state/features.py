"""Velocity features as pure functions of (entity state, event), in event time.

No Faust, Kafka, Redis or Prometheus here: the worker (:mod:`fraudstream.state.engine` driven by
:mod:`fraudstream.streams.worker.app`) and the offline builder (:mod:`fraudstream.state.offline`)
call the same code, so
training and serving see the same numbers.

Each entity keeps one compact record, read and written once per micro-batch:

- :class:`CardState`: the events of the last hour (exact 1 min / 10 min / 1 h windows),
  hourly buckets for 24 h, daily buckets for 7 d / 30 d (count, sum, max, sum of squares),
  the merchants, countries and devices seen in the last 30 days, the last location.
- :class:`EntityState` for merchants, devices and IPs: hourly and daily buckets, the
  recent event times (exact 1 h count), the cards seen in 24 h, and for merchants the fraud
  labels by the day they became available.

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

import math
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import orjson

from fraudstream.state.geo import haversine_km

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
def token(value: str) -> str:
    """A stable 32-bit token (hex) for a merchant, country, device or card in a seen-set:
    the state never holds the identifiers themselves."""
    return f"{zlib.crc32(value.encode()):08x}"


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


# ---------------------------------------------------------------------------- records
#
# A record is a JSON array (orjson: C speed both ways, and a corrupt record is a clean
# ValueError, never a crash). Buckets are [index, values...] lists sorted by index; seen
# sets map a token to the latest event time it was seen at. Pruning happens once, when the
# record is encoded, not per event.

_VERSION = 1


class CardState:
    """One card's record. ``last_offset``: the highest source offset applied (a record
    delivered again is not counted twice). ``max_ts``: its latest event time (0: none)."""

    __slots__ = ("last_offset", "max_ts", "loc", "recent", "hours", "days", "merchants",
                 "countries", "devices")

    def __init__(self) -> None:
        self.last_offset = -1
        self.max_ts = 0.0
        self.loc: list[float] | None = None  # [ts, lat, lon] of the latest located event
        self.recent: list[list[Any]] = []  # [ts, amount, lat, lon], by ts
        self.hours: list[list[float]] = []  # [h, n, sum, max]
        self.days: list[list[float]] = []  # [d, n, sum, max, sum of squares]
        self.merchants: dict[str, float] = {}
        self.countries: dict[str, float] = {}
        self.devices: dict[str, float] = {}

    def expire(self, config: FeatureConfig) -> None:
        """Forget what no window reads any more (as of ``max_ts``). Called after every
        event, so the features never depend on where a batch ended; the lists are sorted,
        so this usually looks at their first item only."""
        _trim_recent(self.recent, self.max_ts - HOUR_MS - config.allowed_lateness_ms,
                     rows=True)
        _prune(self.hours, int(self.max_ts // HOUR_MS) - 23 - _ceil(config, HOUR_MS))
        _prune(self.days, int(self.max_ts // DAY_MS) - 29 - _ceil(config, DAY_MS))

    def seen_horizon(self) -> float:
        """Seen-set entries at or before this time are forgotten (30 days)."""
        return self.max_ts - 30 * DAY_MS

    def encode(self, config: FeatureConfig) -> bytes:
        self.expire(config)
        month_ago = self.seen_horizon()
        return orjson.dumps([
            _VERSION, self.last_offset, self.max_ts, self.loc, self.recent, self.hours,
            self.days,
            _pruned(self.merchants, month_ago), _pruned(self.countries, month_ago),
            _pruned(self.devices, month_ago),
        ])

    @classmethod
    def decode(cls, data: bytes | None) -> CardState:
        s = cls()
        if data:
            r = _load(data, 10)
            (_v, s.last_offset, s.max_ts, s.loc, s.recent, s.hours, s.days, s.merchants,
             s.countries, s.devices) = r
        return s


class EntityState:
    """A merchant's, device's or IP's record, for the events of one source partition
    (:mod:`fraudstream.state.engine` adds up the partitions)."""

    __slots__ = ("last_offset", "last_label_offset", "max_ts", "recent", "hours", "days",
                 "fraud_days", "cards")

    def __init__(self) -> None:
        self.last_offset = -1
        self.last_label_offset = -1
        self.max_ts = 0.0
        self.recent: list[float] = []  # event times of the last hour, sorted
        self.hours: list[list[float]] = []  # [h, n, sum]
        self.days: list[list[float]] = []  # [d, n, sum]
        self.fraud_days: list[list[float]] = []  # [day available, n]
        self.cards: dict[str, float] = {}  # card token -> last seen

    def expire(self, config: FeatureConfig) -> None:
        """As :meth:`CardState.expire`, after every event and label."""
        _trim_recent(self.recent, self.max_ts - HOUR_MS - config.allowed_lateness_ms,
                     rows=False)
        day = int(self.max_ts // DAY_MS)
        _prune(self.hours, int(self.max_ts // HOUR_MS) - 23 - _ceil(config, HOUR_MS))
        _prune(self.days, day - 30 - _ceil(config, DAY_MS))
        if self.max_ts:
            _prune(self.fraud_days, day - 31 - _ceil(config, DAY_MS))

    def encode(self, config: FeatureConfig) -> bytes:
        self.expire(config)
        return orjson.dumps([
            _VERSION, self.last_offset, self.last_label_offset, self.max_ts, self.recent,
            self.hours, self.days, self.fraud_days,
            _pruned(self.cards, self.max_ts - DAY_MS - config.allowed_lateness_ms),
        ])

    @classmethod
    def decode(cls, data: bytes | None) -> EntityState:
        s = cls()
        if data:
            (_v, s.last_offset, s.last_label_offset, s.max_ts, s.recent, s.hours, s.days,
             s.fraud_days, s.cards) = _load(data, 9)
        return s


def _load(data: bytes, n: int) -> list[Any]:
    record = orjson.loads(data)
    if not isinstance(record, list) or len(record) != n or record[0] != _VERSION:
        raise ValueError(f"not a version {_VERSION} feature record of {n} fields")
    return record


def record_max_ts(record: bytes) -> float:
    """The latest event time a card or entity record holds (for idle expiry)."""
    r = orjson.loads(record)
    return float(r[2] if len(r) == 10 else r[3])


def _trim_recent(recent: list[Any], keep: float, rows: bool) -> None:
    """Drop the events at or before ``keep`` from a time-sorted list (of [ts, ...] rows or
    of times), and the oldest beyond :data:`MAX_RECENT`."""
    i = 0
    if rows:
        while i < len(recent) and recent[i][0] <= keep:
            i += 1
    else:
        while i < len(recent) and recent[i] <= keep:
            i += 1
    if len(recent) - i > MAX_RECENT:
        i = len(recent) - MAX_RECENT
    if i:
        del recent[:i]


def _ceil(config: FeatureConfig, unit: int) -> int:
    return -(-config.allowed_lateness_ms // unit)


def _prune(buckets: list[list[float]], first: int) -> None:
    i = 0
    while i < len(buckets) and buckets[i][0] < first:
        i += 1
    if i:
        del buckets[:i]


def _pruned(seen: dict[str, float], before: float) -> dict[str, float]:
    for ts in seen.values():
        if ts <= before:
            return {k: t for k, t in seen.items() if t > before}
    return seen


def _bucket(buckets: list[list[float]], idx: int, width: int) -> list[float]:
    """The bucket of ``idx`` (created empty if needed), keeping the list sorted."""
    i = len(buckets)
    while i and buckets[i - 1][0] > idx:
        i -= 1
    if i and buckets[i - 1][0] == idx:
        return buckets[i - 1]
    b = [idx, *([0.0] * width)]
    buckets.insert(i, b)
    return b


def _window(buckets: list[list[float]], first: int, last: int, col: int) -> float:
    """Sum of column ``col`` over the buckets with index in [first, last]."""
    total = 0.0
    for b in reversed(buckets):
        k = b[0]
        if k > last:
            continue
        if k < first:
            break
        total += b[col]
    return total


# ---------------------------------------------------------------------------- updates

def _touch(seen: dict[str, float], key: str, ts: float, horizon: float) -> bool:
    """Record ``key`` seen at ``ts``; True when it was not known after ``horizon``."""
    old = seen.get(key)
    if old is None or old <= horizon:
        if len(seen) >= MAX_SEEN:
            del seen[min(seen, key=seen.__getitem__)]
        seen[key] = ts
        return True
    if ts > old:
        seen[key] = ts
    return False


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


def update_card(state: CardState, event: Mapping[str, Any], v: list[float],
                config: FeatureConfig, add: bool = True) -> None:
    """Add ``event`` to the card's state and write the card features into ``v``.

    ``add=False``: the state already holds the event (delivered again): only the features,
    its windows counting it once (first-use flags and the gap then see it as known)."""
    t = event["event_time"]
    amount = float(event["amount_ref"])
    lat_v, lon_v = event.get("lat"), event.get("lon")
    if lat_v is not None and lon_v is not None:
        has_loc, lat, lon = True, float(lat_v), float(lon_v)
    else:
        has_loc, lat, lon = False, 0.0, 0.0
    device = event.get("device_id")
    max_ts = state.max_ts
    d = t // DAY_MS
    recent = state.recent

    # What the card looked like before this event.
    prev = 0.0
    ploc = None
    for r in reversed(recent):
        if r[0] <= t:
            if not prev:
                prev = r[0]
            if r[2] is not None:
                ploc = [r[0], r[2], r[3]]
                break
    if not prev and max_ts and max_ts <= t:
        prev = max_ts
    if prev:
        v[I_SECS_PREV] = (t - prev) / 1000.0
        v[I_HAS_PREV] = 1.0
    days = state.days
    n30 = s30 = q30 = 0.0
    for b in reversed(days):
        k = b[0]
        if k > d:
            continue
        if k < d - 29:
            break
        n30 += b[1]
        s30 += b[2]
        q30 += b[4]
    if n30:
        mean = s30 / n30
        var = q30 / n30 - mean * mean
        v[I_OVER_MEAN] = amount / mean if mean > 0 else 0.0
        v[I_ZSCORE] = (amount - mean) / math.sqrt(var) if var > 1e-9 else 0.0
        v[I_HAS_HISTORY] = 1.0
    if ploc is None and state.loc is not None and state.loc[0] <= t:
        ploc = state.loc
    if has_loc and ploc is not None:
        hours = max((t - ploc[0]) / HOUR_MS, 1.0 / 60.0)  # at least a minute apart
        v[I_GEO_KMH] = haversine_km(ploc[1], ploc[2], lat, lon) / hours
        v[I_GEO_KNOWN] = 1.0

    if add:
        _add_card_event(state, event, v, t, amount, has_loc, lat, lon, device, config)

    # Windows, including this event.
    _card_windows(state, v, t)
    if t < max_ts:
        v[I_LATE] = 1.0
        if t < max_ts - config.allowed_lateness_ms:
            v[I_TOO_LATE] = 1.0


def _add_card_event(state: CardState, event: Mapping[str, Any], v: list[float], t: int,
                    amount: float, has_loc: bool, lat: float, lon: float,
                    device: str | None, config: FeatureConfig) -> None:
    horizon = state.seen_horizon()
    v[I_FIRST_MERCHANT] = 1.0 if _touch(state.merchants, token(event["merchant_id"]), t,
                                        horizon) else 0.0
    v[I_FIRST_COUNTRY] = 1.0 if _touch(state.countries, token(event["country"]), t,
                                       horizon) else 0.0
    if device:
        v[I_FIRST_DEVICE] = 1.0 if _touch(state.devices, token(device), t, horizon) else 0.0
    recent = state.recent
    row = [t, amount, lat, lon] if has_loc else [t, amount, None, None]
    if not recent or recent[-1][0] <= t:
        recent.append(row)
    else:  # out of order: keep the list sorted by time
        i = len(recent)
        while i and recent[i - 1][0] > t:
            i -= 1
        recent.insert(i, row)
    hb = _bucket(state.hours, t // HOUR_MS, 3)
    hb[1] += 1.0
    hb[2] += amount
    if amount > hb[3]:
        hb[3] = amount
    db = _bucket(state.days, t // DAY_MS, 4)
    db[1] += 1.0
    db[2] += amount
    db[4] += amount * amount
    if amount > db[3]:
        db[3] = amount
    if has_loc and (state.loc is None or t >= state.loc[0]):
        state.loc = [t, lat, lon]
    if t > state.max_ts:
        state.max_ts = t
    state.expire(config)


def _card_windows(state: CardState, v: list[float], t: int) -> None:
    h, d = t // HOUR_MS, t // DAY_MS
    recent, days = state.recent, state.days
    lo1, lo10, lo60 = t - MINUTE_MS, t - 10 * MINUTE_MS, t - HOUR_MS
    n1 = s1 = m1 = n10 = s10 = m10 = n60 = s60 = m60 = 0.0
    for r in reversed(recent):
        ts = r[0]
        if ts > t:
            continue
        if ts <= lo60:
            break
        a = r[1]
        n60 += 1.0
        s60 += a
        if a > m60:
            m60 = a
        if ts > lo10:
            n10 += 1.0
            s10 += a
            if a > m10:
                m10 = a
            if ts > lo1:
                n1 += 1.0
                s1 += a
                if a > m1:
                    m1 = a
    _put_window(v, 0, n1, s1, m1)
    _put_window(v, 4, n10, s10, m10)
    _put_window(v, 8, n60, s60, m60)
    _put_window(v, 12, *_sum_buckets(state.hours, h - 23, h))
    # 7 d and 30 d in one pass over the daily buckets.
    n7 = s7 = m7 = n30 = s30 = m30 = 0.0
    first7, first30 = d - 6, d - 29
    for b in reversed(days):
        k = b[0]
        if k > d:
            continue
        if k < first30:
            break
        n30 += b[1]
        s30 += b[2]
        if b[3] > m30:
            m30 = b[3]
        if k >= first7:
            n7 += b[1]
            s7 += b[2]
            if b[3] > m7:
                m7 = b[3]
    _put_window(v, 16, n7, s7, m7)
    _put_window(v, 20, n30, s30, m30)
    day_ago = max(t - DAY_MS, state.seen_horizon())
    v[I_DISTINCT_MERCHANTS] = float(sum(1 for ts in state.merchants.values() if ts > day_ago))
    v[I_DISTINCT_COUNTRIES] = float(sum(1 for ts in state.countries.values() if ts > day_ago))
    v[I_DISTINCT_DEVICES] = float(sum(1 for ts in state.devices.values() if ts > day_ago))


def _sum_buckets(buckets: list[list[float]], first: int, last: int
                 ) -> tuple[float, float, float]:
    n = s = mx = 0.0
    for b in reversed(buckets):
        k = b[0]
        if k > last:
            continue
        if k < first:
            break
        n += b[1]
        s += b[2]
        if b[3] > mx:
            mx = b[3]
    return n, s, mx


def _put_window(v: list[float], i: int, n: float, s: float, mx: float) -> None:
    v[i] = n
    v[i + 1] = s
    v[i + 2] = s / n if n else 0.0
    v[i + 3] = mx


def add_merchant_event(state: EntityState, event: Mapping[str, Any],
                       config: FeatureConfig) -> None:
    """Count ``event`` in a merchant's partial state (hourly and daily buckets)."""
    t = event["event_time"]
    amount = float(event["amount_ref"])
    hb = _bucket(state.hours, t // HOUR_MS, 2)
    hb[1] += 1.0
    hb[2] += amount
    db = _bucket(state.days, t // DAY_MS, 2)
    db[1] += 1.0
    db[2] += amount
    if t > state.max_ts:
        state.max_ts = t
    state.expire(config)


def add_shared_event(state: EntityState, event: Mapping[str, Any], card_token: str,
                     config: FeatureConfig) -> None:
    """Count ``event`` in a device's or IP's partial state (recent times, cards seen)."""
    t = event["event_time"]
    if t > state.max_ts:
        state.max_ts = t
    recent = state.recent
    if not recent or recent[-1] <= t:
        recent.append(t)
    else:
        i = len(recent)
        while i and recent[i - 1] > t:
            i -= 1
        recent.insert(i, t)
    _touch(state.cards, card_token, t, -1.0)
    state.expire(config)


def add_label(state: EntityState, label: Mapping[str, Any], config: FeatureConfig) -> bool:
    """Count a fraud label in the merchant's state, on the day it becomes available.
    Returns whether it counted (genuine labels do not)."""
    if not label["is_fraud"]:
        return False
    b = _bucket(state.fraud_days, (label["label_time"] + config.label_delay_ms) // DAY_MS, 1)
    b[1] += 1.0
    state.expire(config)
    return True


def merchant_features(parts: list[EntityState], event: Mapping[str, Any],
                      v: list[float]) -> None:
    """Merchant features from its partial states (one per source partition)."""
    put_merchant_features(merchant_sums(parts, event["event_time"]), v)


def merchant_sums(parts: list[EntityState], t: int) -> list[float]:
    """[n 1d, sum 1d, n 7d, sum 7d, n 30d, sum 30d, past n 1d/7d/30d, fraud 1d/7d/30d] as of
    ``t``. Within one hour only the first six change, by each new event of the merchant."""
    h, d = t // HOUR_MS, t // DAY_MS
    # count, sum: 1 d (hours h-23..h), 7 d, 30 d (days up to d); past counts and fraud
    # labels over the complete days before d: 1, 7, 30 of them.
    n1 = s1 = n7 = s7 = n30 = s30 = p1 = p7 = p30 = f1 = f7 = f30 = 0.0
    for p in parts:
        for b in reversed(p.hours):
            k = b[0]
            if k > h:
                continue
            if k < h - 23:
                break
            n1 += b[1]
            s1 += b[2]
        for b in reversed(p.days):
            k = b[0]
            if k > d:
                continue
            if k < d - 30:
                break
            if k == d:
                n7 += b[1]
                s7 += b[2]
                n30 += b[1]
                s30 += b[2]
                continue
            c = b[1]
            p30 += c
            if k >= d - 7:
                p7 += c
                if k == d - 1:
                    p1 += c
            if k >= d - 29:
                n30 += c
                s30 += b[2]
                if k >= d - 6:
                    n7 += c
                    s7 += b[2]
        for b in reversed(p.fraud_days):
            k = b[0]
            if k >= d:
                continue
            if k < d - 30:
                break
            f30 += b[1]
            if k >= d - 7:
                f7 += b[1]
                if k == d - 1:
                    f1 += b[1]
    return [n1, s1, n7, s7, n30, s30, p1, p7, p30, f1, f7, f30]


def put_merchant_features(agg: list[float], v: list[float]) -> None:
    for k, (_w, i_count, i_mean, i_fraud, i_rate) in enumerate(_MERCHANT_IDX):
        n, f, past = agg[2 * k], agg[9 + k], agg[6 + k]
        v[i_count] = n
        v[i_mean] = agg[2 * k + 1] / n if n else 0.0
        v[i_fraud] = f
        v[i_rate] = f / past if past else 0.0


def shared_entity_features(parts: list[EntityState], t: float, prefix: str,
                           v: list[float], config: FeatureConfig) -> None:
    """``<prefix>_cards_24h`` and ``<prefix>_count_1h`` for a device or an IP."""
    hour_ago = t - HOUR_MS
    cards = count = 0
    for p in parts:
        day_ago = max(t - DAY_MS, p.max_ts - DAY_MS - config.allowed_lateness_ms)
        cards += sum(1 for ts in p.cards.values() if ts > day_ago)
        for ts in reversed(p.recent):
            if ts <= hour_ago:
                break
            if ts <= t:
                count += 1
    v[INDEX[f"{prefix}_cards_24h"]] = float(cards)
    v[INDEX[f"{prefix}_count_1h"]] = float(count)


I_SECS_PREV = INDEX["card_secs_since_prev"]
I_HAS_PREV = INDEX["card_has_prev"]
I_OVER_MEAN = INDEX["card_amount_over_mean_30d"]
I_ZSCORE = INDEX["card_amount_zscore_30d"]
I_HAS_HISTORY = INDEX["card_has_history_30d"]
I_GEO_KMH = INDEX["card_geo_kmh"]
I_GEO_KNOWN = INDEX["card_geo_known"]
I_FIRST_MERCHANT = INDEX["card_first_merchant"]
I_FIRST_COUNTRY = INDEX["card_first_country"]
I_FIRST_DEVICE = INDEX["card_first_device"]
I_DISTINCT_MERCHANTS = INDEX["card_distinct_merchants_24h"]
I_DISTINCT_COUNTRIES = INDEX["card_distinct_countries_24h"]
I_DISTINCT_DEVICES = INDEX["card_distinct_devices_24h"]
I_LATE = INDEX["event_late"]
I_TOO_LATE = INDEX["event_too_late"]
_MERCHANT_IDX = tuple(
    (w, INDEX[f"merchant_count_{w}d"], INDEX[f"merchant_mean_amount_{w}d"],
     INDEX[f"merchant_fraud_count_{w}d"], INDEX[f"merchant_fraud_rate_{w}d"])
    for w in MERCHANT_DAYS
)
