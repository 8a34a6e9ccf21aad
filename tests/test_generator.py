"""The synthetic traffic generator: schema-valid records, determinism, fraud signatures, labels."""

from __future__ import annotations

import io
import json
import re
import statistics
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import pytest
from fastavro import parse_schema, schemaless_writer
from fastavro.validation import validate

from fraudstream.schemas.fx import Rates
from fraudstream.schemas.validate import validate_transaction
from fraudstream.state.geo import haversine_km
from fraudstream.streams.traffic.generator import DAY_MS, TrafficGenerator
from fraudstream.streams.traffic.world import (
    COUNTRY_CURRENCY,
    FRAUD_TYPES,
    UNITS_PER_EUR,
    GeneratorConfig,
)

SCHEMA_DIR = Path(__file__).resolve().parents[1] / "schemas"
T0 = 1_700_000_000_000
STEP_MS = 50
N = 80_000
COMPRESSION = 1440.0  # one day of label delay -> one minute


def _schema(name: str) -> dict[str, Any]:
    return parse_schema(json.loads((SCHEMA_DIR / f"{name}.avsc").read_text()))


class Run:
    """One long run: transactions, labels (checked for due-ness as they came), truth by id."""

    def __init__(self, config: GeneratorConfig, n: int = N) -> None:
        self.gen = TrafficGenerator(config)
        self.txns: list[dict[str, Any]] = []
        self.labels: list[dict[str, Any]] = []
        self.early: list[dict[str, Any]] = []  # labels handed out before their label_time
        self.unordered = 0
        now = T0
        for i in range(n):
            now = T0 + i * STEP_MS
            self.txns.append(self.gen.next_transaction(now))
            if i % 50 == 0:
                due = self.gen.due_labels(now)
                self.early += [lb for lb in due if lb["label_time"] > now]
                times = [lb["label_time"] for lb in due]
                self.unordered += times != sorted(times)
                self.labels += due
        self.end = now
        self.labels += self.gen.due_labels(2**62)
        self.by_id = {t["transaction_id"]: t for t in self.txns}
        self.fraud_label = {lb["transaction_id"]: lb for lb in self.labels if lb["is_fraud"]}

    def fraud(self, ftype: str) -> list[dict[str, Any]]:
        return [t for t in self.txns if (lb := self.fraud_label.get(t["transaction_id"]))
                and lb["fraud_type"] == ftype]

    def genuine(self) -> list[dict[str, Any]]:
        return [t for t in self.txns if t["transaction_id"] not in self.fraud_label]


@pytest.fixture(scope="module")
def run() -> Run:
    return Run(GeneratorConfig(seed=7, time_compression=COMPRESSION))


def test_every_transaction_and_label_matches_the_avro_schema(run: Run) -> None:
    txn_schema, label_schema = _schema("transaction"), _schema("label")
    names = {f["name"] for f in txn_schema["fields"]}
    buf = io.BytesIO()
    for i, t in enumerate(run.txns):
        assert set(t) == names
        schemaless_writer(buf, txn_schema, t)  # every record encodes...
        if i % 10 == 0 or t["transaction_id"] in run.fraud_label:  # ...and a sample validates
            assert validate(t, txn_schema, raise_errors=True)
    for lb in run.labels:
        assert validate(lb, label_schema, raise_errors=True)


@pytest.mark.slow  # 25-35 s: make test-slow (CI runs both)
def test_every_transaction_passes_the_workers_validation(run: Run) -> None:
    for t in run.txns:
        validate_transaction(t, now_ms=run.end, max_future_ms=0, max_amount=1e9,
                             rates=Rates.load())


def test_fields_look_like_real_traffic(run: Run) -> None:
    assert len({t["transaction_id"] for t in run.txns}) == len(run.txns)
    assert Counter(t["channel"] for t in run.txns).keys() == {
        "pos", "ecom", "atm", "moto", "contactless"}
    for t in run.txns:
        assert t["currency"] == COUNTRY_CURRENCY[t["country"]]
        assert re.fullmatch(r"[0-9]{4}", t["mcc"])
        assert t["amount"] > 0 and round(t["amount"], 2) == t["amount"]
        card_present = t["channel"] in ("pos", "contactless", "atm")
        assert (t["lat"] is not None) == card_present and (t["lon"] is not None) == card_present
        if t["channel"] != "ecom":
            assert t["device_id"] is None and t["ip"] is None
    ecom = [t for t in run.txns if t["channel"] == "ecom"]
    assert sum(t["device_id"] is not None for t in ecom) / len(ecom) > 0.95


def test_card_ids_are_tokens_never_card_numbers(run: Run) -> None:
    for t in run.txns:
        assert re.fullmatch(r"card_[0-9]{6}", t["card_id"])
        assert not re.search(r"[0-9]{13,19}", t["card_id"])
    customers = defaultdict(set)
    for t in run.txns:
        customers[t["customer_id"]].add(t["card_id"])
    assert any(len(cards) == 2 for cards in customers.values())  # some own two cards


