"""Event-time alignment of the batch topics: the partitions of ``transactions`` a worker
holds, and its ``labels``, are handed to the pipeline in event-time order.

Without it a backlog drains each partition at its own speed: partition 0 may be hours of
event time ahead of partition 3, so a merchant's partials are summed at different event
times, and labels read ahead of the transactions reach the features and the learners
before their time. The features then differ from the offline builder's, and from one run
to the next.

:class:`Aligner` holds the fetched records of each partition and releases them as one
merged sequence: the transaction with the earliest event time next (ties: the lower
partition), each partition keeping its own order (a late event stays where it arrived),
and before it every label whose availability (``label_time`` + the features' label delay)
is not after it. It stops where it could be wrong: when a partition that may still hold
earlier records (assigned, fetching, not known to be at its end) has nothing held. After
``max_wait_s`` with nothing released it releases anyway, so a partition that stays silent
delays the others by at most that much, never stalls them. A record whose time cannot be
read is released at once (the pipeline sends it to the dead letters).

Released records are handed on as runs ``[(partition, [records])]`` in merged order;
records held are not acknowledged, so commits never pass them. The batch consumer stops
fetching a partition that holds :attr:`Aligner.max_held` records (Faust's own
``on_buffer_full``), and fetches it again once half of them are released.
"""

from __future__ import annotations

import heapq
import time
from collections import deque
from collections.abc import Callable, Collection
from typing import Any

from fraudstream.schemas.validate import time_ms

#: (topic, value bytes) -> event time in ms (a label's: when it becomes available), or
#: None when it cannot be read.
TimeOf = Callable[[str, bytes | None], int | None]


class Aligner:
    def __init__(self, transactions: str, labels: str, time_of: TimeOf,
                 max_wait_s: float = 2.0, max_held: int = 20_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.transactions, self.labels = transactions, labels
        self.time_of = time_of
        self.max_wait_s = max_wait_s
        self.max_held = max_held
        self.clock = clock
        #: Partition -> held (event time as a float, -inf when unreadable, record), in
        #: offset order.
        self.held: dict[Any, deque[tuple[float, Any]]] = {}
        #: Since when a silent partition holds the others back (None: it does not).
        self.waiting_since: float | None = None
        #: Times the wait ran out and records were released regardless.
        self.timeouts = 0

    def add(self, tp: Any, records: Collection[Any]) -> None:
        # A record fetched again (a seek back) is held again: the pipeline's dedupe and
        # the learner answer it. Offsets are not a filter here: after an offset reset (a
        # broker that lost its log) new records come with offsets already seen.
        buf = self.held.setdefault(tp, deque())
        time_of, topic = self.time_of, tp.topic
        buf.extend([(_key(time_of(topic, r.value)), r) for r in records])

    def put_back(self, tp: Any, records: Collection[Any]) -> None:
        """Hold ``records`` again, in front of what ``tp`` holds (the handler could not
        take them: they go first at the next release)."""
        buf = self.held.setdefault(tp, deque())
        buf.extendleft(reversed([(_key(self.time_of(tp.topic, r.value)), r) for r in records]))

    def forget(self, keep: Collection[Any] | None = None) -> None:
        """Drop what is held for partitions not in ``keep`` (all: None), after a
        rebalance or a seek: they will be read again from their committed offsets."""
        for tp in list(self.held):
            if keep is None or tp not in keep:
                del self.held[tp]
        if keep is None:
            self.waiting_since = None

    def count(self, tp: Any) -> int:
        buf = self.held.get(tp)
        return len(buf) if buf else 0

    def release(self, pending: Collection[Any]) -> list[tuple[Any, list[Any]]]:
        """The records that can go now, merged. ``pending``: partitions that may still hold
        records not fetched yet (assigned, being fetched, not at their end)."""
        now = self.clock()
        if self.waiting_since is not None and now - self.waiting_since >= self.max_wait_s:
            pending = ()  # waited long enough: what is held goes
            self.timeouts += 1
        out: list[tuple[Any, list[Any]]] = []
        blocked = self._merge(out, set(pending))
        if out or not blocked or not any(self.held.values()):
            # A merge that moves on is not waiting, however often it stops on a partition
            # that ran empty; the wait starts at the first call that releases nothing, so
            # the time spent deciding what was released does not count. (Counting from
            # the first stop released everything held, out of order, after 2 s of steady
            # progress in a backlog.)
            self.waiting_since = None
        elif self.waiting_since is None:
            self.waiting_since = now
        return out

    def _merge(self, out: list[tuple[Any, list[Any]]], pending: set[Any]) -> bool:
        """Append the releasable records to ``out``; True when a partition that may hold
        earlier records, and has nothing held, stopped the merge."""
        held = self.held
        txn_tps = [tp for tp in held if tp.topic == self.transactions]
        label_tps = [tp for tp in held if tp.topic == self.labels]
        txn_pending = {tp for tp in pending if tp.topic == self.transactions}
        label_pending = [tp for tp in pending if tp.topic == self.labels]
        heap = [(held[tp][0][0], tp.partition, tp) for tp in txn_tps if held[tp]]
        heapq.heapify(heap)
        # Whether a pending partition has nothing held: only a release empties one, so
        # this is known from the start and updated where a buffer runs empty.
        txn_blocked = any(not held.get(tp) for tp in txn_pending)
        label_blocked = any(not held.get(tp) for tp in label_pending)
        labels = [(ltp, held[ltp]) for ltp in label_tps]
        while heap:
            if txn_blocked:
                return True  # it may hold a transaction before the next one
            t, _p, tp = heap[0]
            for ltp, buf in labels:
                if buf and buf[0][0] <= t:
                    while buf and buf[0][0] <= t:
                        _append(out, ltp, buf.popleft()[1])
                    if not buf and ltp in label_pending:
                        label_blocked = True
            if label_blocked:
                return True  # it may hold a label due before the next transaction
            heapq.heappop(heap)
            buf = held[tp]
            _append(out, tp, buf.popleft()[1])
            if buf:
                heapq.heappush(heap, (buf[0][0], tp.partition, tp))
            elif tp in txn_pending:
                txn_blocked = True
        if txn_pending:
            return True  # labels wait for the transactions they may be due before
        for ltp, buf in labels:  # no transaction held, none to come: labels go
            while buf:
                _append(out, ltp, buf.popleft()[1])
        return False


def _key(t: int | None) -> float:
    return float("-inf") if t is None else float(t)


def _append(out: list[tuple[Any, list[Any]]], tp: Any, record: Any) -> None:
    if out and out[-1][0] == tp:
        out[-1][1].append(record)
    else:
        out.append((tp, [record]))


def record_times(decode_transaction: Callable[[bytes], dict[str, Any]],
                 decode_label: Callable[[bytes], dict[str, Any]], transactions: str,
                 label_delay_ms: int,
                 peek: Callable[[bytes], int | None] | None = None) -> TimeOf:
    """:data:`TimeOf` for the worker's topics: a transaction's ``event_time``; a label's
    ``label_time`` plus the features' label delay (when it starts to count). ``peek``
    reads a transaction's time without decoding it all, where it can (None: it cannot)."""

    def time_of(topic: str, value: bytes | None) -> int | None:
        if value is None:
            return None
        try:
            if topic == transactions:
                t = peek(value) if peek is not None else None
                if t is not None:
                    return t
                return time_ms(decode_transaction(value))
            return time_ms(decode_label(value), "label_time") + label_delay_ms
        except Exception:  # unreadable: released at once, the pipeline dead-letters it
            return None

    return time_of
