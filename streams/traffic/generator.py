"""Synthetic card traffic for demos, tests and load: genuine spending plus fraud campaigns.

Pure Python (stdlib ``random``); nothing here touches Kafka. The producer owns the clock.
The cards, merchants and devices the traffic plays over, and :class:`GeneratorConfig`, are
in :mod:`fraudstream.streams.traffic.world`.

Contract
--------
* :meth:`TrafficGenerator.next_transaction` returns one Transaction dict
  (``schemas/transaction.avsc``, every field present) with ``event_time == now_ms``. Call it
  with non-decreasing ``now_ms``: the same seed and the same sequence of ``now_ms`` values
  give the same transactions and labels (no wall clock, no global RNG).
* Fraud comes in campaigns (:data:`FRAUD_TYPES`) that start at random calls. A controller
  keeps each type's scheduled fraudulent transactions at ``fraud_rate`` x its share of
  ``campaign_mix`` of all calls so far. A campaign schedules its transactions at event
  times; the first call whose ``now_ms`` has reached one emits it instead of a genuine
  transaction (one transaction per call, always).
* Labels: every fraudulent transaction gets one (source ``chargeback`` or
  ``confirmed_fraud``); a ``genuine_label_rate`` sample of genuine ones gets a
  ``confirmed_genuine`` one. ``label_time = event_time + delay``, delay ~ Gamma with mean
  ``label_delay_days`` and sd ``label_delay_spread_days``, divided by ``time_compression``.
  :meth:`TrafficGenerator.due_labels` hands out those with ``label_time <= now_ms``.
* Time scales: minute-scale signatures (card-testing and velocity bursts, the gap of an
  impossible journey, takeover sessions) are real event time, divided by
  ``campaign_time_scale`` (default 1); day-scale durations (label delay, how long a terminal
  stays compromised, skim-to-cash-out delay) are divided by ``time_compression``. The fraud
  share reaches ``fraud_rate`` once the longest campaigns have played out (about an hour of
  event time at scale 1, a few minutes at 20).
* Identifiers never leak the label: fraudsters' devices, IPs and all ids come from the same
  pools and formats as genuine ones. ``card_id`` is a token (``card_000123``).
* Genuine traffic is per-card ``call rate / n_cards``: pick ``n_cards`` for the rate you run
  (velocity signatures stand out when a card's genuine gap is well over a few minutes).
  Genuine card-present use stays mostly within the home city (< ~20 km); trips abroad and
  a few visits to other cities go further.
* Memory: pending labels (~200 B each); genuine samples stop at ``max_pending_labels``.
"""

from __future__ import annotations

import heapq
import math
import random
from typing import Any

from fraudstream.schemas.fx import Rates
from fraudstream.schemas.validate import validate_history_transaction
from fraudstream.state.geo import haversine_km
from fraudstream.streams.traffic.world import (
    FRAUD_TYPES,
    Card,
    City,
    GeneratorConfig,
    Merchant,
    build_world,
    city_centre,
    random_ip,
)

DAY_MS = 86_400_000
MINUTE_MS = 60_000
_CT, _ATO, _CM, _VB, _IT = range(5)  # indices into FRAUD_TYPES
_SOURCES = ("chargeback", "confirmed_fraud", "confirmed_genuine")
CARD_PRESENT = frozenset({"pos", "contactless", "atm"})

_ATM_EUR = (20, 40, 50, 60, 80, 100, 150, 200)
_HAZARD = 0.1  # chance per check of starting a campaign of a type below its fraud budget
_CM_FRAUD_SHARE = 0.35  # share of a compromised terminal's steered traffic that is fraud
_SKIM_P = 0.5  # chance a genuine card used at a compromised terminal is later cashed out


class _Campaign:
    __slots__ = ("ftype", "card", "merchants", "terminal", "device", "ip", "city", "remaining")

    def __init__(self, ftype: int, card: Card | None, merchants: list[Merchant]) -> None:
        self.ftype, self.card, self.merchants, self.remaining = ftype, card, merchants, 0
        self.terminal: str | None = None
        self.device: str | None = None
        self.ip: str | None = None
        self.city: City | None = None


