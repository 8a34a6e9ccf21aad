"""Features for a micro-batch: one state read and one write per entity per batch.

:class:`FeatureEngine` is what the worker and the offline builder share. It reads every
record the batch needs in one :meth:`StateStore.read` call, runs the pure functions of
:mod:`fraudstream.state.features` event by event (in the order given: the order the worker received
them), and hands back one :class:`~fraudstream.state.features.Vector` per transaction plus the
changed records for :meth:`StateStore.write`, each encoded once.

Keys: ``c|<card_id>`` (a card lives in its transactions' partition), and per source
partition ``m|<merchant_id>``, ``d|<device_id>``, ``i|<ip>``: partial records, which only
the owner of that partition writes, so workers never race on a key. A merchant's (device's,
IP's) features add up the partials of every partition the store can read
(:meth:`StateStore.readable`).

Delivered twice: each record remembers the highest source offset it applied; an event at
or below it is not counted again (its features are computed from the state that already
holds it).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from fraudstream.state.features import (
    FEATURE_NAMES,
    HOUR_MS,
    CardState,
    EntityState,
    FeatureConfig,
    Vector,
    add_label,
    add_merchant_event,
    add_shared_event,
    degraded_vector,
    event_fields,
    merchant_sums,
    put_merchant_features,
    shared_entity_features,
    token,
    update_card,
)


class StateUnavailable(RuntimeError):
    """The store cannot be read or written right now (e.g. Redis is down)."""


class StateStore(Protocol):
    def readable(self, partition: int) -> Sequence[int]:
        """Partitions whose partial records an event of ``partition`` can read."""

    def read(self, keys: Sequence[tuple[int, bytes]]) -> list[bytes | None]:
        """The records of (partition, key) pairs, aligned; may raise StateUnavailable."""

    def write(self, items: Sequence[tuple[int, bytes, bytes]]) -> None:
        """Queue (partition, key, record) writes; durable after :meth:`flush`."""

    async def flush(self) -> None:
        """Return once every queued write is stored (may raise StateUnavailable)."""


@dataclass(slots=True, frozen=True)
class TxnEvent:
    partition: int
    offset: int
    txn: Mapping[str, Any]


@dataclass(slots=True, frozen=True)
class LabelEvent:
    partition: int
    offset: int
    label: Mapping[str, Any]


@dataclass(slots=True)
class FeatureBatch:
    vectors: list[Vector] = field(default_factory=list)
    #: (partition, key, record) for :meth:`StateStore.write`.
    writes: list[tuple[int, bytes, bytes]] = field(default_factory=list)
    degraded: bool = False
    #: Events delivered again (already in the state), late and too-late events.
    replayed: int = 0
    late: int = 0
    too_late: int = 0
    labels_counted: int = 0
    #: Stored records that could not be read (started afresh, never a crash).
    corrupt: int = 0
    #: Labels that cannot be attributed to a merchant (no merchant_id).
    labels_unattributed: int = 0


_LATE = FEATURE_NAMES.index("event_late")
_TOO_LATE = FEATURE_NAMES.index("event_too_late")


class FeatureEngine:
    def __init__(self, config: FeatureConfig, store: StateStore) -> None:
        self.config = config
        self.store = store

    def process(self, txns: Sequence[TxnEvent],
                labels: Sequence[LabelEvent] = ()) -> FeatureBatch:
        out = FeatureBatch()
        keys = self._keys(txns, labels)
        try:
            raw = self.store.read(keys) if keys else []
        except StateUnavailable:
            out.degraded = True
            out.vectors = [degraded_vector(e.txn) for e in txns]
            return out
        records = dict(zip(keys, raw, strict=True))
        cards: dict[tuple[int, bytes], CardState] = {}
        parts: dict[tuple[int, bytes], EntityState] = {}
        dirty: set[tuple[int, bytes]] = set()

        def load(cls: Any, k: tuple[int, bytes]) -> Any:
            try:
                return cls.decode(records.get(k))
            except (ValueError, TypeError):  # a record we cannot read: start afresh
                out.corrupt += 1
                return cls()

        def entity(k: tuple[int, bytes]) -> EntityState:
            s = parts.get(k)
            if s is None:
                s = parts[k] = load(EntityState, k)
            return s

        def existing(k: tuple[int, bytes]) -> EntityState | None:
            """A partial that exists (in this batch or in the store), else None."""
            s = parts.get(k)
            if s is None and records.get(k) is not None:
                s = entity(k)
            return s

        def group(p: int, key: bytes) -> list[EntityState]:
            return [s for q in readable(p) if (s := existing((q, key))) is not None]

        config = self.config
        for ev in labels:
            mid = ev.label.get("merchant_id")
            if not mid:
                out.labels_unattributed += 1
                continue
            k = (ev.partition, b"m|" + mid.encode())
            s = entity(k)
            if ev.offset <= s.last_label_offset:
                continue
            s.last_label_offset = ev.offset
            dirty.add(k)
            out.labels_counted += add_label(s, ev.label, config)

        n = len(FEATURE_NAMES)
        readable = self.store.readable
        sums: dict[bytes, tuple[int, list[float]]] = {}
        for ev in txns:
            txn, p = ev.txn, ev.partition
            ck = (p, b"c|" + txn["card_id"].encode())
            card = cards.get(ck)
            if card is None:
                card = cards[ck] = load(CardState, ck)
            v = [0.0] * n
            event_fields(v, txn)
            fresh = ev.offset > card.last_offset
            if fresh:
                update_card(card, txn, v, config)
                card.last_offset = ev.offset
                dirty.add(ck)
            else:
                out.replayed += 1
                update_card(card, txn, v, config, add=False)
            out.late += v[_LATE] == 1.0
            out.too_late += v[_TOO_LATE] == 1.0
            card_tok = token(txn["card_id"])
            for prefix, fkey, name in _ENTITIES:
                value = txn.get(fkey)
                if not value:
                    continue
                key = prefix + value.encode()
                own = entity((p, key))
                added = fresh and ev.offset > own.last_offset
                if added:
                    if name == "merchant":
                        add_merchant_event(own, txn, config)
                    else:
                        add_shared_event(own, txn, card_tok, config)
                    own.last_offset = ev.offset
                    dirty.add((p, key))
                if name == "merchant":
                    # A merchant's sums change by this event only while the batch stays in
                    # one hour: scan its buckets once per hour, then add the events.
                    t = txn["event_time"]
                    hour = t // HOUR_MS
                    cached = sums.get(key)
                    if cached is not None and cached[0] == hour:
                        agg = cached[1]
                        if added:
                            amount = float(txn["amount_ref"])
                            agg[0] += 1.0
                            agg[1] += amount
                            agg[2] += 1.0
                            agg[3] += amount
                            agg[4] += 1.0
                            agg[5] += amount
                    else:
                        agg = merchant_sums(group(p, key), t)
                        sums[key] = (hour, agg)
                    put_merchant_features(agg, v)
                else:
                    shared_entity_features(group(p, key), txn["event_time"], name, v, config)
            out.vectors.append(Vector(v))

        for k in dirty:
            state = cards.get(k) or parts[k]
            out.writes.append((k[0], k[1], state.encode(config)))
        return out

    def _keys(self, txns: Sequence[TxnEvent], labels: Sequence[LabelEvent]
              ) -> list[tuple[int, bytes]]:
        seen: dict[tuple[int, bytes], None] = {}
        readable = self.store.readable
        for ev in labels:
            mid = ev.label.get("merchant_id")
            if mid:
                seen[(ev.partition, b"m|" + mid.encode())] = None
        for ev in txns:
            txn = ev.txn
            seen[(ev.partition, b"c|" + txn["card_id"].encode())] = None
            for prefix, fkey, _name in _ENTITIES:
                value = txn.get(fkey)
                if value:
                    key = prefix + value.encode()
                    for q in readable(ev.partition):
                        seen[(q, key)] = None
        return list(seen)


_ENTITIES = ((b"m|", "merchant_id", "merchant"), (b"d|", "device_id", "device"),
             (b"i|", "ip", "ip"))


class MemoryStore:
    """A dict store: the offline builder's, and the reference for the contract tests."""

    def __init__(self, partitions: int = 1) -> None:
        self.partitions = partitions
        self.data: dict[tuple[int, bytes], bytes] = {}
        self._pending: list[tuple[int, bytes, bytes]] = []

    def readable(self, partition: int) -> Sequence[int]:
        return range(self.partitions)

    def read(self, keys: Sequence[tuple[int, bytes]]) -> list[bytes | None]:
        get = self.data.get
        return [get(k) for k in keys]

    def write(self, items: Sequence[tuple[int, bytes, bytes]]) -> None:
        for p, k, v in items:
            self.data[(p, k)] = v

    async def flush(self) -> None:
        return None
