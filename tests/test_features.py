"""The velocity features (state/): windows, event time, lateness, labels, records."""

from __future__ import annotations

import math
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path
from typing import Any

import orjson
import pytest

from fraudstream.state.engine import FeatureEngine, LabelEvent, MemoryStore, TxnEvent
from fraudstream.state.features import (
    DAY_MS,
    FEATURE_NAMES,
    HOUR_MS,
    MINUTE_MS,
    FeatureConfig,
    Vector,
)
from fraudstream.state.offline import offline_features
from fraudstream.state.records import CARD_CODE, record_max_ts, sections
from fraudstream.streams.traffic.generator import arrival_events, generate_history
from fraudstream.streams.traffic.world import GeneratorConfig

T0 = 1_790_000_000_000 - 1_790_000_000_000 % DAY_MS + 12 * HOUR_MS  # a Monday noon UTC


def txn(i: int, t: int, amount: float = 10.0, card: str = "card_1", merchant: str = "m1",
        **extra: Any) -> dict[str, Any]:
    """A transaction as the validator returns it: EUR, so ``amount_ref`` is the amount."""
    return {"transaction_id": f"t{i}", "event_time": t, "card_id": card,
            "merchant_id": merchant, "amount": amount, "currency": "EUR",
            "amount_ref": amount, "country": "FR", "lat": None,
            "lon": None, "device_id": None, "ip": None, **extra}


class Run:
    """A feature engine over a memory store, fed one event at a time."""

    def __init__(self, config: FeatureConfig | None = None, partitions: int = 1) -> None:
        self.store = MemoryStore(partitions)
        self.engine = FeatureEngine(config or FeatureConfig(), self.store)
        self.offset = 0

    def batch(self, events: list[dict[str, Any]], labels: list[dict[str, Any]] = (),
              partition: int = 0) -> list[Vector]:
        txns = []
        for e in events:
            txns.append(TxnEvent(partition, self.offset, e))
            self.offset += 1
        lbls = [LabelEvent(partition, self.offset + i, lab) for i, lab in enumerate(labels)]
        self.offset += len(labels)
        out = self.engine.process(txns, lbls)
        self.store.write(out.writes)
        return out.vectors

    def one(self, event: dict[str, Any]) -> Vector:
        return self.batch([event])[0]


def test_exact_short_windows_and_bucketed_long_ones() -> None:
    run = Run()
    times = [T0 - 50 * MINUTE_MS, T0 - 9 * MINUTE_MS, T0 - 30_000, T0]
    vs = [run.one(txn(i, t, amount=10.0 * (i + 1))) for i, t in enumerate(times)]
    last = vs[-1]
    assert (last["card_count_1m"], last["card_count_10m"], last["card_count_1h"]) == (2, 3, 4)
    assert last["card_sum_1m"] == 30 + 40
    assert last["card_max_10m"] == 40 and last["card_mean_1h"] == 25
    assert last["card_count_24h"] == 4 and last["card_count_30d"] == 4
    assert vs[0]["card_count_1m"] == 1  # a window includes the event itself
    # 61 minutes later the 1 h window has forgotten all but one.
    later = run.one(txn(9, T0 + 61 * MINUTE_MS - 9 * MINUTE_MS))
    assert later["card_count_1h"] == 2 + 1


def test_gap_amount_ratio_and_zscore_compare_with_the_earlier_history() -> None:
    run = Run()
    first = run.one(txn(0, T0 - DAY_MS, amount=10.0))
    assert first["card_has_prev"] == 0 and first["card_has_history_30d"] == 0
    run.one(txn(1, T0 - HOUR_MS, amount=30.0))
    v = run.one(txn(2, T0, amount=100.0))
    assert v["card_secs_since_prev"] == 3600
    assert v["card_amount_over_mean_30d"] == pytest.approx(100 / 20)
    assert v["card_amount_zscore_30d"] == pytest.approx((100 - 20) / 10)


def test_first_use_distinct_counts_and_geo_velocity() -> None:
    run = Run()
    a = run.one(txn(0, T0, merchant="m1", country="FR", lat=48.8566, lon=2.3522,
                    device_id="dev1"))
    assert (a["card_first_merchant"], a["card_first_country"], a["card_first_device"]) == (1, 1, 1)
    assert a["card_geo_known"] == 0
    b = run.one(txn(1, T0 + HOUR_MS, merchant="m2", country="US", lat=40.7128, lon=-74.0060,
                    device_id="dev1"))
    assert (b["card_first_merchant"], b["card_first_country"], b["card_first_device"]) == (1, 1, 0)
    assert b["card_distinct_merchants_24h"] == 2 and b["card_distinct_countries_24h"] == 2
    assert b["card_geo_known"] == 1
    assert b["card_geo_kmh"] == pytest.approx(5837, rel=0.01)  # Paris -> New York in 1 h
    c = run.one(txn(2, T0 + 2 * HOUR_MS, merchant="m1"))
    assert c["card_first_merchant"] == 0


