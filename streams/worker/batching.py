"""Hand whole fetched batches of one topic to a handler, instead of Faust's per-message path.

Faust turns every fetched record into a message, an event, a queue item and an ack: about
170 us per record here, most of a worker's time. :class:`BatchConsumer` replaces only that
delivery step for the batch topics. Faust keeps everything else: group membership and
partition assignment, pausing partitions during table recovery and rebalances, table
changelogs, and offset commits.

How: :meth:`BatchConsumer.getmany` takes the records Faust's fetcher returns (only for
active partitions, only while flow is active), passes those of the batch topics to the
handler in chunks, with the time the fetch returned them (a record's budget counts from
it), and once the handler returned (its results acknowledged by the broker,
see :mod:`fraudstream.streams.worker.delivery`) marks their offsets acknowledged in Faust's own
bookkeeping.
Faust's commit loop then commits them like any acknowledged offsets. Records of other
topics take Faust's normal path. A handler that raises crashes the worker before any of
the chunk is acknowledged: at-least-once.

The handler may return partitions whose records of the chunk it could not take (labels,
while the state store is unavailable): they are not acknowledged, and are handed to it
again at the next fetch, before any later record of theirs (so a partition's records are
always taken in offset order, and commits never pass one that was not taken).

With a :attr:`BatchConsumer.sizer` (:class:`fraudstream.streams.worker.sizing.BatchSizer`)
each fetch returns at most the records the sizer asks for, so a batch is decided within
its share of the budget; the rest stays in the consumer's fetch buffer for the next one.

With a :attr:`BatchConsumer.aligner` (:class:`fraudstream.streams.worker.align.Aligner`)
the fetched records are held and handed on merged in event time across partitions and
topics; a partition holding too many stops being fetched (Faust's ``on_buffer_full``).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Sequence
from typing import Any

from faust.transport.drivers import aiokafka as faust_aiokafka
from faust.types import TP
from faust.types.tuples import ack_lock
from mode.utils.futures import notify

#: ([(partition, [aiokafka ConsumerRecord])], fetched at (``perf_counter``)) -> the
#: partitions whose records of the batch are to be delivered again (None: none), once the
#: results of the others are acknowledged.
BatchHandler = Callable[[Sequence[tuple[TP, Sequence[Any]]], float],
                        Awaitable[Collection[TP] | None]]


class BatchConsumer(faust_aiokafka.Consumer):
    """Faust's aiokafka consumer, delivering :attr:`batch_topics` to :attr:`batch_handler`."""

    batch_topics: frozenset[str] = frozenset()
    batch_handler: BatchHandler | None = None
    batch_max: int = 500
    #: Told of each chunk handed to the handler and of each one handled
    #: (:class:`fraudstream.streams.worker.progress.ProgressWatchdog`).
    progress: Any = None
    #: Sizes each fetch (:class:`fraudstream.streams.worker.sizing.BatchSizer`); None: whole
    #: fetches, in chunks of :attr:`batch_max`.
    sizer: Any = None
    #: Merges the batch topics in event time (:class:`fraudstream.streams.worker.align.Aligner`);
    #: None: records go on in the order fetched.
    aligner: Any = None
    #: Times what was held was dropped: a fetch that spans one is not handed on, nor
    #: handed back.
    _revocations: int = 0

    async def on_partitions_revoked(self, revoked: set[TP]) -> None:
        """Drop every record fetched and not handed out yet, then Faust's revocation.

        After a rebalance Faust seeks every assigned partition back to its committed
        offset, and resumes it only once its table partitions are recovered. A record held
        from before (by the aligner, or handed back) would otherwise be handed out while
        the store is still being restored, its features read from a partial store (seen:
        a merchant's day count 76 short), and then again once fetched anew."""
        self._drop_held()
        await super().on_partitions_revoked(revoked)

    def _drop_held(self) -> None:
        """Forget what is held (at a revocation, or a seek back to the committed
        offsets), and end the current fetch's hand-out (:attr:`_revocations`)."""
        self._revocations += 1
        if self.aligner is not None:
            self.aligner.forget()
        self._align_next.clear()
        self._again.clear()

    async def getmany(self, timeout: float) -> AsyncIterator[tuple[TP, Any]]:
        epoch = self._revocations
        size = self.batch_max
        if self.sizer is not None:
            try:
                self.sizer.keep(self.assignment())
            except Exception:  # not started yet: no assignment to compare with
                pass
            size = self.sizer.size()
            # a table's recovery reads its changelog through this consumer: no cap then
            self._cap_fetch(None if getattr(self.app, "in_recovery", False) else size)
        records, active = await self._wait_next_records(timeout)
        fetched_at = time.perf_counter()
        if records is None or self.should_stop or self._revocations != epoch:
            return  # (a rebalance meanwhile: they are fetched again from the committed offsets)
        if not self.flow_active:
            self._drop_held()  # they will be read again from there
            await self.perform_seek()  # as Faust does: back to the committed offsets
            return
        ours: list[tuple[TP, Sequence[Any]]] = []
        others: list[tuple[TP, Sequence[Any]]] = []
        for tp, recs in records.items():
            if active is not None and tp not in active and tp not in self._buffered_partitions:
                continue
            (ours if tp.topic in self.batch_topics else others).append((tp, recs))
        if self.aligner is not None:
            ours = self._align(ours)
        elif self._again:
            ours = self._with_again(ours)
        progress = self.progress
        again: dict[TP, list[Any]] = {}
        for chunk in _chunks(ours, size):
            assert self.batch_handler is not None
            if self._revocations != epoch:
                break  # revoked while the handler ran: the rest is fetched again
            if again:  # a partition handed back waits whole: later records stay behind it
                for tp, recs in chunk:
                    if tp in again:
                        again[tp].extend(recs)
                chunk = [(tp, recs) for tp, recs in chunk if tp not in again]
                if not chunk:
                    continue
            if progress is not None:
                progress.started(chunk)
            retry = await self.batch_handler(chunk, fetched_at) or ()
            for tp, recs in chunk:
                if tp in retry:
                    again.setdefault(tp, []).extend(recs)
                else:
                    self._ack_range(tp, recs[0].offset, recs[-1].offset)
            if progress is not None:
                progress.handled(chunk)  # handed back is progress too: they are retried
        if again and self._revocations == epoch:
            self._hand_back(again)
        to_message = self._to_message
        for tp, recs in others:
            for record in recs:
                yield tp, to_message(tp, record)

    def _align(self, fetched: list[tuple[TP, Sequence[Any]]]
               ) -> list[tuple[TP, Sequence[Any]]]:
        """Hold the fetched records, release what the aligner can merge, and stop fetching
        partitions that hold too many (again once half of them went)."""
        aligner = self.aligner
        assigned = {tp for tp in self.assignment() if tp.topic in self.batch_topics}
        aligner.forget(assigned)  # revoked partitions: their new owner reads them again
        for tp, recs in fetched:
            if tp in assigned:
                aligner.add(tp, recs)
                self._align_next[tp] = recs[-1].offset + 1
        pending = {tp for tp in assigned if self._may_have_more(tp)}
        timeouts = aligner.timeouts
        released = aligner.release(pending)
        if aligner.timeouts != timeouts:
            self.log.info("event-time alignment: waited %.1f s for %s; released what was "
                          "held", aligner.max_wait_s,
                          sorted(f"{tp.topic}-{tp.partition}" for tp in pending
                                 if not aligner.count(tp)))
        for tp in assigned:
            held = aligner.count(tp)
            if held >= aligner.max_held:
                self.on_buffer_full(tp)
            elif tp in self._buffered_partitions and held < aligner.max_held // 2:
                self.on_buffer_drop(tp)
        return released

    def _hand_back(self, again: dict[TP, list[Any]]) -> None:
        """Keep records the handler handed back, to go first at the next fetch."""
        for tp, recs in again.items():
            if self.aligner is not None:
                self.aligner.put_back(tp, recs)
            else:
                self._again[tp] = recs + self._again.get(tp, [])

    def _with_again(self, fetched: list[tuple[TP, Sequence[Any]]]
                    ) -> list[tuple[TP, Sequence[Any]]]:
        """``fetched`` with the records handed back in front of their partition's (those
        of partitions no longer assigned are dropped: their new owner reads them)."""
        assigned = self.assignment()
        again, self._again_table = self._again, {}
        out = [(tp, recs) for tp, recs in again.items() if tp in assigned]
        firsts = {tp: i for i, (tp, _) in enumerate(out)}
        for tp, recs in fetched:
            if tp in firsts:
                i = firsts[tp]
                out[i] = (tp, [*out[i][1], *recs])
            else:
                out.append((tp, recs))
        return out

    @property
    def _again(self) -> dict[TP, list[Any]]:
        """Records handed back by the handler, per partition, when no aligner holds them."""
        table = self.__dict__.get("_again_table")
        if table is None:
            table = self.__dict__["_again_table"] = {}
        return table

    @property
    def _align_next(self) -> dict[TP, int]:
        """The next offset to fetch per partition, as the fetched records tell."""
        table = self.__dict__.get("_align_next_table")
        if table is None:
            table = self.__dict__["_align_next_table"] = {}
        return table

    def _may_have_more(self, tp: TP) -> bool:
        """Whether ``tp`` may hold records not fetched yet: not known to be read to its
        end. A partition Faust paused (a table's recovery) counts: it holds the others
        back until it is fetched again, or the aligner's wait runs out."""
        try:
            end = self.highwater(tp)
        except Exception:  # not assigned any more, or no fetch yet
            return True
        if end is None:
            return True
        if end <= 0:
            return False
        nxt = self._align_next.get(tp)
        if nxt is None:
            committed = self._committed_offset.get(tp)
            return committed is None or committed < end
        return nxt < end

    def _cap_fetch(self, size: int | None) -> None:
        """At most ``size`` records from the next fetch (aiokafka reads its
        ``_max_poll_records`` at every call; None: no cap); records of other topics count
        too."""
        thread = getattr(self, "_thread", None)
        consumer = getattr(thread, "_consumer", None)
        if consumer is not None:
            consumer._max_poll_records = size

    def _ack_range(self, tp: TP, first: int, last: int) -> None:
        """Mark offsets first..last acknowledged, as Faust's ``ack()`` does one by one."""
        with ack_lock:
            committed = self._committed_offset[tp]
            if committed is not None:
                first = max(first, committed)
            if first > last:
                return
            index = self._acked_index[tp]
            offsets = [o for o in range(first, last + 1) if o not in index]
            index.update(offsets)
            self._acked[tp].extend(offsets)
            self._n_acked += len(offsets)
        notify(self._waiting_for_ack)


