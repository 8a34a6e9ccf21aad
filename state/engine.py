"""Features for a micro-batch: one state read and one write per entity per batch.

:class:`FeatureEngine` is what the worker and the offline builder share. It reads every
record the batch needs in one :meth:`StateStore.read` call, turns the batch into columns
and runs the compiled kernel (:mod:`fraudstream.state.kernel`, loaded as
:mod:`fraudstream.state.kernel_cache` chooses) over it once, event by event
in the order given (the order the worker received them). It hands back the feature matrix,
one :class:`~fraudstream.state.features.Vector` per transaction, and the changed records
for :meth:`StateStore.write`, each encoded once.

Keys: ``c|<card_id>`` (a card lives in its transactions' partition), and per source
partition ``m|<merchant_id>``, ``d|<device_id>``, ``i|<ip>``: partial records, which only
the owner of that partition writes, so workers never race on a key. A merchant's (device's,
IP's) features add up the partials of every partition the store can read
(:meth:`StateStore.readable`). A store with a ``presence`` attribute
(:class:`~fraudstream.state.presence.Presence`) says which of them may hold a device's or
an IP's partial; the others are not read.

Delivered twice: each record remembers the highest source offset it applied; an event at
or below it is not counted again (its features are computed from the state that already
holds it).
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import chain
from typing import Any, Protocol

import numpy as np

from fraudstream.state.features import (
    DAY_MS,
    FeatureConfig,
    Vector,
    degraded_vector,
)
from fraudstream.state.kernel_cache import kernel
from fraudstream.state.presence import Presence
from fraudstream.state.records import LEGACY_MARK, from_legacy, is_legacy


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


# Not frozen: a frozen dataclass is built through object.__setattr__, ~4x the cost
# (one per transaction, on the hot path). Treat them as read-only.
@dataclass(slots=True)
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
    #: The features as a (transactions x features) float64 matrix (None: degraded).
    matrix: np.ndarray | None = None
    #: Degraded vectors, or those built from ``matrix`` on first read (see :attr:`vectors`).
    _vectors: list[Vector] | None = None
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

    @property
    def vectors(self) -> list[Vector]:
        """One :class:`Vector` per transaction, readable by feature name. Built from the
        matrix when first asked for: the offline builder only needs the matrix."""
        if self._vectors is None:
            self._vectors = ([] if self.matrix is None
                             else [Vector(row) for row in self.matrix.tolist()])
        return self._vectors


class FeatureEngine:
    def __init__(self, config: FeatureConfig, store: StateStore) -> None:
        self.config = config
        self.store = store

    def process(self, txns: Sequence[TxnEvent],
                labels: Sequence[LabelEvent] = ()) -> FeatureBatch:
        out = FeatureBatch()
        cols = _Columns(txns, labels, self.store.readable, self.config,
                        getattr(self.store, "presence", None))
        out.labels_unattributed = cols.labels_unattributed
        keys = list(cols.slots)
        try:
            raw = self.store.read(keys) if keys else []
        except StateUnavailable:
            out.degraded = True
            out._vectors = [degraded_vector(e.txn) for e in txns]
            return out
        inbuf, start, length = _concat(raw, cols.is_card)
        run_batch, _ = kernel()
        X, dirty, buf, out_start, out_len, counters = run_batch(
            inbuf, start, length, cols.is_card, *cols.label_columns(), *cols.event_columns(),
            self.config.allowed_lateness_ms)
        out.matrix = X
        (out.replayed, out.late, out.too_late, out.labels_counted,
         out.corrupt) = (int(c) for c in counters)
        data = buf.tobytes()
        begin = out_start[dirty] * 8
        out.writes = [(*keys[s], data[a:e])
                      for s, a, e in zip(np.flatnonzero(dirty).tolist(), begin.tolist(),
                                         (begin + out_len[dirty] * 8).tolist(), strict=True)]
        return out


class _Columns:
    """A batch as the kernel takes it: one slot per stored record the batch reads (a card,
    or one partition's partial of a merchant, device or IP), events and labels as columns
    of numbers."""

    def __init__(self, txns: Sequence[TxnEvent], labels: Sequence[LabelEvent],
                 readable: Any, config: FeatureConfig, presence: Presence | None = None,
                 ) -> None:
        slots: dict[tuple[int, bytes], int] = {}
        self.slots = slots
        slot = slots.setdefault  # slot(key, len(slots)): the key's slot, made if new
        self.labels_unattributed = 0
        lab: list[tuple[int, int, int, int]] = []
        delay = config.label_delay_ms
        for ev in labels:
            mid = ev.label.get("merchant_id")
            if not mid:
                self.labels_unattributed += 1
                continue
            label = ev.label
            lab.append((slot((ev.partition, b"m|" + mid.encode()), len(slots)), ev.offset,
                        1 if label["is_fraud"] else 0, (label["label_time"] + delay) // DAY_MS))
        self._labels = lab
        n = len(txns)
        # Plain lists, made arrays once: a numpy item assignment costs more than an append.
        own: list[int] = []  # 3 per event: its own partial of merchant, device, IP (-1: none)
        grp: list[int] = []  # 3 per event: the group of partials it reads (0 when none)
        card: list[int] = []
        mkey: list[int] = []
        tokens: list[int] = []  # 4 per event: merchant, country, device, card
        # A group: the partials of one key over the partitions an event can read. Events of
        # partitions that read the same ones share it (with a replica, or when this worker
        # owns them all: every partition does).
        # partition -> (which of ``readable_sets`` it reads, those partitions, its own
        # position in them or -1)
        views: dict[int, tuple[int, tuple[int, ...], int]] = {}
        readable_sets: dict[tuple[int, ...], int] = {}
        groups: dict[tuple[int, bytes], int] = {}
        members: list[list[int]] = []  # per group, its partials' slots
        # A device's or IP's group holds only the partitions that may have its partial
        # (``presence``), and the partials the batch's own events write, added as they
        # come (their counts add up in any order).
        # Presence.word, inlined: a bucket's word, the partitions indexed that may hold it
        words, wmask = (presence.words, presence.mask) if presence is not None else (None, 0)
        unindexed = presence.unindexed if presence is not None else 0
        held_at_start: dict[bytes, int] = {}
        written: dict[bytes, int] = {}  # key -> partitions whose partial the batch makes
        key_groups: dict[bytes, list[tuple[int, tuple[int, ...]]]] = {}
        merchants: dict[bytes, int] = {}
        crc32 = zlib.crc32  # features.token_id, inlined (4 per event; a test holds them equal)
        # An event's tokens and its partials seen before in the batch are looked up by the
        # field's text, with no key built: str -> token; per partition, one dict per
        # entity of text -> (its group, its own slot, the merchant's index or 0).
        token: dict[str, int] = {}
        seen: dict[int, tuple[dict[str, tuple[int, int, int]], ...]] = {}
        txs = [ev.txn for ev in txns]
        for ev in txns:
            txn, p = ev.txn, ev.partition
            cid = txn["card_id"].encode()
            ck = (p, b"c|" + cid)
            s = slots.get(ck)
            if s is None:
                s = slots[ck] = len(slots)
            card.append(s)
            mid, country, device = txn["merchant_id"], txn["country"], txn.get("device_id")
            t_m = token.get(mid)
            if t_m is None:
                t_m = token[mid] = crc32(mid.encode())
            t_c = token.get(country)
            if t_c is None:
                t_c = token[country] = crc32(country.encode())
            if device:
                t_d = token.get(device)
                if t_d is None:
                    t_d = token[device] = crc32(device.encode())
            else:
                t_d = 0
            tokens += (t_m, t_c, t_d, crc32(cid))
            by_entity = seen.get(p)
            if by_entity is None:
                by_entity = seen[p] = ({}, {}, {})
            m_key = 0
            for (prefix, fkey), known in zip(_ENTITIES, by_entity, strict=True):
                value = txn.get(fkey)
                if not value:
                    own.append(-1)
                    grp.append(0)
                    continue
                hit = known.get(value)
                if hit is None:
                    key = prefix + value.encode()
                    view = views.get(p)
                    if view is None:
                        parts = tuple(readable(p))
                        view = views[p] = (readable_sets.setdefault(parts, len(readable_sets)),
                                           parts, parts.index(p) if p in parts else -1)
                    g = groups.get((view[0], key))
                    if words is None or prefix == b"m|":
                        held = -1
                    else:  # read once per batch: the replica's thread may add bits
                        added = held_at_start.get(key)
                        if added is None:
                            added = held_at_start[key] = words[crc32(key) & wmask]
                        added |= written.get(key, 0)
                        held = added | unindexed
                    if g is None:
                        g = groups[(view[0], key)] = len(members)
                        group = []
                        for q in view[1]:
                            if held >> q & 1:
                                qk = (q, key)
                                s = slots.get(qk)
                                if s is None:
                                    s = slots[qk] = len(slots)
                                group.append(s)
                        members.append(group)
                        if held != -1:
                            key_groups.setdefault(key, []).append((g, view[1]))
                    if held == -1:
                        # the group has every readable partition's partial
                        s = members[g][view[2]] if view[2] >= 0 else slot((p, key), len(slots))
                    else:
                        s = slot((p, key), len(slots))
                        if not added >> p & 1:  # a partial the store may not hold yet
                            written[key] = written.get(key, 0) | 1 << p
                            if not unindexed >> p & 1:
                                # Groups of the key made so far left it out: every one
                                # that reads this partition reads it, from this event on.
                                for g2, parts in key_groups[key]:
                                    if p in parts and s not in members[g2]:
                                        members[g2].append(s)
                    hit = known[value] = (
                        g, s, merchants.setdefault(key, len(merchants)) if prefix == b"m|" else 0)
                grp.append(hit[0])
                own.append(hit[1])
                if prefix == b"m|":
                    m_key = hit[2]
            mkey.append(m_key)
        if written:  # the next batches read the partials this one makes
            presence.add_masks(written)  # type: ignore[union-attr]
        ptr = np.zeros(len(members) + 1, dtype=np.int64)
        np.cumsum([len(m) for m in members], out=ptr[1:])
        cards = np.array(card, dtype=np.int64)
        self.is_card = np.zeros(len(slots), dtype=np.bool_)
        self.is_card[cards] = True
        # Validated events have both coordinates or neither, finite: None becomes NaN.
        lat = np.array([t.get("lat") for t in txs], dtype=np.float64)
        lon = np.array([t.get("lon") for t in txs], dtype=np.float64)
        self._events = (np.array([t["event_time"] for t in txs], dtype=np.int64),
                        np.array([t["amount_ref"] for t in txs], dtype=np.float64),
                        lat, lon,
                        np.array([ev.offset for ev in txns], dtype=np.int64), cards,
                        np.array(tokens, dtype=np.float64).reshape(n, 4),
                        np.array(own, dtype=np.int64).reshape(n, 3),
                        np.array(grp, dtype=np.int64).reshape(n, 3),
                        np.array(mkey, dtype=np.int64),
                        len(merchants), ptr,
                        np.fromiter(chain.from_iterable(members), dtype=np.int64,
                                    count=int(ptr[-1])))

    def label_columns(self) -> tuple[np.ndarray, ...]:
        a = np.array(self._labels, dtype=np.int64).reshape(-1, 4)
        return (np.ascontiguousarray(a[:, 0]), np.ascontiguousarray(a[:, 1]),
                np.ascontiguousarray(a[:, 2]), np.ascontiguousarray(a[:, 3]))

    def event_columns(self) -> tuple[Any, ...]:
        return self._events


def _concat(raw: Sequence[bytes | None], is_card: np.ndarray
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The stored records as one float64 buffer, with each one's start and length (in
    values; 0: none, -1: unreadable). Records of the earlier JSON layout are converted."""
    sizes = np.array([len(r) if r else 0 for r in raw], dtype=np.int64)
    if (sizes & 7).any() or any(r[0] == _LEGACY for r in raw if r):  # is_legacy, inlined
        return _concat_each(raw, is_card)
    length = sizes >> 3
    start = np.cumsum(length) - length
    start[length == 0] = 0
    return np.frombuffer(b"".join(filter(None, raw)), dtype="<f8"), start, length


_LEGACY = LEGACY_MARK[0]


def _concat_each(raw: Sequence[bytes | None], is_card: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`_concat`, one record at a time: for a batch with records to convert, or
    unreadable ones."""
    parts: list[bytes] = []
    start = np.zeros(len(raw), dtype=np.int64)
    length = np.zeros(len(raw), dtype=np.int64)
    pos = 0
    for i, r in enumerate(raw):
        if not r:
            continue
        if is_legacy(r):
            try:
                r = from_legacy(r, bool(is_card[i]))
            except (ValueError, TypeError):
                length[i] = -1
                continue
        if len(r) & 7:
            length[i] = -1
            continue
        parts.append(r)
        start[i] = pos
        length[i] = len(r) >> 3
        pos += length[i]
    return np.frombuffer(b"".join(parts), dtype="<f8"), start, length


_ENTITIES = ((b"m|", "merchant_id"), (b"d|", "device_id"), (b"i|", "ip"))
_EMPTY: Mapping[bytes, bytes] = {}


class Records:
    """``(partition, key) -> record``, kept as one dict of bytes keys per partition.

    A dict whose keys and values are all bytes is never tracked by the garbage collector.
    Keyed by ``(partition, key)`` tuples it was: every full collection walked it whole,
    untracked it, and the next new key tracked it again, so a collection cost grew with
    the state (in a replay of 1M transactions, from 3 to 11 us per record)."""

    __slots__ = ("parts",)

    def __init__(self) -> None:
        self.parts: dict[int, dict[bytes, bytes]] = {}

    def __getitem__(self, pk: tuple[int, bytes]) -> bytes:
        return self.parts[pk[0]][pk[1]]

    def __setitem__(self, pk: tuple[int, bytes], value: bytes) -> None:
        part = self.parts.get(pk[0])
        if part is None:
            part = self.parts[pk[0]] = {}
        part[pk[1]] = value

    def __contains__(self, pk: object) -> bool:
        if not isinstance(pk, tuple) or len(pk) != 2:
            return False
        part = self.parts.get(pk[0])
        return part is not None and pk[1] in part

    def __len__(self) -> int:
        return sum(map(len, self.parts.values()))

    def get(self, pk: tuple[int, bytes], default: bytes | None = None) -> bytes | None:
        part = self.parts.get(pk[0])
        return default if part is None else part.get(pk[1], default)

    def __iter__(self) -> Iterator[tuple[int, bytes]]:
        for p, part in self.parts.items():
            for k in part:
                yield p, k

    def items(self) -> Iterator[tuple[tuple[int, bytes], bytes]]:
        for p, part in self.parts.items():
            for k, v in part.items():
                yield (p, k), v


class MemoryStore:
    """A dict store: the offline builder's and the replay's, and the reference for the
    contract tests."""

    def __init__(self, partitions: int = 1) -> None:
        self.partitions = partitions
        self.data = Records()
        self._pending: list[tuple[int, bytes, bytes]] = []

    def readable(self, partition: int) -> Sequence[int]:
        return range(self.partitions)

    def read(self, keys: Sequence[tuple[int, bytes]]) -> list[bytes | None]:
        parts, none = self.data.parts, _EMPTY
        return [parts.get(p, none).get(k) for p, k in keys]

    def write(self, items: Sequence[tuple[int, bytes, bytes]]) -> None:
        parts = self.data.parts
        for p, k, v in items:
            part = parts.get(p)
            if part is None:
                part = parts[p] = {}
            part[k] = v

    async def flush(self) -> None:
        return None


def warm_up(config: FeatureConfig | None = None) -> float:
    """Load the feature kernel (or compile it, see :mod:`fraudstream.state.kernel_cache`)
    and run it on one made-up event, so a worker's first live batch does not pay for it;
    returns the seconds it took."""
    import time

    t0 = time.perf_counter()
    txn = {"card_id": "warm-up", "event_time": 0, "amount_ref": 1.0, "merchant_id": "m",
           "country": "ZZ", "device_id": "d", "ip": "0.0.0.0", "lat": 0.0, "lon": 0.0}
    label = {"merchant_id": "m", "is_fraud": True, "label_time": 0}
    FeatureEngine(config or FeatureConfig(), MemoryStore()).process(
        [TxnEvent(0, 0, txn)], [LabelEvent(0, 0, label)])
    return time.perf_counter() - t0