def test_missing_optional_fields_give_indicators_not_errors() -> None:
    v = Run().one(txn(0, T0))
    assert (v["has_location"], v["has_device"], v["has_ip"]) == (0, 0, 0)
    assert v["device_cards_24h"] == 0 and v["card_geo_known"] == 0
    w = Run().one(txn(0, T0, lat=1.0, lon=2.0, device_id="d", ip="10.0.0.1"))
    assert (w["has_location"], w["has_device"], w["has_ip"]) == (1, 1, 1)
    assert w["device_count_1h"] == 1 and w["ip_cards_24h"] == 1
    assert all(math.isfinite(x) for x in v.row) and len(v.row) == len(FEATURE_NAMES)


def test_time_features_are_utc() -> None:
    v = Run().one(txn(0, T0 - 10 * HOUR_MS))  # 02:00 UTC on a Monday
    assert (v["hour_of_day"], v["is_night"], v["is_weekend"]) == (2, 1, 0)
    w = Run().one(txn(0, T0 + 5 * DAY_MS))  # Saturday noon
    assert (w["hour_of_day"], w["is_night"], w["is_weekend"]) == (12, 0, 1)


def test_a_late_event_lands_in_its_own_time_and_is_flagged() -> None:
    run = Run(FeatureConfig(allowed_lateness_ms=HOUR_MS))
    run.one(txn(0, T0 - 40 * MINUTE_MS))
    run.one(txn(1, T0))
    late = run.one(txn(2, T0 - 30 * MINUTE_MS, amount=50.0))
    assert late["event_late"] == 1 and late["event_too_late"] == 0
    # As of its own time: the event 40 min before, itself; not the one 30 min later.
    assert late["card_count_1h"] == 2 and late["card_sum_1h"] == 60
    after = run.one(txn(3, T0 + MINUTE_MS))
    assert after["card_count_1h"] == 4 and after["card_count_10m"] == 2
    assert after["event_late"] == 0


def test_an_event_beyond_the_lateness_is_decided_counted_and_flagged() -> None:
    run = Run(FeatureConfig(allowed_lateness_ms=HOUR_MS))
    run.one(txn(0, T0))
    old = run.one(txn(1, T0 - 3 * HOUR_MS, amount=70.0))
    assert old["event_too_late"] == 1 and old["event_late"] == 1
    after = run.one(txn(2, T0 + MINUTE_MS))
    assert after["card_count_24h"] == 3 and after["card_sum_30d"] == 10 + 70 + 10


def test_merchant_fraud_counts_only_labels_already_available() -> None:
    run = Run(FeatureConfig(label_delay_ms=2 * HOUR_MS))
    run.one(txn(0, T0 - 3 * DAY_MS, merchant="shop"))
    label = {"transaction_id": "t0", "card_id": "card_1", "merchant_id": "shop",
             "is_fraud": True, "event_time": T0 - 3 * DAY_MS, "label_time": T0 - 2 * HOUR_MS}
    # The label arrives now, before the transactions below; it is available from T0 on.
    same_day = run.batch([txn(1, T0, merchant="shop", card="card_2")], [label])[0]
    assert same_day["merchant_fraud_count_7d"] == 0  # not before the day after availability
    next_day = run.one(txn(2, T0 + DAY_MS, merchant="shop", card="card_3"))
    assert next_day["merchant_fraud_count_1d"] == 1 and next_day["merchant_fraud_count_30d"] == 1
    # One fraud label over the shop's one transaction of the day before.
    assert next_day["merchant_fraud_rate_1d"] == pytest.approx(1 / 1)
    assert next_day["merchant_count_7d"] == 3


def test_a_label_without_merchant_is_counted_as_unattributed() -> None:
    run = Run()
    out = run.engine.process([], [LabelEvent(0, 0, {"transaction_id": "x", "is_fraud": True,
                                                    "label_time": T0, "merchant_id": None})])
    assert out.labels_unattributed == 1 and out.labels_counted == 0


def test_redelivered_event_is_not_counted_twice() -> None:
    run = Run()
    first = run.engine.process([TxnEvent(0, 5, txn(0, T0))])
    run.store.write(first.writes)
    again = run.engine.process([TxnEvent(0, 5, txn(0, T0))])
    run.store.write(again.writes)
    assert again.replayed == 1 and again.vectors[0]["card_count_1h"] == 1
    run.offset = 6
    assert run.one(txn(1, T0 + 1000))["card_count_1h"] == 2


