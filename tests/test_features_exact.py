"""The feature engine's output is pinned bit for bit: a generated history (several
partitions, batches of varying sizes, labels, redeliveries, late and too-late events) is
run through the engine, and the digest of every vector (the float64 bits), of every
batch's counters and of the set of keys each batch writes is compared with the digest the
engine gave before it kept state resident across batches (computed then, with the same
code as :func:`run_digest`, and stored here).

Any change to the feature values, however small, changes the digest. A deliberate change
of the features is a new :data:`~fraudstream.state.features.FEATURE_VERSION` and new
digests here."""

from __future__ import annotations

import hashlib
import random
import struct
import zlib
from collections.abc import Sequence
from typing import Any

import pytest

from fraudstream.state import engine as engine_module
from fraudstream.state.engine import FeatureBatch, FeatureEngine, LabelEvent, MemoryStore, TxnEvent
from fraudstream.state.features import HOUR_MS, MAX_RECENT, MAX_SEEN, FeatureConfig
from fraudstream.state.offline import offline_features
from fraudstream.state.presence import Presence
from fraudstream.state.records import sections
from fraudstream.streams.traffic.generator import arrival_events, generate_history
from fraudstream.streams.traffic.world import GeneratorConfig
from tests.conftest import DAY_MS, T0_MS

PARTITIONS = 4
CONFIG = FeatureConfig(allowed_lateness_ms=HOUR_MS, label_delay_ms=6 * HOUR_MS)

#: Digests of the engine before resident state (see the module docstring).
EXPECTED_VECTORS = "b4f950b6b968a146382835079fc37b5d8d454ffb27c791c60f31ec18b908f231"
EXPECTED_COUNTERS = "f430c2eb4ff05eb8c2cb5b57ff02c7b81e2f0cdf8eba36b7f3316cc019abf683"
EXPECTED_WRITTEN_KEYS = "740bc39cd7740e45ce9354694548bf06438a7537e680c6855d915074f4485cde"
EXPECTED_OFFLINE = "0cff57f2725d61b753814ed430a6a15f1a6eca4950560af046f8449961275b1e"

_EVENTS: list[tuple[str, dict[str, Any]]] = []


