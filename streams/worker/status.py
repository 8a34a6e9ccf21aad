"""The worker's one-line status, logged every few seconds at the default log level.

:class:`WorkerStatus` gathers what each micro-batch did (``add``) and, on a timer
(``report``), logs one line through the ``fraudstream.status`` logger, which is set to
INFO so that it shows under the worker's default ``warning`` level::

    status: 251 tx/s, 3.1 labels/s, lag 14 | model 99.6% rules 0.0% fallback 0.4% \
{'timeout': 9} | dlq 2 | worker p50 6.1 ms p99 18.4 ms (fetch to acknowledged), 120 \
decided past the budget (by up to 31 ms) | features: 0 late, 0 too late, 0 degraded

The line is logged even when nothing arrived (``0 tx/s``), so a stalled worker does not
fall silent; it ends with ``STALLED: n partition(s)`` while the progress watchdog
(:mod:`fraudstream.streams.worker.progress`) finds input partitions with records waiting and nothing
handled. "worker p50/p99" is the batch's own time: from the fetched batch reaching the
worker to its decisions acknowledged by the broker, the part of the end-to-end
latency that the worker owns.
"""

from __future__ import annotations

import gc
import logging
import sys
import time
from collections import Counter
from typing import Any

log = logging.getLogger("fraudstream.status")
warn = logging.getLogger("fraudstream.worker")


def install_handler() -> None:
    """Status lines go to the process's real stderr at INFO, whatever level and stdout
    redirection Faust sets up for the rest of the worker's logging."""
    if getattr(log, "_fraudstream_handler", False):
        return
    handler = logging.StreamHandler(sys.__stderr__)
    handler.setFormatter(logging.Formatter("[%(asctime)s] [%(process)d] [INFO] %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    log._fraudstream_handler = True  # type: ignore[attr-defined]


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


class GcPauses:
    """Time the interpreter spends in full (generation 2) collections: a pause there
    stops the event loop, and a batch in hand waits it out."""

    def __init__(self) -> None:
        self._start = 0.0
        self.count = 0
        self.max_ms = 0.0
        gc.callbacks.append(self._on_gc)

    def _on_gc(self, phase: str, info: dict[str, Any]) -> None:
        if info.get("generation") != 2:
            return
        if phase == "start":
            self._start = time.perf_counter()
        else:
            self.count += 1
            self.max_ms = max(self.max_ms, (time.perf_counter() - self._start) * 1000.0)

    def take(self) -> tuple[int, float]:
        out = (self.count, self.max_ms)
        self.count, self.max_ms = 0, 0.0
        return out


class WorkerStatus:
    def __init__(self) -> None:
        install_handler()
        self.gc = GcPauses()
        self._reset(time.monotonic())
        self.lag: dict[tuple[str, int], int] = {}
        #: Input partitions the progress watchdog found stalled at its last check.
        self.stalled = 0

    def _reset(self, now: float) -> None:
        self.since = now
        self.events = self.labels = self.dead = self.miskeyed = 0
        #: Labels handed back to be delivered again (the state store did not take them).
        self.labels_again = 0
        self.late = self.too_late = self.degraded = 0
        self.past_budget = 0
        self.past_budget_max_ms = 0.0
        self.stages: Counter[str] = Counter()
        self.fallbacks: Counter[str] = Counter()
        self.own_ms: list[float] = []

    def add(self, size: int, labels: int, result: Any, own_ms: float) -> None:
        """One micro-batch: its transactions, labels, result and the worker's own time."""
        self.events += size
        self.labels += labels
        self.dead += len(result.dead_letters)
        self.miskeyed += result.miskeyed
        self.past_budget += result.past_budget
        self.past_budget_max_ms = max(self.past_budget_max_ms, result.past_budget_max_ms)
        # Decisions the rules took in place of the model; the shadow's are not decisions
        # of this stream.
        self.fallbacks.update({c: n for c, n in result.fallbacks.items()
                               if not c.startswith("shadow_")})
        for (stage, _outcome), n in result.stage_outcomes.items():
            self.stages[stage] += n
        if size:
            self.own_ms.append(own_ms)
        fb = result.features
        if fb is not None:
            self.late += fb.late
            self.too_late += fb.too_late
            self.degraded += len(fb.vectors) if fb.degraded else 0

    def set_lag(self, topic: str, partition: int, lag: int) -> None:
        self.lag[(topic, partition)] = lag

    def line(self, now: float | None = None) -> str:
        """The status line for the time since the last one, and start a new interval."""
        now = time.monotonic() if now is None else now
        span = max(now - self.since, 1e-9)
        decided = sum(self.stages.values())
        fell_back = sum(self.fallbacks.values())
        # A degraded or model_unavailable fallback is decided at stage "rules", the others
        # (timeout, busy, error, nan) at stage "model": the rules' own share is the rest.
        rules = self.stages["rules"] - self.fallbacks["degraded"] \
            - self.fallbacks["model_unavailable"]
        model = decided - rules - fell_back

        def share(n: int) -> str:
            return f"{100.0 * n / decided:.1f}%" if decided else "-"

        fallback = f"fallback {share(fell_back)}"
        if self.fallbacks:
            fallback += f" {dict(self.fallbacks)}"
        own = (f"worker p50 {quantile(self.own_ms, 0.5):.1f} ms p99 "
               f"{quantile(self.own_ms, 0.99):.1f} ms (fetch to acknowledged)"
               if self.own_ms else "worker -")
        if self.past_budget:
            own += (f", {self.past_budget} decided past the budget (by up to "
                    f"{self.past_budget_max_ms:.0f} ms)")
        full, pause = self.gc.take()
        taken = self.labels - self.labels_again
        text = (f"status: {self.events / span:.0f} tx/s, {taken / span:.1f} labels/s, "
                f"lag {sum(self.lag.values())} | model {share(model)} rules {share(rules)} "
                f"{fallback} | dlq {self.dead} | {own} | features: {self.late} late, "
                f"{self.too_late} too late, {self.degraded} degraded | gc: {full} full, "
                f"longest {pause:.0f} ms")
        if self.labels_again:
            text += (f" | labels: {self.labels_again} not taken (state store unavailable), "
                     "delivered again")
        if self.stalled:
            text += f" | STALLED: {self.stalled} partition(s)"
        if self.miskeyed:
            warn.warning(
                "%d transactions were not keyed by their card_id: a card's events may "
                "be split over partitions, and its features with them. Key by card_id, "
                "or set FRAUDSTREAM_WORKER_REPARTITION=true", self.miskeyed)
        self._reset(now)
        return text

    def report(self) -> None:
        log.info(self.line())