def test_same_seed_and_clock_give_the_same_stream() -> None:
    def stream(seed: int) -> list[Any]:
        gen = TrafficGenerator(GeneratorConfig(seed=seed, time_compression=86_400))
        out: list[Any] = []
        now = T0
        for i in range(5000):
            now += (i * 7919) % 400  # irregular, non-decreasing clock
            out.append(gen.next_transaction(now))
            out.extend(gen.due_labels(now))
        return out

    assert stream(3) == stream(3)
    assert stream(3) != stream(4)


def test_fraud_rate_is_near_the_target(run: Run) -> None:
    rate = len(run.fraud_label) / len(run.txns)
    assert 0.0075 <= rate <= 0.03, rate
    stats = run.gen.generator_stats()
    assert stats["transactions"] == N and stats["fraud"] == len(run.fraud_label)
    assert all(stats[f"fraud_{t}"] > 0 for t in FRAUD_TYPES)


def test_every_fraud_gets_one_label_never_before_its_transaction(run: Run) -> None:
    assert not run.early and not run.unordered
    ids = [lb["transaction_id"] for lb in run.labels]
    assert len(ids) == len(set(ids))
    fraud_txns = [t for t in run.txns if t["transaction_id"] in run.fraud_label]
    assert len(fraud_txns) == len(run.fraud_label)  # every fraud label names a transaction
    for lb in run.labels:
        t = run.by_id[lb["transaction_id"]]
        assert lb["event_time"] == t["event_time"] and lb["card_id"] == t["card_id"]
        assert lb["label_time"] >= lb["event_time"]
        if lb["is_fraud"]:
            assert lb["fraud_type"] in FRAUD_TYPES
            assert lb["source"] in ("chargeback", "confirmed_fraud")
        else:
            assert lb["fraud_type"] is None and lb["source"] == "confirmed_genuine"
    genuine_labelled = sum(not lb["is_fraud"] for lb in run.labels)
    assert 0.02 < genuine_labelled / (len(run.txns) - len(fraud_txns)) < 0.04


@pytest.mark.parametrize("compression", [1.0, 86_400.0])
def test_label_delay_is_divided_by_time_compression(compression: float) -> None:
    cfg = GeneratorConfig(seed=1, time_compression=compression, genuine_label_rate=0.5)
    gen = TrafficGenerator(cfg)
    for i in range(2000):
        gen.next_transaction(T0 + i)
    labels = gen.due_labels(2**62)
    delays = [lb["label_time"] - lb["event_time"] for lb in labels]
    expected = cfg.label_delay_days * DAY_MS / compression
    assert abs(statistics.mean(delays) / expected - 1) < 0.1
    assert gen.due_labels(2**62) == []  # each label handed out once


def _bursts(txns: list[dict[str, Any]], gap_ms: int = 15 * 60_000) -> list[list[dict]]:
    """Group by card, then split a card's transactions where they pause for gap_ms."""
    by_card: dict[str, list[list[dict]]] = defaultdict(list)
    for t in txns:
        runs = by_card[t["card_id"]]
        if not runs or t["event_time"] - runs[-1][-1]["event_time"] > gap_ms:
            runs.append([])
        runs[-1].append(t)
    return [burst for runs in by_card.values() for burst in runs]


def _median_gap(ts: list[dict[str, Any]]) -> float:
    times = [t["event_time"] for t in ts]
    return statistics.median(b - a for a, b in zip(times, times[1:], strict=False))


def test_card_testing_is_a_burst_of_tiny_ecom_amounts_on_one_card(run: Run) -> None:
    txns = run.fraud("card_testing")
    assert all(0.5 <= t["amount"] <= 3.0 and t["channel"] == "ecom" for t in txns)
    bursts = _bursts(txns)
    assert len(bursts) >= 3
    for ts in bursts:
        assert len(ts) >= 15 or ts[-1]["event_time"] > run.end - 15 * 60_000  # cut by the end
        assert len(ts) < 2 or _median_gap(ts) < 30_000
        assert len({t["merchant_id"] for t in ts}) <= 3


def test_account_takeover_uses_new_device_new_country_high_amounts(run: Run) -> None:
    seen_devices = defaultdict(set)
    ato = {t["transaction_id"] for t in run.fraud("account_takeover")}
    assert ato
    for t in run.txns:
        if t["transaction_id"] in ato:
            assert t["device_id"] not in seen_devices[t["card_id"]]
            assert t["country"] != t["card_country"]
            assert t["amount"] / UNITS_PER_EUR[t["currency"]] >= 299.99
        elif t["transaction_id"] not in run.fraud_label:
            seen_devices[t["card_id"]].add(t["device_id"])