@pytest.fixture(params=["aot", "jit"])
def kernel_build(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Both builds of the kernel (see :mod:`fraudstream.state.kernel_cache`) give the
    pinned bits: the ahead-of-time one workers load, and the JIT they fall back to."""
    if request.param == "aot":
        from fraudstream.state.kernel_aot import ensure
        from fraudstream.state.kernel_cache import load_aot

        path, how = ensure()
        assert path is not None, f"the ahead-of-time kernel could not be built: {how}"
        run_batch = load_aot()
    else:
        from fraudstream.state.kernel import run_batch
    monkeypatch.setattr(engine_module, "kernel", lambda: (run_batch, request.param))
    return str(request.param)


def history() -> list[tuple[str, dict[str, Any]]]:
    """~8 days of 700 transactions a day over 150 cards and 100 merchants, 5% arriving up
    to 3 h late (beyond the 1 h lateness: too late), labels at their label_time."""
    if not _EVENTS:
        txns, labels = generate_history(
            GeneratorConfig(seed=11, n_cards=150, n_merchants=100, fraud_rate=0.04,
                            genuine_label_rate=0.2, label_delay_days=1.0,
                            label_delay_spread_days=0.5, id_prefix="exact"),
            T0_MS - 10 * DAY_MS, 8.0, 700, late_ratio=0.05, late_max_ms=3 * HOUR_MS)
        _EVENTS.extend(arrival_events(txns, labels))
    return _EVENTS


def batches() -> list[tuple[list[TxnEvent], list[LabelEvent]]]:
    """The history as micro-batches of 1 to 400 transactions across the partitions (by
    card), with per-partition offsets; 2% of events delivered again in the same batch, and
    now and then a whole earlier batch delivered again (a replay after a crash)."""
    rng = random.Random(5)
    offsets = [0] * PARTITIONS
    out: list[tuple[list[TxnEvent], list[LabelEvent]]] = []
    txns: list[TxnEvent] = []
    labels: list[LabelEvent] = []
    size = 50
    for kind, record in history():
        p = zlib.crc32(record["card_id"].encode()) % PARTITIONS
        offset = offsets[p]
        offsets[p] += 1
        if kind == "label":
            labels.append(LabelEvent(p, offset, record))
            if rng.random() < 0.05:
                labels.append(labels[-1])
            continue
        txns.append(TxnEvent(p, offset, record))
        if rng.random() < 0.02:
            txns.append(txns[-1])
        if len(txns) >= size:
            out.append((txns, labels))
            if rng.random() < 0.03:
                out.append((list(txns), list(labels)))
            txns, labels = [], []
            size = rng.choice((1, 2, 7, 50, 120, 400))
    out.append((txns, labels))
    return out


def digests(results: list[FeatureBatch]) -> tuple[str, str, str]:
    vectors, counters, keys = hashlib.sha256(), hashlib.sha256(), hashlib.sha256()
    for b in results:
        for v in b.vectors:
            vectors.update(struct.pack(f"{len(v.row)}d", *v.row))
        counters.update(repr((len(b.vectors), b.degraded, b.replayed, b.late, b.too_late,
                              b.labels_counted, b.corrupt, b.labels_unattributed)).encode())
        keys.update(repr(sorted((p, k) for p, k, _v in b.writes)).encode())
    return vectors.hexdigest(), counters.hexdigest(), keys.hexdigest()


def run_digest(store: Any, **engine_args: Any) -> tuple[str, str, str]:
    engine = FeatureEngine(CONFIG, store, **engine_args)
    results = []
    for txns, labels in batches():
        b = engine.process(txns, labels)
        store.write(b.writes)
        results.append(b)
    return digests(results)


def offline_digest() -> str:
    h = hashlib.sha256()
    for _t, v in offline_features(history(), CONFIG, batch_size=97):
        h.update(struct.pack(f"{len(v.row)}d", *v.row))
    return h.hexdigest()


def test_the_history_exercises_every_path() -> None:
    engine = FeatureEngine(CONFIG, MemoryStore(PARTITIONS))
    results = [engine.process(t, lab) for t, lab in batches()]
    total = {name: sum(getattr(b, name) for b in results)
             for name in ("replayed", "late", "too_late", "labels_counted")}
    assert all(total.values()), total
    assert len(results) > 50


@pytest.mark.parametrize("engine_args", [{}], ids=["default"])
def test_vectors_counters_and_writes_are_unchanged(engine_args: dict[str, Any],
                                                   kernel_build: str) -> None:
    got = run_digest(MemoryStore(PARTITIONS), **engine_args)
    assert got == (EXPECTED_VECTORS, EXPECTED_COUNTERS, EXPECTED_WRITTEN_KEYS)


def test_offline_vectors_are_unchanged(kernel_build: str) -> None:
    assert offline_digest() == EXPECTED_OFFLINE


# ----------------------------------------------------------------------------- edge paths

#: Digests of the edge-path history below; computed with the Python engine of release
#: 5f06d45 (JSON records) and with the compiled kernel, which agree bit for bit.
EXPECTED_EDGE = "cf52f55f5289365db50111e07199ffa9aac7591ebd249c26e9aa35f89c663c87"


def edge_history(seed: int = 0) -> list[tuple[str, dict[str, Any]]]:
    """Paths the generated history does not reach: seen-sets past their size (400
    merchants and 300 countries for 40 cards), card-testing bursts past MAX_RECENT within
    the hour, three devices and two IPs shared by every card, locations anywhere on Earth,
    events up to 3 h late, labels with and without a merchant."""
    rng = random.Random(seed)
    out: list[tuple[str, dict[str, Any]]] = []
    t = T0_MS - 20 * DAY_MS
    for i in range(12_000):
        if 3000 <= i < 3700 or 9000 <= i < 9600:  # card testing: 700 and 600 in minutes
            card = "burst"
            t += rng.randrange(0, 3000)
        else:
            card = f"c{rng.randrange(40)}"
            t += rng.randrange(0, 600_000)
        ts = t - (rng.randrange(0, 3 * HOUR_MS) if rng.random() < 0.05 else 0)
        merchant = f"m{rng.randrange(400)}"
        lat = rng.uniform(-60, 60) if rng.random() < 0.6 else None
        lon = rng.uniform(-170, 170) if lat is not None or rng.random() < 0.5 else None
        out.append(("transaction", {
            "transaction_id": f"e{i}", "event_time": ts, "card_id": card,
            "merchant_id": merchant, "amount_ref": round(rng.uniform(0.5, 900), 2),
            "country": f"C{rng.randrange(300)}",
            "device_id": f"d{rng.randrange(3)}" if rng.random() < 0.8 else None,
            "ip": f"10.0.0.{rng.randrange(2)}" if rng.random() < 0.7 else "",
            "lat": lat, "lon": lon}))
        if rng.random() < 0.05:
            out.append(("label", {"merchant_id": merchant if rng.random() < 0.9 else None,
                                  "is_fraud": rng.random() < 0.5,
                                  "label_time": ts + rng.randrange(0, DAY_MS)}))
    return out


def test_edge_paths_are_unchanged(kernel_build: str) -> None:
    rng = random.Random(1)
    store = MemoryStore(3)
    engine = FeatureEngine(CONFIG, store)
    offsets = [0, 0, 0]
    results: list[FeatureBatch] = []
    txns: list[TxnEvent] = []
    labels: list[LabelEvent] = []
    widest = {"recent": 0, "merchants": 0}
    for kind, record in edge_history():
        p = len(record.get("card_id") or "x") % 3
        offset = offsets[p]
        offsets[p] += 1
        if kind == "label":
            labels.append(LabelEvent(p, offset, record))
        else:
            txns.append(TxnEvent(p, offset, record))
            if rng.random() < 0.03:
                txns.append(txns[-1])
        if len(txns) >= 64:
            b = engine.process(txns, labels)
            store.write(b.writes)
            results.append(b)
            txns, labels = [], []
            for (_p, key), data in store.data.items():
                if key.startswith(b"c|"):
                    _head, (recent, _h, _d, merchants, *_rest) = sections(data)
                    widest["recent"] = max(widest["recent"], len(recent))
                    widest["merchants"] = max(widest["merchants"], len(merchants))
    results.append(engine.process(txns, labels))
    assert widest == {"recent": MAX_RECENT, "merchants": MAX_SEEN}  # both limits reached
    h = hashlib.sha256()
    for part in digests(results):
        h.update(part.encode())
    assert h.hexdigest() == EXPECTED_EDGE


class _PresenceStore(MemoryStore):
    """A memory store that tells the engine which partitions hold each device and IP
    (:mod:`fraudstream.state.presence`), as the worker's RocksDB store does, and reads as
    a worker owning ``owned`` does (an event of another partition reads its own too). It
    starts empty, and the engine adds the partials it makes."""

    def __init__(self, partitions: int, bits: int | None, owned: tuple[int, ...] = ()
                 ) -> None:
        super().__init__(partitions)
        self.presence = None if bits is None else Presence(partitions, bits)
        if self.presence is not None:
            self.presence.set_indexed((1 << partitions) - 1)  # it starts empty
        self.owned = owned
        self.reads = 0

    def readable(self, partition: int) -> Sequence[int]:
        if not self.owned:
            return range(self.partitions)
        return self.owned if partition in self.owned else (partition, *self.owned)

    def read(self, keys: Sequence[tuple[int, bytes]]) -> list[bytes | None]:
        self.reads += len(keys)
        return super().read(keys)



@pytest.mark.parametrize("bits", [22, 3], ids=["few-collisions", "every-bucket-shared"])
def test_reading_only_the_partitions_that_hold_a_device_or_ip_changes_no_bit(
        bits: int, kernel_build: str) -> None:
    """Reading a device's and an IP's partials only from the partitions that may hold one
    gives the pinned bits, with far fewer reads; keys that share a bucket only add reads."""
    every = _PresenceStore(PARTITIONS, None)
    assert run_digest(every) == (EXPECTED_VECTORS, EXPECTED_COUNTERS, EXPECTED_WRITTEN_KEYS)
    held = _PresenceStore(PARTITIONS, bits)
    assert run_digest(held) == (EXPECTED_VECTORS, EXPECTED_COUNTERS, EXPECTED_WRITTEN_KEYS)
    assert (held.reads < every.reads * 0.8) if bits == 22 else held.reads <= every.reads


def test_partial_ownership_with_presence_gives_the_same_bits(kernel_build: str) -> None:
    """A worker owning some partitions (an event of another partition reads its own partial
    and the owned ones') gets the same features with the presence index as without it."""
    without = run_digest(_PresenceStore(PARTITIONS, None, owned=(1, 2)))
    assert run_digest(_PresenceStore(PARTITIONS, 22, owned=(1, 2))) == without
    assert without[0] != EXPECTED_VECTORS  # it does read fewer partitions than all