def test_a_corrupt_record_starts_afresh_and_is_counted() -> None:
    run = Run()
    run.store.data[(0, b"c|card_1")] = b"\x00garbage"
    out = run.engine.process([TxnEvent(0, 0, txn(0, T0))])
    assert out.corrupt == 1 and out.vectors[0]["card_count_1h"] == 1


def test_records_the_batch_cannot_join_as_is_are_read_one_by_one() -> None:
    """A batch's records are joined in one call unless one has a length that is no whole
    number of values or starts like the JSON layout: then each is read on its own, and
    only the bad ones start afresh."""
    run = Run()
    run.one(txn(0, T0, card="card_ok"))
    run.store.data[(0, b"c|card_odd")] = b"\x00" * 9
    run.store.data[(0, b"c|card_json")] = b"[not json"
    out = run.engine.process([TxnEvent(0, 1, txn(1, T0 + 1000, card="card_ok")),
                              TxnEvent(0, 2, txn(2, T0 + 1000, card="card_odd")),
                              TxnEvent(0, 3, txn(3, T0 + 1000, card="card_json"))])
    assert out.corrupt == 2
    assert [v["card_count_1h"] for v in out.vectors] == [2, 1, 1]


def test_a_record_whose_counts_do_not_match_its_length_starts_afresh() -> None:
    run = Run()
    for i in range(3):
        run.one(txn(i, T0 + i * MINUTE_MS))
    data = bytearray(run.store.data[(0, b"c|card_1")])
    data[6 * 8:7 * 8] = struct.pack("<d", 1e6)  # claims a million recent events
    run.store.data[(0, b"c|card_1")] = bytes(data)
    out = run.engine.process([TxnEvent(0, 10, txn(10, T0 + 5 * MINUTE_MS))])
    assert out.corrupt == 1 and out.vectors[0]["card_count_1h"] == 1


