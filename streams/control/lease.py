"""One acting process per role (the rollout controller, the autopilot) among replicas: a
lease held through Kafka group membership.

Every candidate joins the consumer group ``<app id>-<role>-lease``, subscribed to the
control topic, which has one partition: the group gives that partition to exactly one
member, and that member holds the lease (the sticky assignment keeps it there when
another joins). The others stand by, and one of them takes over when the holder leaves
the group: once the group has rebalanced after a clean stop (about 6 s on the embedded
broker, which holds joins), or after the role's session setting more when it died
(``FRAUDSTREAM_CANARY_CONTROLLER_LEASE_SESSION_S``,
``FRAUDSTREAM_AUTOPILOT_LEASE_SESSION_S``). Records read this way are dropped: the group
is for the assignment only, and commits nothing.

This is not a fence: a holder paused longer than the session (a SIGSTOP, a machine that
froze) may act once more after another took over, before it hears it lost the lease.
It stops two replicas from both acting by accident, the common case."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from confluent_kafka import Consumer, KafkaException

from fraudstream.streams.settings import Settings

log = logging.getLogger("fraudstream.lease")


class Lease:
    """Whether this process holds the lease of ``role``; :meth:`start` joins the group
    in a thread of its own, :meth:`stop` leaves it (handing the lease on)."""

    def __init__(self, settings: Settings, role: str, session_s: float = 10.0) -> None:
        self.role = role
        self.topic = settings.topics.control
        self.group = f"{settings.worker.app_id}-{role}-lease"
        session_ms = int(session_s * 1000)
        self._config: dict[str, Any] = {
            **settings.kafka.consumer_config(self.group),
            "session.timeout.ms": session_ms,
            "heartbeat.interval.ms": max(100, session_ms // 5),
            "auto.offset.reset": "latest",
            # the holder keeps the partition when another member joins
            "partition.assignment.strategy": "cooperative-sticky",
        }
        self._held = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def held(self) -> bool:
        return self._held.is_set()

    def wait(self, timeout_s: float) -> bool:
        """Whether the lease is held, waiting at most ``timeout_s`` for it."""
        return self._held.wait(timeout_s)

    def start(self) -> Lease:
        self._thread = threading.Thread(target=self._run, name=f"{self.role}-lease",
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(15.0)

    def around(self, run: Callable[[threading.Event], None]
               ) -> Callable[[threading.Event], None]:
        """``run(stop)`` with this lease's group joined for as long as it runs, and left
        when it returns (a standby takes over without waiting out a session)."""
        def leased(stop: threading.Event) -> None:
            self.start()
            try:
                run(stop)
            finally:
                self.stop()
        return leased

    def _assigned(self, _consumer: Any, partitions: list[Any]) -> None:
        if partitions and not self._held.is_set():
            self._held.set()
            log.warning("%s: lease held (group %s): acting", self.role, self.group)

    def _revoked(self, _consumer: Any, partitions: list[Any]) -> None:
        if partitions and self._held.is_set():
            self._held.clear()
            log.warning("%s: lease lost (group %s): standing by", self.role, self.group)

    def _run(self) -> None:
        consumer = None
        while not self._stop.is_set():
            try:
                if consumer is None:
                    consumer = Consumer(self._config)
                    consumer.subscribe([self.topic], on_assign=self._assigned,
                                       on_revoke=self._revoked, on_lost=self._revoked)
                    log.warning("%s: standing by until this process holds the lease "
                                "(group %s)", self.role, self.group)
                consumer.consume(100, 0.5)  # heartbeats and rebalances; records dropped
            except KafkaException as exc:
                log.warning("%s: lease group: %s; trying again in 2 s", self.role, exc)
                self._held.clear()
                if consumer is not None:
                    consumer.close()
                    consumer = None
                self._stop.wait(2.0)
        self._held.clear()
        if consumer is not None:
            consumer.close()  # leaves the group: a standby takes over at once
