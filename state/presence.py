"""Which partitions may hold a device's or an IP's partial record.

A device's (an IP's) features add up its partial records over every partition a store can
read (:mod:`fraudstream.state.engine`). A device is seen in the partitions of the few cards
that use it, so most of those partials do not exist, and reading them costs as much as
reading the ones that do: a store read each, a slot in the batch, a pass in the kernel.
With 12 partitions that is 22 reads of nothing per event.

:class:`Presence` answers "which partitions may hold ``key``?" with no false "no": one
64-bit word per hash bucket, bit ``q`` set once partition ``q`` was seen to hold a key of
that bucket. Keys that share a bucket only add partitions to read (a partial that does not
exist reads as empty, as before). A partition whose keys have not all been added yet (not
indexed) counts as holding every key. Bits are never cleared: a record deleted since only
costs a read. Who adds: the feature engine, the partials each batch makes; the worker's
store, what a partition holds when it is assigned; the entity replica, what it holds and
applies.

Merchants are left out: a merchant is seen in nearly every partition, and the order its
partials' amounts are added in must stay the one the offline builder uses. A device's and
an IP's features are counts, which any order adds up exactly.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping
from zlib import crc32

import numpy as np

#: Keys whose partitions are tracked: device and IP partials.
TRACKED = (b"d|", b"i|")
#: Partitions a word can tell apart; with more, no :class:`Presence` is kept.
MAX_PARTITIONS = 64
#: With fewer partitions the index costs more than it saves (per batch, in one process:
#: +2.6% of the feature time at 2 partitions, -2.5% at 3, -7% at 4, -25% at 12).
MIN_PARTITIONS = 3
_ALL = (1 << MAX_PARTITIONS) - 1


class Presence:
    """Which partitions may hold each device or IP key; ``bits`` sets the number of
    buckets (2**bits words of 8 bytes: at most 32 MB at 22)."""

    def __init__(self, partitions: int, bits: int = 22) -> None:
        if not 0 < partitions <= MAX_PARTITIONS:
            raise ValueError(f"Presence tracks 1..{MAX_PARTITIONS} partitions, "
                             f"not {partitions}")
        # Zeroed pages the kernel maps when first written: the index takes memory as it
        # fills (up to 8 << bits bytes), not at once. Items read and write as ints.
        self.words = memoryview(np.zeros(1 << bits, dtype=np.uint64))
        self.mask = (1 << bits) - 1
        #: Partitions not indexed yet (bit set): they may hold any key.
        self.unindexed = _ALL
        # The worker's batches and the replica's thread both add: an |= of one word is
        # a read and a write, and two of them at once could lose a bit.
        self._lock = threading.Lock()

    def add(self, partition: int, keys: Iterable[bytes]) -> None:
        """Partition ``partition`` holds ``keys`` (device and IP keys; others ignored)."""
        words, mask, bit, tracked = self.words, self.mask, 1 << partition, TRACKED
        with self._lock:
            for k in keys:
                if k[:2] in tracked:
                    words[crc32(k) & mask] |= bit

    def add_masks(self, held: Mapping[bytes, int]) -> None:
        """Keys held by more partitions: key -> a bit mask of them. The feature engine
        adds the partials each batch makes (:class:`~fraudstream.state.engine._Columns`)."""
        words, mask = self.words, self.mask
        with self._lock:
            for k, partitions in held.items():
                words[crc32(k) & mask] |= partitions

    def set_indexed(self, partitions: int) -> None:
        """Say which partitions have had every key they hold added (a bit mask); the
        others may hold any key."""
        self.unindexed = _ALL & ~partitions

    def word(self, key: bytes) -> int:
        """A bit mask of the indexed partitions that may hold ``key``."""
        return self.words[crc32(key) & self.mask]

    def holders(self, key: bytes) -> int:
        """A bit mask of the partitions that may hold ``key``."""
        return self.word(key) | self.unindexed