def test_records_are_compact_and_readable() -> None:
    run = Run()
    for i in range(30):
        run.one(txn(i, T0 + i * 7 * MINUTE_MS, amount=5.0 + i, lat=1.0, lon=2.0))
    data = run.store.data[(0, b"c|card_1")]
    head, (recent, hours, days, *_seen) = sections(data)
    assert head[0] == CARD_CODE and record_max_ts(data) == T0 + 29 * 7 * MINUTE_MS
    # The last hour's events (and the lateness allowed after it), the hours and the day.
    assert recent[-1].tolist() == [T0 + 29 * 7 * MINUTE_MS, 34.0, 1.0, 2.0]
    assert hours[:, 1].sum() == 30 and days.tolist()[0][:3] == [T0 // DAY_MS, 30.0, 585.0]
    assert len(data) < 4096


def test_a_record_of_the_earlier_json_layout_is_read_and_rewritten() -> None:
    """A store written by the release before keeps its history across the upgrade."""
    run = Run()
    t1, t2 = T0 - 20 * MINUTE_MS, T0 - 10 * MINUTE_MS
    run.store.data[(0, b"c|card_1")] = orjson.dumps([
        1, 7, t2, [t2, 48.8, 2.3], [[t1, 10.0, None, None], [t2, 30.0, 48.8, 2.3]],
        [[t1 // HOUR_MS, 2, 40.0, 30.0]], [[t1 // DAY_MS, 2, 40.0, 30.0, 1000.0]],
        {f"{zlib.crc32(b'm1'):08x}": t2}, {f"{zlib.crc32(b'FR'):08x}": t2}, {}])
    run.offset = 8
    v = run.one(txn(8, T0, amount=20.0))
    assert v["card_count_1h"] == 3 and v["card_sum_1h"] == 60.0
    assert v["card_secs_since_prev"] == 600.0 and v["card_first_merchant"] == 0.0
    assert v["card_distinct_merchants_24h"] == 1.0
    head, _ = sections(run.store.data[(0, b"c|card_1")])
    assert head[0] == CARD_CODE and head[1] == 8


def test_offline_features_do_not_depend_on_batch_size() -> None:
    txns, labels = generate_history(GeneratorConfig(seed=3, n_cards=200, id_prefix="o"),
                                    T0 - 2 * DAY_MS, 2.0, 3000, late_ratio=0.03)
    events = arrival_events(txns, labels)
    config = FeatureConfig(label_delay_ms=0)
    one = [v.row for _t, v in offline_features(events, config, batch_size=1)]
    big = [v.row for _t, v in offline_features(events, config, batch_size=700)]
    assert len(one) == len(txns) == len(big)
    for a, b in zip(one, big, strict=True):  # sums may add up in another order
        assert all(math.isclose(x, y, rel_tol=1e-9, abs_tol=1e-9)
                   for x, y in zip(a, b, strict=True))
    fraud, late = FEATURE_NAMES.index("merchant_fraud_count_1d"), FEATURE_NAMES.index("event_late")
    assert any(r[fraud] for r in one) and any(r[late] for r in one)  # both were exercised


def test_feature_rules_read_the_vector() -> None:
    from fraudstream.scorers.rules import RuleSet, RulesScorer
    from fraudstream.streams.settings import ScoringSettings

    scorer = RulesScorer(RuleSet.load(ScoringSettings().rules_path))
    run = Run()
    events = [txn(i, T0 + i * 1000, mcc="5411", currency="EUR", channel="ecom",
                  card_country="FR") for i in range(8)]
    vectors = run.batch(events)
    scores = scorer.score_batch(events, vectors)
    assert "R501_CARD_VELOCITY_1M" not in scores[4].reasons
    assert "R501_CARD_VELOCITY_1M" in scores[7].reasons


def test_the_kernel_cache_goes_to_the_user_cache_when_the_install_is_read_only(
        monkeypatch, tmp_path) -> None:
    """A worker that cannot write next to its code (a container's site-packages) keeps the
    compiled kernel in its own cache directory, still named by the sources' digest."""
    from fraudstream.state import kernel_cache

    monkeypatch.delenv("NUMBA_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(kernel_cache.os, "access", lambda *_a: False)
    path = Path(kernel_cache.cache_dir())
    assert path.parent == tmp_path / "fraudstream" and path.name.startswith("kernel-")
    assert kernel_cache.aot_path().parent == path
    monkeypatch.setattr(kernel_cache.os, "access", lambda *_a: True)
    assert Path(kernel_cache.cache_dir()).name == path.name  # same sources, same digest


def _run(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, env={**os.environ, **env}, check=False)


def test_a_process_with_the_ahead_of_time_kernel_never_loads_numba() -> None:
    """Workers load the ahead-of-time build: no numba, no LLVM mapped (~130 MB of RSS)."""
    from fraudstream.state.kernel_aot import ensure

    path, how = ensure()
    assert path is not None, how
    run = _run("import sys\n"
               "from fraudstream.state.engine import warm_up\n"
               "from fraudstream.state.kernel_cache import kernel\n"
               "warm_up()\n"
               "maps = open('/proc/self/maps').read()\n"
               "print(kernel()[1], 'numba' in sys.modules, 'llvm' in maps.lower())\n",
               FRAUDSTREAM_FEATURES_KERNEL="aot")
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["aot", "False", "False"]


def test_kernel_choice_is_explicit(tmp_path) -> None:
    """FRAUDSTREAM_FEATURES_KERNEL=aot with no build is an error naming the fix; a bad value is
    refused (the JIT without a build is what tests/test_features_exact.py runs)."""
    empty = {"NUMBA_CACHE_DIR": str(tmp_path)}
    code = "from fraudstream.state.engine import warm_up; warm_up(); print('ok')"
    run = _run(code, FRAUDSTREAM_FEATURES_KERNEL="aot", **empty)
    assert run.returncode != 0 and "python -m fraudstream.state.kernel_aot" in run.stderr
    run = _run(code, FRAUDSTREAM_FEATURES_KERNEL="fast", **empty)
    assert run.returncode != 0 and "expected one of auto, aot, jit" in run.stderr


def test_the_kernel_sees_each_identifier_as_its_token_id() -> None:
    """The engine hashes merchants, countries, devices and cards inline (per event, in
    the hot loop); they must stay the tokens :func:`token_id` gives everywhere else."""
    from fraudstream.state.engine import _Columns
    from fraudstream.state.features import token_id

    with_device = txn(1, T0, card="card-ß", merchant="m-ü", device_id="dev-é")
    without = txn(2, T0 + 1, card="card-2", merchant="m-2")
    cols = _Columns([TxnEvent(0, 0, with_device), TxnEvent(1, 1, without)], [],
                    lambda p: (0, 1), FeatureConfig())
    tokens = cols.event_columns()[6]
    assert tokens.tolist() == [
        [token_id("m-ü"), token_id("FR"), token_id("dev-é"), token_id("card-ß")],
        [token_id("m-2"), token_id("FR"), 0, token_id("card-2")]]
    assert cols.is_card.tolist() == [k[1].startswith(b"c|") for k in cols.slots]