def test_compromised_terminal_sees_fraud_and_its_cards_are_cashed_out_later(run: Run) -> None:
    times = defaultdict(list)
    for t in run.fraud("compromised_merchant"):
        times[t["terminal_id"]].append(t["event_time"])
    # a terminal stays compromised for at most 4 (compressed) days, and sees several frauds
    window = 4 * DAY_MS / COMPRESSION
    bad = {term for term, ts in times.items() if len(ts) >= 4 and ts[-1] - ts[0] <= window}
    assert len(bad) >= 3
    during = Counter(
        t["terminal_id"] for t in run.txns if t["terminal_id"] in bad
        and times[t["terminal_id"]][0] <= t["event_time"] <= times[t["terminal_id"]][-1])
    assert all(len(times[term]) / during[term] >= 0.1 for term in bad)
    assert sum(len(times[term]) for term in bad) / sum(during.values()) >= 0.2
    used_bad_at = {}  # card -> first genuine use of a compromised terminal
    cashed_out = 0
    for t in run.txns:
        tid, card = t["transaction_id"], t["card_id"]
        if tid not in run.fraud_label and t["terminal_id"] in bad:
            used_bad_at.setdefault(card, t["event_time"])
        elif tid in run.fraud_label and t["terminal_id"] not in bad and card in used_bad_at:
            cashed_out += run.fraud_label[tid]["fraud_type"] == "compromised_merchant"
    assert cashed_out >= 5


def test_velocity_burst_is_many_normal_purchases_at_different_shops(run: Run) -> None:
    bursts = _bursts(run.fraud("velocity_burst"))
    assert len(bursts) >= 5
    for ts in bursts:
        if len(ts) < 6:  # a burst cut short by the end of the run
            assert ts[-1]["event_time"] > run.end - 15 * 60_000
            continue
        assert _median_gap(ts) <= 90_000
        assert len({t["merchant_id"] for t in ts}) == len(ts)

    def eur(txns: list[dict[str, Any]]) -> float:
        return statistics.median(t["amount"] / UNITS_PER_EUR[t["currency"]] for t in txns)

    assert 0.5 < eur(run.fraud("velocity_burst")) / eur(run.genuine()) < 3  # normal-size


def test_impossible_travel_needs_more_than_900_kmh(run: Run) -> None:
    it = {t["transaction_id"] for t in run.fraud("impossible_travel")}
    assert len(it) >= 20
    last_genuine_cp: dict[str, dict[str, Any]] = {}
    for t in run.txns:
        if t["transaction_id"] in it:
            assert t["lat"] is not None
            prev = last_genuine_cp[t["card_id"]]
            km = haversine_km(prev["lat"], prev["lon"], t["lat"], t["lon"])
            hours = (t["event_time"] - prev["event_time"]) / 3_600_000
            assert km >= 2500 and (hours == 0 or km / hours > 900), (km, hours)
        elif t["transaction_id"] not in run.fraud_label and t["lat"] is not None:
            last_genuine_cp[t["card_id"]] = t


def test_genuine_traffic_sometimes_looks_odd(run: Run) -> None:
    genuine = run.genuine()
    abroad = [t for t in genuine if t["lat"] is not None and t["country"] != t["card_country"]]
    big = [t for t in genuine if t["amount"] / UNITS_PER_EUR[t["currency"]] > 500]
    tiny = [t for t in genuine if t["channel"] == "ecom" and t["amount"] <= 3.0]
    assert len(abroad) > 50 and len(big) > 50 and len(tiny) > 50


def test_bad_config_is_refused() -> None:
    with pytest.raises(ValueError):
        GeneratorConfig(home_countries=("XX",))
    with pytest.raises(ValueError):
        GeneratorConfig(campaign_mix=(("phishing", 1.0),))
    with pytest.raises(ValueError):
        GeneratorConfig(n_merchants=10)


def test_campaign_time_scale_plays_every_pattern_out_in_a_short_demo() -> None:
    gen = TrafficGenerator(GeneratorConfig(
        seed=5, time_compression=86_400, campaign_time_scale=20, id_prefix="demo"))
    txns = [gen.next_transaction(T0 + i * 10) for i in range(30_000)]  # 5 minutes
    labels = gen.due_labels(T0 + 30_000 * 10)
    assert {lb["fraud_type"] for lb in labels if lb["is_fraud"]} == set(FRAUD_TYPES)
    assert 0.0075 <= sum(lb["is_fraud"] for lb in labels) / len(txns) <= 0.03
    assert all(t["transaction_id"].startswith("demo-") for t in txns)


def test_pending_genuine_labels_are_capped_fraud_labels_never() -> None:
    gen = TrafficGenerator(GeneratorConfig(seed=2, max_pending_labels=10, fraud_rate=0.03))
    for i in range(20_000):
        gen.next_transaction(T0 + i * 100)
    labels = gen.due_labels(2**62)
    assert sum(not lb["is_fraud"] for lb in labels) <= 10
    assert sum(lb["is_fraud"] for lb in labels) == gen.generator_stats()["fraud"] > 10
