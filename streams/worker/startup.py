"""What a worker's (re)start waits for, and what shortens it.

**Group membership.** With static membership (Kafka's ``group.instance.id``, KIP-345) a
worker that restarts within its session timeout rejoins as the member it was: Apache Kafka
hands it its partitions back without waiting for the dead member's session to expire or
rebalancing the others. The id must stay the same across restarts of one worker and differ
between workers; each worker has its own data dir, so the default id is derived from it.
The embedded broker (Tansu 0.6.0) accepts the id (it answers with the member id of before)
but holds a static member's JoinGroup and then its SyncGroup for 3 s each, whatever the
session timeout: 6 s from join to partitions, against 2 s for a dynamic member with a 3 s
session. So on the embedded broker membership stays dynamic unless an id is set, and a
short ``FRAUDSTREAM_KAFKA_SESSION_TIMEOUT_MS`` is what helps: Tansu holds every JoinGroup
for about half the session timeout, and keeps a SIGKILLed member until its session ends.

**Faust's table manager** sleeps one second before it starts recovery, so that tables
defined after the app started are included; the worker defines its table before, so the
second is skipped.
"""

from __future__ import annotations

import hashlib
import socket
from typing import Any

from fraudstream.streams.settings import Settings


def group_instance_id(settings: Settings) -> str | None:
    """``FRAUDSTREAM_WORKER_INSTANCE_ID``; if empty, ``<app id>-<host>-<hash of the data
    dir>`` (None on the embedded broker); None (dynamic membership) for ``none``."""
    w = settings.worker
    if w.instance_id.lower() == "none":
        return None
    if w.instance_id:
        return w.instance_id
    if settings.kafka.embedded:
        return None
    where = hashlib.sha256(str(w.data_dir.resolve()).encode()).hexdigest()[:10]
    return f"{w.app_id}-{socket.gethostname()}-{where}"


def skip_table_manager_sleep() -> None:
    """Start table recovery without Faust's fixed one-second sleep (every table of the
    worker exists before the app starts)."""
    from faust.tables.manager import TableManager

    if getattr(TableManager, "_fraudstream_no_sleep", False):
        return

    async def on_start(self: Any) -> None:
        if not self.should_stop:
            await self._update_channels()
            await self.recovery.start()

    TableManager.on_start = on_start
    TableManager._fraudstream_no_sleep = True
