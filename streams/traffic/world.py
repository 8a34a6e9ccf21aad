"""The synthetic world that :mod:`fraudstream.streams.traffic.generator` plays traffic over, and
the generator's config: countries and their cities, merchants and their terminals, cards,
customers and their devices, all drawn once from ``GeneratorConfig.seed``.

* The same seed gives the same world, whatever the traffic seed
  (``GeneratorConfig.traffic_seed``): a live demo can run on the world a model was trained
  on.
* Each card has a home city, a few local shops, online merchants (mostly domestic), the
  city's ATMs, and the hours of the day it is mostly used in.
* Devices and IPs come in one format (``dev_0000123``, :func:`random_ip`), for customers
  here and for fraudsters in the generator alike.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

FRAUD_TYPES = (
    "card_testing", "account_takeover", "compromised_merchant", "velocity_burst",
    "impossible_travel",
)

# code: (currency, units per EUR, first IP octet, city centres (lat, lon))
_COUNTRIES: dict[str, tuple[str, float, int, tuple[tuple[float, float], ...]]] = {
    "FR": ("EUR", 1.0, 90, ((48.857, 2.352), (45.764, 4.836), (43.297, 5.370), (43.605, 1.444))),
    "DE": ("EUR", 1.0, 91, ((52.520, 13.405), (48.137, 11.575), (53.551, 9.994))),
    "ES": ("EUR", 1.0, 83, ((40.417, -3.704), (41.385, 2.173), (39.470, -0.376))),
    "IT": ("EUR", 1.0, 79, ((41.903, 12.496), (45.464, 9.190), (40.852, 14.268))),
    "NL": ("EUR", 1.0, 145, ((52.368, 4.904), (51.924, 4.478))),
    "BE": ("EUR", 1.0, 81, ((50.850, 4.352), (51.219, 4.402))),
    "GB": ("GBP", 0.85, 86, ((51.507, -0.128), (53.481, -2.243), (55.953, -3.188))),
    "US": ("USD", 1.08, 73, ((40.713, -74.006), (34.052, -118.244), (41.878, -87.630))),
    "CA": ("CAD", 1.47, 99, ((43.653, -79.383),)),
    "BR": ("BRL", 5.4, 177, ((-23.551, -46.633), (-22.907, -43.173))),
    "MA": ("MAD", 10.9, 105, ((33.573, -7.590),)),
    "NG": ("NGN", 1600.0, 102, ((6.524, 3.379),)),
    "IN": ("INR", 90.0, 117, ((19.076, 72.878),)),
    "TH": ("THB", 39.0, 110, ((13.756, 100.502),)),
    "JP": ("JPY", 162.0, 126, ((35.690, 139.692), (34.694, 135.502))),
    "AU": ("AUD", 1.65, 101, ((-33.869, 151.209),)),
}
#: Country -> ISO 4217 currency used for transactions there.
COUNTRY_CURRENCY = {c: v[0] for c, v in _COUNTRIES.items()}
#: Currency -> units per EUR (rough, fixed): amounts are drawn in EUR and converted.
UNITS_PER_EUR = {v[0]: v[1] for v in _COUNTRIES.values()}

# mcc, weight, amount factor, card-present, ecom, moto
_MCCS = (
    ("5411", 16, 0.9, 1, 0, 0), ("5812", 12, 1.1, 1, 0, 0), ("5814", 8, 0.4, 1, 0, 0),
    ("5541", 7, 1.3, 1, 0, 0), ("5912", 5, 0.8, 1, 0, 0), ("5311", 5, 2.0, 1, 1, 0),
    ("5691", 6, 1.8, 1, 1, 0), ("5732", 4, 4.0, 1, 1, 0), ("5944", 2, 6.0, 1, 0, 0),
    ("4121", 4, 0.7, 1, 1, 0), ("5816", 5, 0.3, 0, 1, 0), ("5967", 4, 0.9, 0, 1, 1),
    ("4814", 3, 1.2, 0, 1, 1), ("4511", 3, 8.0, 0, 1, 1), ("7011", 3, 5.0, 1, 1, 1),
    ("6011", 6, 1.0, 0, 0, 0),
)


@dataclass(frozen=True)
class GeneratorConfig:
    """Everything that shapes the synthetic world and its traffic; rates are per
    transaction."""

    seed: int = 42
    n_cards: int = 2000
    n_merchants: int = 300
    devices_per_customer: float = 1.5  # mean, between 1 and 2
    second_card_rate: float = 0.15  # chance a customer owns a second card
    fraud_rate: float = 0.015
    #: share of fraudulent transactions by type (normalized)
    campaign_mix: tuple[tuple[str, float], ...] = tuple((t, 0.2) for t in FRAUD_TYPES)
    label_delay_days: float = 3.0
    label_delay_spread_days: float = 1.5
    genuine_label_rate: float = 0.03
    time_compression: float = 1.0
    #: divides minute-scale campaign timings (bursts, gaps): > 1 plays campaigns out faster,
    #: for short demos and load tests (signatures keep their shape, only quicker)
    campaign_time_scale: float = 1.0
    home_countries: tuple[str, ...] = ("FR", "DE", "ES", "IT", "NL", "BE", "GB")
    foreign_countries: tuple[str, ...] = ("US", "CA", "BR", "MA", "NG", "IN", "TH", "JP", "AU")
    travel_rate: float = 0.002  # a card starts a trip abroad (3-12 transactions)
    big_purchase_rate: float = 0.004  # 4-12x the card's usual amount
    new_device_rate: float = 0.003  # a genuine ecom purchase from a new phone/laptop
    id_prefix: str = ""  # transaction_id prefix; "" -> "t<seed>" (set per run to avoid reuse)
    #: the traffic's own seed (default: ``seed``): the same world (cards, merchants, devices)
    #: with other traffic, e.g. a live demo after training on a history of that world
    traffic_seed: int | None = None
    max_pending_labels: int = 1_000_000  # beyond it, no new genuine samples (fraud always)

    def __post_init__(self) -> None:
        unknown = [c for c in self.home_countries + self.foreign_countries if c not in _COUNTRIES]
        if unknown or not self.home_countries or not self.foreign_countries:
            raise ValueError(f"countries must be non-empty, among {sorted(_COUNTRIES)}: {unknown}")
        mix = dict(self.campaign_mix)
        if set(mix) - set(FRAUD_TYPES) or sum(mix.values()) <= 0:
            raise ValueError(f"campaign_mix: types among {FRAUD_TYPES}, some weight > 0")
        if not 0.0 <= self.fraud_rate < 0.5 or min(self.time_compression,
                                                    self.campaign_time_scale) <= 0 or min(
                self.label_delay_days, self.label_delay_spread_days) < 0:
            raise ValueError("need fraud_rate in [0, 0.5), time_compression > 0, delays >= 0")
        n_cities = sum(len(_COUNTRIES[c][3]) for c in self.home_countries + self.foreign_countries)
        if self.n_merchants < 3 * n_cities or self.n_cards < 10:
            raise ValueError(f"need n_merchants >= {3 * n_cities} (3 per city) and n_cards >= 10")


City = tuple[str, int]  # (country code, index of its city centre)


class Merchant:
    """A shop, site or ATM: its category, place, currency and terminals."""

    __slots__ = ("mid", "mcc", "country", "currency", "fx", "city", "lat", "lon", "terminals",
                 "factor", "cp", "ecom", "moto")


class Card:
    """A card and its holder's habits; ``trip``, ``last_*`` and the devices change as
    the generator plays traffic."""

    __slots__ = ("card_id", "customer_id", "country", "city", "mu", "sigma", "p_cp", "p_ecom",
                 "p_atm", "p_cl", "cp", "ecom", "atm", "moto", "devices", "ips", "trip",
                 "last_lat", "last_lon", "last_t")


@dataclass
class World:
    """What :func:`build_world` draws; the generator reads it (and adds devices to cards)."""

    cities: list[City]
    merchants: list[Merchant]
    #: card-present shops and ATMs of each city
    cp_city: dict[City, list[Merchant]]
    atm_city: dict[City, list[Merchant]]
    #: online merchants by country
    ecom_country: dict[str, list[Merchant]]
    #: where card testing goes: online merchants in EUR, GBP or USD
    ct_merchants: list[Merchant]
    cards: list[Card]
    cards_by_country: dict[str, list[Card]]
    #: cards by hour of the day they are mostly used in
    by_hour: list[list[Card]]
    #: devices handed out so far (the next one is ``dev_<n_devices>``)
    n_devices: int


def city_centre(city: City) -> tuple[float, float]:
    return _COUNTRIES[city[0]][3][city[1]]


def random_ip(rng: random.Random, country: str) -> str:
    """An address in the country's (made-up) first octet."""
    r = rng.random
    return f"{_COUNTRIES[country][2]}.{int(r() * 256)}.{int(r() * 256)}.{1 + int(r() * 254)}"