def _chunks(
    batches: list[tuple[TP, Sequence[Any]]], size: int
) -> list[list[tuple[TP, Sequence[Any]]]]:
    """Split per-partition record lists into chunks of at most ``size`` records."""
    chunks: list[list[tuple[TP, Sequence[Any]]]] = []
    current: list[tuple[TP, Sequence[Any]]] = []
    room = size
    for tp, recs in batches:
        start = 0
        while start < len(recs):
            take = recs[start:start + room]
            current.append((tp, take))
            start += len(take)
            room -= len(take)
            if room == 0:
                chunks.append(current)
                current, room = [], size
    if current:
        chunks.append(current)
    return chunks


def install(app: Any, topics: set[str], handler: BatchHandler, batch_max: int,
            progress: Any = None, sizer: Any = None, aligner: Any = None) -> None:
    """Make ``app`` build a :class:`BatchConsumer` for ``topics`` (call before it starts);
    ``progress`` is told of every chunk handed out and handled; ``sizer`` sizes fetches;
    ``aligner`` merges the topics in event time."""
    app.transport.Consumer = type(
        "AppBatchConsumer",
        (BatchConsumer,),
        {"batch_topics": frozenset(topics), "batch_handler": staticmethod(handler),
         "batch_max": batch_max, "progress": progress, "sizer": sizer, "aligner": aligner},
    )