class TrafficGenerator:
    """Deterministic source of Transaction and Label dicts; see the module docstring."""

    def __init__(self, config: GeneratorConfig | None = None) -> None:
        cfg = self.config = config or GeneratorConfig()
        traffic = cfg.seed if cfg.traffic_seed is None else cfg.traffic_seed
        self._rng = random.Random(f"fraudstream-traffic-{traffic}")
        self._r = self._rng.random
        self._prefix = cfg.id_prefix or f"t{cfg.seed}"
        w = build_world(cfg, random.Random(f"fraudstream-world-{cfg.seed}"))
        self._cities, self._merchants, self._cards = w.cities, w.merchants, w.cards
        self._cp_city, self._atm_city, self._ecom_country = w.cp_city, w.atm_city, w.ecom_country
        self._ct_merchants, self._cards_by_country = w.ct_merchants, w.cards_by_country
        self._by_hour, self._next_device = w.by_hour, w.n_devices
        self._day_ms = DAY_MS / cfg.time_compression
        self._k = 1.0 / cfg.campaign_time_scale
        mix = dict(cfg.campaign_mix)
        self._budget = [cfg.fraud_rate * mix.get(t, 0.0) / sum(mix.values()) for t in FRAUD_TYPES]
        self._committed = [0] * 5  # fraudulent transactions scheduled so far, by type
        self._p_travel = cfg.travel_rate
        self._p_big = self._p_travel + cfg.big_purchase_rate
        self._n = self._seq = 0
        self._events: list[tuple[int, int, int, _Campaign]] = []
        self._labels: list[tuple[int, int, str, int, int, int]] = []
        self._busy: set[str] = set()
        self._compromised: dict[str, int] = {}  # terminal -> compromised until
        self._stats = {"transactions": 0, "fraud": 0, "labels_emitted": 0}
        self._stats.update({f"fraud_{t}": 0 for t in FRAUD_TYPES})
        self._stats.update({f"campaigns_{t}": 0 for t in FRAUD_TYPES})


    def _new_device(self) -> str:
        self._next_device += 1
        return f"dev_{self._next_device - 1:07d}"

    # ---------------------------------------------------------------- public API
    def next_transaction(self, now_ms: int) -> dict[str, Any]:
        """One Transaction dict at event time ``now_ms`` (fraud when a campaign event is due)."""
        self._n += 1
        self._stats["transactions"] += 1
        ftype = self._n % 5  # each type in turn: slow campaigns never starve fast ones
        if self._budget[ftype] * self._n > self._committed[ftype] and self._r() < _HAZARD:
            self._start_campaign(ftype, now_ms)
        ev = self._events
        if ev and ev[0][0] <= now_ms:
            _, _, kind, camp = heapq.heappop(ev)
            return self._emit(kind, camp, now_ms)
        return self._genuine(now_ms)

    def due_labels(self, now_ms: int) -> list[dict[str, Any]]:
        """Label dicts with ``label_time <= now_ms``, in label_time order; each returned once."""
        out = []
        heap = self._labels
        while heap and heap[0][0] <= now_ms:
            lt, n, card_id, mid, ft, src, et = heapq.heappop(heap)
            out.append({
                "transaction_id": f"{self._prefix}-{n}", "card_id": card_id, "merchant_id": mid,
                "is_fraud": ft >= 0, "fraud_type": FRAUD_TYPES[ft] if ft >= 0 else None,
                "source": _SOURCES[src], "event_time": et, "label_time": lt,
            })
        self._stats["labels_emitted"] += len(out)
        return out

    def generator_stats(self) -> dict[str, int]:
        """Counts for progress reports: transactions, fraud (total and by type), campaigns
        started by type, labels emitted and pending, scheduled campaign events."""
        return {**self._stats, "labels_pending": len(self._labels),
                "events_scheduled": len(self._events)}

    # ---------------------------------------------------------------- building blocks
    def _txn(self, now_ms: int, card: Card, m: Merchant, term: str, amount: float,
             channel: str, device: str | None, ip: str | None) -> dict[str, Any]:
        cp = channel in CARD_PRESENT
        return {
            "transaction_id": f"{self._prefix}-{self._n}", "event_time": now_ms,
            "card_id": card.card_id, "customer_id": card.customer_id, "merchant_id": m.mid,
            "terminal_id": term, "amount": amount if amount >= 0.01 else 0.01,
            "currency": m.currency, "mcc": m.mcc, "country": m.country,
            "card_country": card.country, "lat": m.lat if cp else None,
            "lon": m.lon if cp else None, "device_id": device, "ip": ip, "channel": channel,
        }

    def _push_label(self, card: Card, m: Merchant, ftype: int, now_ms: int) -> None:
        cfg = self.config
        mean, sd = cfg.label_delay_days, cfg.label_delay_spread_days
        days = self._rng.gammavariate((mean / sd) ** 2, sd * sd / mean) if sd * mean else mean
        src = 2 if ftype < 0 else (0 if self._r() < 0.7 else 1)
        lt = now_ms + int(days * self._day_ms)
        heapq.heappush(self._labels, (lt, self._n, card.card_id, m.mid, ftype, src, now_ms))

    def _schedule(self, due: int, kind: int, camp: _Campaign, fraud: bool = True) -> None:
        self._seq += 1
        heapq.heappush(self._events, (due, self._seq, kind, camp))
        camp.remaining += 1
        self._committed[camp.ftype] += fraud

    def _amount_eur(self, card: Card) -> float:
        return self._rng.lognormvariate(card.mu, card.sigma)

    def _atm_amount(self, m: Merchant, scale: float = 1.0) -> float:
        step = 10.0 ** max(0, math.floor(math.log10(m.fx)) + 1)
        eur = _ATM_EUR[int(self._r() * len(_ATM_EUR))] * scale
        return float(max(step, round(eur * m.fx / step) * step))

    def _free_card(self) -> Card:
        cards, r = self._cards, self._r
        for _ in range(20):
            card = cards[int(r() * len(cards))]
            if card.card_id not in self._busy and card.trip is None:
                break
        self._busy.add(card.card_id)
        return card

    # ---------------------------------------------------------------- genuine traffic
    def _genuine(self, now_ms: int) -> dict[str, Any]:
        r = self._r
        if r() < 0.8:
            bucket = self._by_hour[(now_ms // 3_600_000 + 1) % 24]
            card = bucket[int(r() * len(bucket))]
        else:
            card = self._cards[int(r() * len(self._cards))]
        if card.trip is not None:
            return self._trip_txn(card, now_ms)
        odd = r()
        if odd < self._p_travel:
            dest = [k for k in self._cities if k[0] != card.country]
            card.trip = [dest[int(r() * len(dest))], self._rng.randint(3, 12)]
            return self._trip_txn(card, now_ms)
        device = ip = None
        c = r()
        if odd < self._p_big:  # a big purchase at the local electronics shop or online
            m = next(x for x in self._cp_city[card.city] if x.mcc == "5732")
            channel = "pos" if c < 0.5 else "ecom"
            amount = self._amount_eur(card) * self._rng.uniform(4.0, 12.0) * m.fx
        elif c < card.p_cp:
            m = card.cp[int(r() * len(card.cp))]
            eur = self._amount_eur(card) * m.factor
            channel = "contactless" if eur < 50 and r() < card.p_cl else "pos"
            amount = eur * m.fx
        elif c < card.p_ecom:
            m = card.ecom[int(r() * len(card.ecom))]
            channel, amount = "ecom", self._amount_eur(card) * m.factor * m.fx
        elif c < card.p_atm:
            m = card.atm[int(r() * len(card.atm))]
            channel, amount = "atm", self._atm_amount(m)
        else:
            m = card.moto[int(r() * len(card.moto))]
            channel, amount = "moto", self._amount_eur(card) * m.factor * m.fx
        if channel == "ecom":
            k = int(r() * len(card.devices))
            device, ip = card.devices[k], card.ips[k]
            if odd > 1.0 - self.config.new_device_rate:
                device, ip = self._new_device(), random_ip(self._rng, card.country)
                card.devices.append(device)
                card.ips.append(ip)
            elif r() < 0.1:
                ip = random_ip(self._rng, card.country)
        term = m.terminals[int(r() * len(m.terminals))]
        return self._genuine_done(card, m, term, round(amount, 2), channel, device, ip, now_ms)

    def _genuine_done(self, card: Card, m: Merchant, term: str, amount: float, channel: str,
                      device: str | None, ip: str | None, now_ms: int) -> dict[str, Any]:
        if channel in CARD_PRESENT:
            card.last_lat, card.last_lon, card.last_t = m.lat, m.lon, now_ms
        if self._compromised and term in self._compromised:
            if self._compromised[term] < now_ms:
                del self._compromised[term]
            elif self._r() < _SKIM_P:
                self._start_cashout(card, now_ms)
        if self._r() < self.config.genuine_label_rate and (
                len(self._labels) < self.config.max_pending_labels):
            self._push_label(card, m, -1, now_ms)
        return self._txn(now_ms, card, m, term, amount, channel, device, ip)

    def _trip_txn(self, card: Card, now_ms: int) -> dict[str, Any]:
        r = self._r
        city, left = card.trip
        card.trip = [city, left - 1] if left > 1 else None
        if r() < 0.85:
            ms = self._cp_city[city]
            m = ms[int(r() * len(ms))]
            eur = self._amount_eur(card) * m.factor
            channel, amount = ("contactless" if eur < 50 and r() < 0.5 else "pos"), eur * m.fx
        else:
            m = self._atm_city[city][0]
            channel, amount = "atm", self._atm_amount(m, 2.0)
        term = m.terminals[int(r() * len(m.terminals))]
        return self._genuine_done(card, m, term, round(amount, 2), channel, None, None, now_ms)

    # ---------------------------------------------------------------- campaigns
    def _start_campaign(self, ftype: int, now_ms: int) -> None:
        self._stats[f"campaigns_{FRAUD_TYPES[ftype]}"] += 1
        rng, r, k = self._rng, self._r, self._k
        t = now_ms + int(r() * 30_000 * k)
        if ftype == _CT:  # many tiny ecom amounts on one card, mostly one merchant
            card = self._free_card()
            pool = self._ct_merchants
            camp = _Campaign(_CT, card, rng.sample(pool, 1 if r() < 0.7 else min(3, len(pool))))
            camp.device, camp.ip = self._new_device(), random_ip(rng, camp.merchants[0].country)
            for _ in range(rng.randint(15, 50)):
                self._schedule(t, _CT, camp)
                t += int((1000 + rng.expovariate(1 / 4000)) * k)
        elif ftype == _ATO:  # new device, new country, high amounts
            card = self._free_card()
            countries = [c for c, ms in self._ecom_country.items() if ms and c != card.country]
            country = rng.choice(countries)
            camp = _Campaign(_ATO, card, self._ecom_country[country])
            camp.device, camp.ip = self._new_device(), random_ip(rng, country)
            for _ in range(rng.randint(2, 6)):
                self._schedule(t, _ATO, camp)
                t += int(rng.randint(MINUTE_MS, 15 * MINUTE_MS) * k)
        elif ftype == _CM:  # a terminal skims cards and sees fraud for days
            home = [m for m in self._merchants if m.cp and m.country in self.config.home_countries]
            m = rng.choice(home)
            camp = _Campaign(_CM, None, [m])
            camp.terminal = rng.choice(m.terminals)
            window = rng.uniform(1.0, 4.0) * self._day_ms
            self._compromised[camp.terminal] = int(now_ms + window)
            for due in sorted(now_ms + int(r() * window) for _ in range(rng.randint(15, 40))):
                fraud = r() < _CM_FRAUD_SHARE
                self._schedule(due, _CM if fraud else -_CM, camp, fraud)
        elif ftype == _VB:  # many normal purchases on one card, different shops, minutes
            card = self._free_card()
            n = rng.randint(6, 14)
            shops = rng.sample(self._cp_city[card.city], min(n, len(self._cp_city[card.city])))
            online = [m for m in self._ecom_country[card.country] if m not in shops]
            online = rng.sample(online, min(n - len(shops) + n // 4, len(online)))
            camp = _Campaign(_VB, card, (shops[: n - len(online)] + online)[:n])
            rng.shuffle(camp.merchants)
            camp.device, camp.ip = self._new_device(), random_ip(rng, card.country)
            for _ in camp.merchants:
                self._schedule(t, _VB, camp)
                t += int(rng.randint(10_000, 60_000) * k)
        else:  # impossible travel: at home, then card-present far away soon after
            card = self._free_card()
            camp = _Campaign(_IT, card, [])
            self._schedule(t, -_IT, camp, fraud=False)
            t += int(rng.randint(5 * MINUTE_MS, 60 * MINUTE_MS) * k)
            for _ in range(rng.randint(1, 3)):
                self._schedule(t, _IT, camp)
                t += int(rng.randint(2 * MINUTE_MS, 15 * MINUTE_MS) * k)

    def _start_cashout(self, card: Card, now_ms: int) -> None:
        camp = _Campaign(_CM, card, [])
        t = now_ms + int(self._rng.uniform(0.5, 3.0) * self._day_ms)
        for _ in range(self._rng.randint(1, 3)):
            self._schedule(t, _CM + 10, camp)
            t += int(self._rng.randint(5 * MINUTE_MS, 60 * MINUTE_MS) * self._k)

    def _emit(self, kind: int, camp: _Campaign, now_ms: int) -> dict[str, Any]:
        r, rng = self._r, self._rng
        camp.remaining -= 1
        if camp.remaining == 0 and camp.ftype != _CM:  # cards of _free_card are free again
            self._busy.discard(camp.card.card_id)
        if kind < 0:  # a genuine transaction that the campaign needs at a given place
            if kind == -_IT:
                card = camp.card
                m = card.cp[int(r() * len(card.cp))]
                term, channel = m.terminals[0], "pos"
            else:
                m, term, channel = camp.merchants[0], camp.terminal, "pos"
                local = self._cards_by_country[m.country] or self._cards
                card = local[int(r() * len(local))]  # skimmed (maybe) in _genuine_done
            amount = round(self._amount_eur(card) * m.factor * m.fx, 2)
            return self._genuine_done(card, m, term, amount, channel, None, None, now_ms)
        card, device, ip = camp.card, None, None
        if kind == _CT:
            m = camp.merchants[int(r() * len(camp.merchants))]
            term, channel, device, ip = m.terminals[0], "ecom", camp.device, camp.ip
            amount = round(rng.uniform(0.5, 3.0), 2)
        elif kind == _ATO:
            m = camp.merchants[int(r() * len(camp.merchants))]
            term, channel, device, ip = m.terminals[0], "ecom", camp.device, camp.ip
            eur = max(300.0, self._amount_eur(card) * rng.uniform(5.0, 15.0))
            amount = round(eur * m.fx, 2)
        elif kind == _CM:  # a cloned card used at the colluding terminal
            card = self._cards[int(r() * len(self._cards))]
            m, term, channel = camp.merchants[0], camp.terminal, "pos"
            amount = round(self._amount_eur(card) * m.factor * rng.uniform(1.5, 4.0) * m.fx, 2)
        elif kind == _CM + 10:  # cash-out of a skimmed card, elsewhere
            city = rng.choice([k for k in self._cities if k != card.city])
            if r() < 0.6:
                m = rng.choice(self._atm_city[city])
                channel, amount = "atm", self._atm_amount(m, 2.5)
            else:
                m = rng.choice([x for x in self._cp_city[city] if x.factor >= 1.8])
                channel = "pos"
                amount = round(self._amount_eur(card) * rng.uniform(5.0, 15.0) * m.fx, 2)
            term = rng.choice(m.terminals)
            kind = _CM
        elif kind == _VB:  # each event at a different shop or site
            m = camp.merchants.pop()
            if m.cp and m.city == card.city:
                channel = "contactless" if r() < 0.5 else "pos"
            else:
                channel, device, ip = "ecom", camp.device, camp.ip
            term = m.terminals[0]
            amount = round(self._amount_eur(card) * min(m.factor, 2.0) * m.fx, 2)
        else:  # _IT: card-present too far from the card's last genuine card-present use
            m = self._far_merchant(camp, now_ms)
            term, channel = m.terminals[0], "pos"
            amount = round(self._amount_eur(card) * m.factor * rng.uniform(1.0, 3.0) * m.fx, 2)
        self._stats["fraud"] += 1
        self._stats[f"fraud_{FRAUD_TYPES[kind]}"] += 1
        self._push_label(card, m, kind, now_ms)
        return self._txn(now_ms, card, m, term, amount, channel, device, ip)

    def _far_merchant(self, camp: _Campaign, now_ms: int) -> Merchant:
        """A shop in a city that would need > 1200 km/h (and >= 2500 km) to reach in time."""
        card = camp.card
        hours = (now_ms - card.last_t) / 3_600_000 if card.last_t is not None else 0.0
        need = max(2500.0, 1200.0 * hours)

        def dist(city: City) -> float:
            return haversine_km(card.last_lat, card.last_lon, *city_centre(city))

        if camp.city is None or dist(camp.city) < need:
            far = [k for k in self._cities if dist(k) >= need]
            camp.city = self._rng.choice(far) if far else max(self._cities, key=dist)
        ms = self._cp_city[camp.city]
        return ms[int(self._r() * len(ms))]


def generate_history(
    config: GeneratorConfig, start_ms: int, days: float, per_day: int,
    late_ratio: float = 0.0, late_max_ms: int = 2 * 3_600_000,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """A simulated history: (transactions in arrival order, labels known by its end).

    Event times follow a Poisson process of ``per_day`` a day from ``start_ms``. A share
    ``late_ratio`` of transactions arrives late, up to ``late_max_ms`` after its event time
    (an offline terminal), so arrival order differs from event-time order there.
    Labels are those whose ``label_time`` falls before the end.
    """
    gen = TrafficGenerator(config)
    rng = random.Random(config.seed ^ 0x1A7E)
    end = start_ms + int(days * DAY_MS)
    mean_gap = DAY_MS / per_day
    t = float(start_ms)
    arrivals: list[tuple[float, int, dict[str, Any]]] = []
    while True:
        t += rng.expovariate(1.0 / mean_gap)
        if t >= end:
            break
        txn = gen.next_transaction(int(t))
        delay = rng.uniform(1.0, late_max_ms) if rng.random() < late_ratio else 0.0
        arrivals.append((t + delay, len(arrivals), txn))
    arrivals.sort(key=lambda a: (a[0], a[1]))
    return [a[2] for a in arrivals], gen.due_labels(end)


def arrival_events(txns: list[dict[str, Any]], labels: list[dict[str, Any]],
                   rates: Rates | None = None) -> list[tuple[str, dict[str, Any]]]:
    """One stream as the topics would carry it: transactions in arrival order, each label
    once the stream reached its label_time (the rest at the end). Transactions come as the
    worker's validator returns them (``amount_ref`` in the reference currency of ``rates``,
    the shipped table by default), ready for the offline feature builder."""
    rates = rates or Rates.load()
    txns = [validate_history_transaction(t, rates) for t in txns]
    pending = sorted(labels, key=lambda lab: lab["label_time"])
    out: list[tuple[str, dict[str, Any]]] = []
    latest, j = 0, 0
    for t in txns:
        latest = max(latest, t["event_time"])
        while j < len(pending) and pending[j]["label_time"] <= latest:
            out.append(("label", pending[j]))
            j += 1
        out.append(("transaction", t))
    return out + [("label", lab) for lab in pending[j:]]