def build_world(cfg: GeneratorConfig, rng: random.Random) -> World:
    """The world of ``cfg``, drawn from ``rng`` (seeded with ``cfg.seed`` by the generator)."""
    countries = cfg.home_countries + cfg.foreign_countries
    cities = [(c, i) for c in countries for i in range(len(_COUNTRIES[c][3]))]
    home_cities = [k for k in cities if k[0] in cfg.home_countries]
    foreign_cities = [k for k in cities if k[0] not in cfg.home_countries]
    ms: list[Merchant] = []

    def add(city: City, row: tuple[str, int, float, int, int, int]) -> None:
        m = Merchant()
        m.mid = f"merch_{len(ms):05d}"
        m.mcc, _, m.factor, m.cp, m.ecom, m.moto = row
        m.country, m.city = city[0], city
        m.currency, m.fx = _COUNTRIES[city[0]][:2]
        clat, clon = city_centre(city)
        m.lat, m.lon = round(clat + rng.gauss(0, 0.04), 5), round(clon + rng.gauss(0, 0.05), 5)
        n_term = rng.randint(1, 5) if m.cp or m.mcc == "6011" else 1
        m.terminals = [f"term_{len(ms):05d}_{k}" for k in range(n_term)]
        ms.append(m)

    by_mcc = {row[0]: row for row in _MCCS}
    for city in cities:  # every city has an ATM, a grocery and an electronics shop
        for mcc in ("6011", "5411", "5732"):
            add(city, by_mcc[mcc])
    weights = [row[1] for row in _MCCS]
    for _ in range(cfg.n_merchants - len(ms)):
        city = rng.choice(home_cities if rng.random() < 0.85 else foreign_cities)
        add(city, rng.choices(_MCCS, weights)[0])
    cp_city: dict[City, list[Merchant]] = {k: [] for k in cities}
    atm_city: dict[City, list[Merchant]] = {k: [] for k in cities}
    for m in ms:
        if m.mcc == "6011":
            atm_city[m.city].append(m)
        elif m.cp:
            cp_city[m.city].append(m)
    ecom_country = {c: [m for m in ms if m.ecom and m.country == c] for c in countries}
    ecom_all = [m for m in ms if m.ecom]
    moto_all = [m for m in ms if m.moto]
    ct_merchants = [m for m in ecom_all if m.currency in ("EUR", "GBP", "USD")] or ecom_all

    cards: list[Card] = []
    by_hour: list[list[Card]] = [[] for _ in range(24)]
    n_dev = 0
    cust = None
    for i in range(cfg.n_cards):
        c = Card()
        if cust is not None and cust[4] == 1 and rng.random() < cfg.second_card_rate:
            cust[4] = 2
        else:
            city = rng.choice(home_cities)
            n = 1 + (rng.random() < cfg.devices_per_customer - 1)
            devs = [f"dev_{n_dev + k:07d}" for k in range(n)]
            n_dev += n
            ips = [random_ip(rng, city[0]) for _ in devs]
            cust = [f"cust_{i:06d}", city, devs, ips, 1]
        c.card_id, c.customer_id = f"card_{i:06d}", cust[0]
        c.city, c.devices, c.ips = cust[1], cust[2], cust[3]
        c.country = c.city[0]
        c.mu, c.sigma = rng.gauss(math.log(30), 0.4), rng.uniform(0.55, 0.95)
        w = (rng.uniform(0.5, 0.8), rng.uniform(0.12, 0.35), rng.uniform(0.02, 0.07), 0.01)
        c.p_cp, c.p_ecom, c.p_atm = (sum(w[: k + 1]) / sum(w) for k in range(3))
        c.p_cl = rng.uniform(0.2, 0.8)
        local = cp_city[c.city]
        c.cp = rng.sample(local, min(len(local), rng.randint(6, 15)))
        dom = ecom_country[c.country] or ecom_all
        c.ecom = [rng.choice(dom if rng.random() < 0.8 else ecom_all)
                  for _ in range(rng.randint(3, 8))]
        c.atm = atm_city[c.city]
        c.moto = [rng.choice(moto_all) for _ in range(2)] if moto_all else c.ecom
        c.trip = None
        c.last_lat, c.last_lon = city_centre(c.city)
        c.last_t = None
        centre = rng.choice((10, 13, 18, 20)) + rng.gauss(0, 1.5)
        for h in range(int(centre) - 5, int(centre) + 6):
            by_hour[h % 24].append(c)
        cards.append(c)
    return World(
        cities=cities, merchants=ms, cp_city=cp_city, atm_city=atm_city,
        ecom_country=ecom_country, ct_merchants=ct_merchants, cards=cards,
        cards_by_country={c: [x for x in cards if x.country == c] for c in countries},
        by_hour=[b or cards for b in by_hour], n_devices=n_dev)
