"""Micro-batches sized to the budget: as many records as the worker decides within its share.

A batch's records all arrive together (the fetch hands them to the batch loop at once), so
the last of them waits for the first: a batch that takes longer than the budget to decide
makes every one of its records late, whatever the model does. :class:`BatchSizer` keeps
each batch within ``share`` of the budget: it learns the worker's cost per record (decode
to decisions, an exponentially weighted mean over the batches handled) and asks the next
fetch for ``share * budget / cost`` records, between ``minimum`` and ``maximum``.

The worker caps each fetch at :meth:`BatchSizer.size` (aiokafka's ``max_records``), so the
records beyond it wait in the consumer's fetch buffer, not in a batch in hand: the budget of
a record counts from when the batch loop takes it. With a cost of 150 us per record and
the default 50 ms budget and 0.5 share, batches hold about 166 records; at 20 us, 1,250
records are allowed and ``maximum`` caps it.

A backlog is the exception: while the input partitions hold more records than
``backlog_batches`` sized batches (:meth:`BatchSizer.set_lag`), batches take ``maximum``
records, and ``backlog_maximum`` while more than that many wait. Those records are late
already, by their wait in Kafka, and a batch has a fixed cost (the broker's
acknowledgements, one after another) that small batches pay more often. Measured on a
40,000-record backlog, budget-sized batches drained 3,448/s and batches of 500 5,367/s;
on 50,000, batches of 2,000 drained 1.41x a bare Faust consumer against 1.12x for 500
(medians of seven pairs; docs/performance.md, "Backlog batches"). The model decided all of
them every time. The larger batches' decisions carry how late they are (``late_ms``).
"""

from __future__ import annotations


class BatchSizer:
    def __init__(self, budget_ms: float, share: float, minimum: int, maximum: int,
                 alpha: float = 0.2, backlog_batches: float = 1.0,
                 backlog_maximum: int | None = None) -> None:
        self.target_s = budget_ms * share / 1000.0
        self.minimum = max(1, min(minimum, maximum))
        self.maximum = maximum
        #: Records in a batch while more than this many wait (default: ``maximum``).
        self.backlog_maximum = maximum if backlog_maximum is None else max(1, backlog_maximum)
        self.alpha = alpha
        self.backlog_batches = backlog_batches
        #: Seconds per record, learned; None until a first batch was measured.
        self.per_record_s: float | None = None
        self._size = self.minimum
        self._lag: dict[object, int] = {}

    def size(self) -> int:
        """Records to take in the next batch: the budget's size; ``maximum`` in a backlog,
        and ``backlog_maximum`` while more than that many records wait. A live burst of a
        few batches' worth is cleared in batches of ``maximum``, so the batches of live
        traffic keep their time; only records already long late fill the largest ones."""
        waiting = self.waiting
        if not self._is_backlog(waiting):
            return self._size
        return self.backlog_maximum if waiting > self.backlog_maximum else self.maximum

    @property
    def waiting(self) -> int:
        """Records behind the end of the input partitions, as of the last batches."""
        return sum(self._lag.values())

    @property
    def backlog(self) -> bool:
        """More records wait in the input than ``backlog_batches`` budget-sized batches
        take."""
        return self._is_backlog(self.waiting)

    def _is_backlog(self, waiting: int) -> bool:
        return waiting > self.backlog_batches * self._size

    def set_lag(self, partition: object, lag: int) -> None:
        """Records behind the end of ``partition``, as of the batch just handled."""
        self._lag[partition] = lag

    def keep(self, partitions: set[object]) -> None:
        """Forget the lag of partitions not in ``partitions`` (revoked in a rebalance)."""
        for partition in [p for p in self._lag if p not in partitions]:
            del self._lag[partition]

    def observe(self, records: int, seconds: float) -> None:
        """A batch of ``records`` took ``seconds`` from its arrival to its decisions."""
        if records <= 0 or seconds < 0:
            return
        cost = seconds / records
        if self.per_record_s is None:
            self.per_record_s = cost
        else:
            # a batch smaller than asked for counts for less: its fixed part (a model
            # call, a state read) weighs on few records and overstates the cost per record
            weight = self.alpha * min(1.0, records / self._size)
            self.per_record_s += weight * (cost - self.per_record_s)
        self._size = self._clamp(self.target_s / self.per_record_s
                                 if self.per_record_s > 0 else self.maximum)

    def _clamp(self, n: float) -> int:
        return int(max(self.minimum, min(self.maximum, n)))
