"""The Redis backend of the feature state: one redis-server shared by every worker.

Records live under ``<prefix>:<partition>:<key>`` (``fraudstream:2:c|card_000123``). Every
worker reads every partition's partial records (:meth:`RedisStore.readable`), so merchant,
device and IP features count the events of all partitions, whichever worker owns them;
each partial is still written by the owner of its partition only, so workers never race
on a key.

Round trips: a batch's records are read with one ``MGET`` and written with one pipelined
round trip of ``SET key value PX ttl_ms`` (no MULTI). Every write refreshes the TTL, so an
entity with no event for ``ttl_ms`` (32 days by default: past every 30-day window) expires
by itself; nothing scans Redis. The commands name their keys, so the store works on a
single server (or a replicated one behind one address), not on a Redis Cluster.

Degradation: each command waits at most ``timeout_ms`` (connect and socket timeouts, and
no client-side retries). A Redis error or a timeout marks the store down for ``retry_s``:
:meth:`RedisStore.read` and :meth:`RedisStore.flush` raise
:class:`~fraudstream.state.engine.StateUnavailable` at once, without touching the network, until
``retry_s`` has passed; then the next call tries Redis again. An outage therefore costs at
most one timeout per ``retry_s``, whatever the batch rate; the engine decides those batches
on event-only features flagged ``features_degraded``. Writes queued when a flush fails (or
while down) are dropped and counted in :attr:`RedisStore.lost_writes`: the records they
would have updated stay as they were, which under-counts those entities' windows, and the
worker goes on.

:meth:`RedisStore.flush` calls Redis directly on the event loop's thread, like
:meth:`RedisStore.read` (which the engine calls synchronously): it is one round trip on a
nearby server (well under a millisecond on loopback) and bounded by ``timeout_ms``, so a
thread hop would cost more than it saves, and the client is never used from two threads.

Keys hold card_id tokens and merchant, device and IP identifiers, never card numbers; the
store never logs a key.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from fraudstream.state.engine import StateUnavailable
from fraudstream.streams.settings import FeatureSettings

log = logging.getLogger(__name__)

DEFAULT_TTL_MS = 32 * 86_400_000
_ERRORS = (redis.exceptions.RedisError, OSError)


class _Heads(dict[int, bytes]):
    """partition -> ``b"<prefix>:<partition>:"``, made on first use (a partition added to the
    topic later is still written under its own key, not an error)."""

    def __init__(self, prefix: bytes) -> None:
        super().__init__()
        self.prefix = prefix

    def __missing__(self, partition: int) -> bytes:
        head = self[partition] = self.prefix + b":" + str(partition).encode() + b":"
        return head


class RedisStore:
    """:class:`~fraudstream.state.engine.StateStore` on a redis-server (sync client)."""

    def __init__(
        self,
        url: str,
        prefix: str,
        partitions: int,
        timeout_ms: int = 200,
        retry_s: float = 1.0,
        ttl_ms: int = DEFAULT_TTL_MS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if partitions < 1 or timeout_ms <= 0 or retry_s < 0 or ttl_ms <= 0:
            raise ValueError("need partitions >= 1, timeout_ms > 0, retry_s >= 0, ttl_ms > 0")
        self.partitions = partitions
        self.timeout_ms = timeout_ms
        self.retry_s = retry_s
        self.ttl_ms = int(ttl_ms)
        self.clock = clock
        timeout_s = timeout_ms / 1000.0
        self.client = redis.Redis.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 0),  # one attempt: the store's own retry_s paces retries
            health_check_interval=0,
        )
        self._heads = _Heads(prefix.encode())
        self._readable = range(partitions)
        self._pending: list[tuple[int, bytes, bytes]] = []
        self._down_until: float | None = None
        #: read() calls answered with StateUnavailable (batches decided degraded).
        self.degraded_reads = 0
        #: Records whose write was dropped because a flush failed or Redis was down.
        self.lost_writes = 0
        #: Redis errors and timeouts (each marks the store down for retry_s).
        self.failures = 0
        #: Times Redis answered again after being marked down.
        self.reconnects = 0

    @classmethod
    def from_settings(cls, features: FeatureSettings, partitions: int) -> RedisStore:
        return cls(
            features.redis_url,
            features.redis_prefix,
            partitions,
            timeout_ms=features.redis_timeout_ms,
            retry_s=features.redis_retry_s,
        )

    @property
    def up(self) -> bool:
        """False from a failure until Redis answers again."""
        return self._down_until is None

    def redis_key(self, partition: int, key: bytes) -> bytes:
        return self._heads[partition] + key

    # ------------------------------------------------------------------ StateStore

    def readable(self, partition: int) -> Sequence[int]:
        return self._readable

    def read(self, keys: Sequence[tuple[int, bytes]]) -> list[bytes | None]:
        if not keys:
            return []
        if not self.available():
            self.degraded_reads += 1
            raise StateUnavailable("redis is down; retrying later")
        heads = self._heads
        try:
            values = self.client.mget([heads[p] + k for p, k in keys])
        except _ERRORS as exc:
            self._failed("read", exc)
            self.degraded_reads += 1
            raise StateUnavailable(f"redis read failed: {type(exc).__name__}") from exc
        self._succeeded()
        return values

    def write(self, items: Sequence[tuple[int, bytes, bytes]]) -> None:
        self._pending.extend(items)

    async def flush(self) -> None:
        pending, self._pending = self._pending, []
        if not pending:
            return
        if not self.available():
            self.lost_writes += len(pending)
            raise StateUnavailable(f"redis is down; {len(pending)} record write(s) dropped")
        heads, ttl = self._heads, self.ttl_ms
        try:
            pipe = self.client.pipeline(transaction=False)
            for p, k, v in pending:
                pipe.set(heads[p] + k, v, px=ttl)
            pipe.execute()
        except _ERRORS as exc:
            self._failed("flush", exc)
            self.lost_writes += len(pending)
            raise StateUnavailable(
                f"redis flush failed: {type(exc).__name__}; {len(pending)} record write(s) "
                "dropped") from exc
        self._succeeded()

    # ------------------------------------------------------------------ health

    def available(self) -> bool:
        """True if Redis may be tried now (up, or down for retry_s already)."""
        return self._down_until is None or self.clock() >= self._down_until

    def _failed(self, what: str, exc: BaseException) -> None:
        self.failures += 1
        self._down_until = self.clock() + self.retry_s
        # The message names the server, never a key.
        log.warning("redis %s failed (%s: %s); deciding without it for %.1f s",
                    what, type(exc).__name__, exc, self.retry_s)

    def _succeeded(self) -> None:
        if self._down_until is not None:
            self._down_until = None
            self.reconnects += 1
            log.info("redis answers again (%d failure(s) so far)", self.failures)

    def close(self) -> None:
        self.client.close()
