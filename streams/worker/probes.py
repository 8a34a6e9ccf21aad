"""What a worker's /healthz and /readyz check (served by :mod:`fraudstream.streams.health`).

Live (``/healthz``): the worker is making progress.
- ``event_loop``: the loop ran a callback within the last ``liveness_s`` (each probe asks
  it to, :class:`Heartbeat`). A loop blocked by a call that never returns fails here.
- ``batch``: no batch has been in the handler's hands for ``liveness_s`` or more. A batch
  waiting on something that never comes (a write never acknowledged, a lock) fails here.
- ``progress``: no input partition is stalled (records waiting and nothing handled for
  ``FRAUDSTREAM_WORKER_STALL_S``, :class:`~fraudstream.streams.worker.progress.ProgressWatchdog`).

Ready (``/readyz``): the worker decides with the state and the model it should.
- ``assignment``: the group gave this worker its assignment and no rebalance is under way.
  A worker beyond the partition count gets an empty assignment and is ready (a spare).
- ``state``: the bulk restore and Faust's recovery of the assigned partitions are done.
- ``replica``: the entity replica has read every partition of the changelog to the end it
  had at start (when the replica is on).
- ``model``: the ACTIVE version is loaded, or none is set (rules only, by choice). A
  version that was refused, with nothing else serving, leaves the worker not ready.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from fraudstream.streams.health import Probes


class Heartbeat:
    """When the event loop last ran a callback. :meth:`ping`, from the probes' thread, asks
    the loop to beat and waits a moment: a loop that runs answers at once; one blocked by
    a call that never returns does not, and its last beat grows old."""

    def __init__(self, loop: Callable[[], Any] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.loop = loop
        self.clock = clock
        self.at = clock()

    def beat(self) -> None:
        self.at = self.clock()

    def ping(self, wait_s: float = 1.0) -> None:
        try:
            loop = self.loop() if self.loop is not None else None
        except RuntimeError:  # no loop yet (the worker is starting)
            return
        if loop is None or loop.is_closed():
            return
        done = threading.Event()

        def tick() -> None:
            self.beat()
            done.set()

        try:
            loop.call_soon_threadsafe(tick)
        except RuntimeError:  # the loop is closing
            return
        done.wait(wait_s)


def add_worker_checks(probes: Probes, app: Any, heartbeat: Heartbeat, watchdog: Any,
                      restoring: Any, replica: Any, watcher: Any, liveness_s: float,
                      clock: Callable[[], float] = time.monotonic) -> None:
    """Put the worker's checks (above) in ``probes``, in place of any there (the worker
    serves /readyz from the start, failing until then)."""

    def event_loop() -> str | None:
        heartbeat.ping()
        age = clock() - heartbeat.at
        return f"no heartbeat for {age:.0f} s" if age >= liveness_s else None

    def batch() -> str | None:
        since = watchdog.tracker.busy_since
        if since is None:
            return None
        age = clock() - since
        return f"one batch in hand for {age:.0f} s" if age >= liveness_s else None

    def progress() -> str | None:
        stalled = list(watchdog.stalled)
        return "; ".join(s.describe() for s in stalled) if stalled else None

    def assignment() -> str | None:
        if getattr(app, "rebalancing", False):
            return "a rebalance is under way"
        if not app.tables.recovery.completed.is_set():
            return "no assignment yet"
        return None

    def state() -> str | None:
        if restoring is not None and restoring.running:
            return "restoring the state of the assigned partitions from the changelog"
        if getattr(app, "in_recovery", False):
            return "recovering the state of the assigned partitions"
        return None

    def replica_caught_up() -> str | None:
        if replica is None or replica.ready.is_set():
            return None
        return (f"reading the other partitions' entity records "
                f"({replica.applied} applied so far)")

    def model() -> str | None:
        from fraudstream.scorers.registry import ACTIVE

        if watcher.stage.active is not None:
            return None
        wanted = watcher.registry.pinned(ACTIVE)
        if wanted is None:
            return None
        refused = watcher.refused.get(ACTIVE)
        return f"ACTIVE version {refused or wanted} not loaded"

    probes.live[:] = [("event_loop", event_loop), ("batch", batch), ("progress", progress)]
    probes.ready[:] = [("assignment", assignment), ("state", state),
                       ("replica", replica_caught_up), ("model", model)]
