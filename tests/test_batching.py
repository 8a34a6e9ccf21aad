"""The batch consumer hands the handler whole fetches and acknowledges what it took; what
it hands back (labels the state store could not take) comes again first, in offset order,
and is never acknowledged before it is taken."""

from __future__ import annotations

import asyncio
from collections import namedtuple
from typing import Any

from faust.transport import consumer as faust_consumer

from fraudstream.streams.worker.align import Aligner
from fraudstream.streams.worker.batching import BatchConsumer

TP = namedtuple("TP", "topic partition")
Rec = namedtuple("Rec", "topic value offset")
T0, T1, L0 = TP("transactions", 0), TP("transactions", 1), TP("labels", 0)


def records(tp: TP, *offsets: int) -> list[Rec]:
    return [Rec(tp.topic, b"", o) for o in offsets]


def timed(tp: TP, *offset_and_time: tuple[int, int]) -> list[Rec]:
    """Records whose value is their event time."""
    return [Rec(tp.topic, str(t).encode(), o) for o, t in offset_and_time]


class Consumer(BatchConsumer):
    """The batch consumer over fetches given in advance; acknowledgements are recorded."""

    flow_active = True
    should_stop = False

    def __init__(self, fetches: list[dict[TP, list[Rec]]], batch_max: int) -> None:
        self.fetches = iter(fetches)
        self.batch_max = batch_max
        self.batch_topics = frozenset({"transactions", "labels"})
        self._buffered_partitions: set[TP] = set()
        self.acked: list[tuple[TP, int, int]] = []

    async def _wait_next_records(self, timeout: float) -> tuple[Any, Any]:
        return next(self.fetches), None

    def assignment(self) -> set[TP]:
        return {T0, L0}

    def _ack_range(self, tp: TP, first: int, last: int) -> None:
        self.acked.append((tp, first, last))


def run(consumer: Consumer, fetches: int) -> None:
    async def go() -> None:
        for _ in range(fetches):
            async for _ in consumer.getmany(0.0):
                pass

    asyncio.run(go())


def test_labels_handed_back_come_again_first_and_are_acknowledged_only_once_taken():
    seen: list[tuple[str, list[int]]] = []
    store_up = iter([True, False, True, True, True])  # the 2nd batch finds the store down

    async def handler(batch: Any, _arrived: float) -> set[TP] | None:
        seen.extend((tp.topic, [r.offset for r in recs]) for tp, recs in batch)
        up = next(store_up)
        return None if up else {tp for tp, _ in batch if tp.topic == "labels"}

    consumer = Consumer([{T0: records(T0, 0, 1), L0: records(L0, 0, 1, 2)},
                         {L0: records(L0, 3)}], batch_max=2)
    consumer.batch_handler = handler
    run(consumer, 2)
    # Fetch 1, in chunks of 2: the transactions; labels 0-1, handed back; label 2 is not
    # handed out behind them. Fetch 2: labels 0-1 first, then 2-3.
    assert seen == [("transactions", [0, 1]), ("labels", [0, 1]),
                    ("labels", [0, 1]), ("labels", [2, 3])]
    assert consumer.acked == [(T0, 0, 1), (L0, 0, 1), (L0, 2, 3)]


def test_records_handed_back_for_a_partition_no_longer_assigned_are_dropped():
    calls = 0

    async def handler(batch: Any, _arrived: float) -> set[TP] | None:
        nonlocal calls
        calls += 1
        return {L0} if calls == 1 else None

    consumer = Consumer([{L0: records(L0, 0)}, {T0: records(T0, 5)}], batch_max=10)
    consumer.batch_handler = handler
    run(consumer, 1)
    consumer.assignment = lambda: {T0}  # type: ignore[method-assign]  # a rebalance took L0
    run(consumer, 1)
    assert consumer.acked == [(T0, 5, 5)]  # label 0 not acknowledged: its new owner reads it


def test_records_held_at_a_revocation_are_handed_out_once_as_fetched_again(monkeypatch):
    """Faust seeks every partition back to its committed offset after a rebalance, and
    resumes it only once its table is recovered: what the aligner held from before must
    not go out (during the recovery, then a second time)."""
    revoked: list[set[TP]] = []

    async def faust_revoked(self: Any, tps: set[TP]) -> None:
        revoked.append(tps)

    monkeypatch.setattr(faust_consumer.Consumer, "on_partitions_revoked", faust_revoked)
    seen: list[tuple[int, int]] = []

    async def handler(batch: Any, _arrived: float) -> None:
        seen.extend((tp.partition, r.offset) for tp, recs in batch for r in recs)

    consumer = Consumer([{T0: timed(T0, (0, 10), (1, 30))},  # T1 may hold earlier ones
                         {T0: timed(T0, (0, 10), (1, 30)), T1: timed(T1, (0, 20))}],
                        batch_max=10)
    consumer.batch_handler = handler
    consumer.assignment = lambda: {T0, T1}  # type: ignore[method-assign]
    consumer.aligner = Aligner("transactions", "labels",
                               lambda _topic, value: int(value), max_wait_s=60.0)
    consumer.highwater = lambda tp: {T0: 2, T1: 1}[tp]  # type: ignore[method-assign]
    consumer._committed_offset = {}
    run(consumer, 1)
    assert seen == [] and consumer.aligner.count(T0) == 2  # held, waiting for T1
    asyncio.run(consumer.on_partitions_revoked({T0, T1}))
    assert revoked == [{T0, T1}]
    run(consumer, 1)  # the same partitions assigned again, read from the committed offsets
    assert seen == [(0, 0), (1, 0), (0, 1)]  # in event time, each once
    assert consumer.acked == [(T0, 0, 0), (T1, 0, 0), (T0, 1, 1)]
