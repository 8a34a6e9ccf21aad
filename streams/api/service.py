"""The Kafka side of ``fraudstream api``: one transaction in, the streamed decision out.

A request's transaction is produced to ``transactions``, keyed by card as every producer
keys it, so the worker that owns the card's partition decides it with the same state and
the same pipeline as any other: the answer is the very record that worker published on
``decisions`` (its bytes, partition and offset are returned with it). A reader thread
tails ``decisions`` from the high watermarks it read at start, and hands each record whose
transaction is awaited here to the request waiting for it; every other record costs one
dictionary lookup.

Why not a reply topic per instance: the worker would publish every decision twice and
learn about callers; tailing ``decisions`` needs nothing from it, and its cost (a lookup
per decision of the whole deployment) is measured in ``loadtest/api.py``.

What a request gets (:meth:`DecisionService.decide`):

- the streamed decision, when it arrives before the deadline;
- when the broker acknowledged the transaction but no decision came in time: a stand-in
  decided locally by the rules in force without velocity features, flagged ``fallback``
  with ``fallback:timeout`` among its reasons. The streamed decision still follows on
  ``decisions`` for the record, and the stand-in (what the caller acted on) goes to
  ``decisions.standins``, keyed by transaction like ``decisions``, once per answer
  remembered (a retry answered from memory publishes nothing);
- when the broker did not acknowledge the transaction in time, or refused it:
  :class:`Unavailable` (a 503): nothing was decided for the caller to rely on;
- past ``max_pending`` requests in flight: :class:`Overloaded` (a 429), at once;
- a retry of a transaction_id answered here: the first answer, remembered; one still in
  flight: the same answer as the first request, when it comes. A retry this instance
  does not remember (another instance, or forgotten) goes to the stream again, where the
  workers' dedupe state returns the first decision.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition

from fraudstream.scorers.rules import RulesScorer
from fraudstream.streams.settings import Settings
from fraudstream.streams.topics import take_available

log = logging.getLogger("fraudstream.api")


class Overloaded(Exception):
    """Too many requests in flight: answer 429 with Retry-After."""


class Unavailable(Exception):
    """The broker did not take the transaction in time (or refused it): answer 503."""


@dataclass
class Answer:
    """What a request is answered with: the decision as JSON-ready fields, where it came
    from (``stream`` or ``standin``), and how long each step took (Server-Timing)."""

    decision: dict[str, Any]
    source: str
    #: sha256 of the record published on ``decisions``, and where it was (stream only).
    sha256: str | None = None
    partition: int | None = None
    offset: int | None = None
    marks_ms: dict[str, float] = field(default_factory=dict)
    #: True for a retry answered from memory.
    replayed: bool = False


class _Pending:
    """One transaction in flight: the request(s) waiting for it."""

    __slots__ = ("acked", "decided", "started")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.acked: asyncio.Future[str | None] = loop.create_future()  # None, or the error
        self.decided: asyncio.Future[tuple[bytes, int, int]] = loop.create_future()
        self.started = time.perf_counter()


def _set(fut: asyncio.Future[Any], value: Any) -> None:
    if not fut.done():
        fut.set_result(value)


def _set_all(results: list[tuple[asyncio.Future[Any], Any]]) -> None:
    for fut, value in results:
        _set(fut, value)


def json_ready(decision: dict[str, Any]) -> dict[str, Any]:
    """A decoded decision with its times as epoch milliseconds (the topic's longs)."""
    out = {}
    for k, v in decision.items():
        out[k] = int(v.timestamp() * 1000) if isinstance(v, datetime) else v
    return out


class DecisionService:
    """Produces transactions, reads decisions, answers requests (see the module doc).
    :meth:`start` and :meth:`stop` run outside the event loop; :meth:`decide` on it."""

    def __init__(self, settings: Settings, codecs: Any, rules: Callable[[], RulesScorer],
                 clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.api = settings.api
        self.codecs = codecs
        #: The rules in force (the control topic's latest), for stand-ins.
        self.rules = rules
        self.clock = clock
        self.loop: asyncio.AbstractEventLoop | None = None
        self._pending: dict[bytes, _Pending] = {}
        self._answers: OrderedDict[str, Answer] = OrderedDict()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._producer: Producer | None = None
        self._consumer: Consumer | None = None
        #: Set once the reader is positioned on every partition of ``decisions``.
        self.reading = threading.Event()
        #: When the reader last came back from the broker (monotonic), for /healthz.
        self.reader_beat = time.monotonic()
        #: Decisions read, and of them those a request here was waiting for.
        self.read = 0
        self.matched = 0
        #: Stand-ins the broker took on ``decisions.standins``, and those it did not
        #: (refused, or not taken within the producer's timeout: logged each).
        self.standins_published = 0
        self.standins_unpublished = 0

    # -- lifecycle (outside the loop) ------------------------------------------------
    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        kafka = self.settings.kafka
        self._producer = Producer({
            **kafka.client_config(), "acks": "all", "linger.ms": 0,
            # A request waits at most its deadline; a record the broker has not taken
            # by then is not retried for minutes behind the caller's back.
            "message.timeout.ms": max(1000, int(self.api.max_timeout_ms) + 1000),
            "queue.buffering.max.messages": max(10_000, 4 * self.api.max_pending),
        })
        self._consumer = Consumer({
            **kafka.consumer_config(f"fraudstream-api-{id(self):x}"),
            "fetch.wait.max.ms": self.api.fetch_max_wait_ms,
            "enable.partition.eof": False,
        })
        self._threads = [
            threading.Thread(target=self._deliveries, name="api-deliveries", daemon=True),
            threading.Thread(target=self._reader, name="api-decisions", daemon=True),
        ]
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(5.0)
        if self._producer is not None:
            self._producer.flush(5.0)
        if self._consumer is not None:
            self._consumer.close()

    def alive(self) -> bool:
        """Both Kafka threads run, and the reader came back from the broker in the last
        30 s (it does every 0.1 s while it reads)."""
        return all(t.is_alive() for t in self._threads) and (
            not self.reading.is_set() or time.monotonic() - self.reader_beat < 30.0)

    # -- threads ---------------------------------------------------------------------
    def _deliveries(self) -> None:
        assert self._producer is not None
        while not self._stop.is_set():
            self._producer.poll(0.05)

    def _position(self) -> None:
        """Assign every partition of ``decisions`` at its high watermark, read now: a
        decision of a transaction produced after this is never missed."""
        assert self._consumer is not None
        topic = self.settings.topics.decisions
        meta = self._consumer.list_topics(topic, timeout=10).topics.get(topic)
        if meta is None or meta.error is not None or not meta.partitions:
            raise LookupError(f"topic {topic!r} not found")
        parts = []
        for p in sorted(meta.partitions):
            _low, high = self._consumer.get_watermark_offsets(TopicPartition(topic, p),
                                                              timeout=10)
            parts.append(TopicPartition(topic, p, high))
        self._consumer.assign(parts)

    def _reader(self) -> None:
        assert self._consumer is not None
        while not self._stop.is_set() and not self.reading.is_set():
            try:
                self._position()
                self.reading.set()
            except (KafkaException, LookupError) as exc:
                log.warning("api: cannot position the decisions reader yet: %s", exc)
                self._stop.wait(1.0)
        consumer, pending = self._consumer, self._pending
        while not self._stop.is_set():
            msgs = take_available(consumer, 0.1, 5000)
            self.reader_beat = time.monotonic()
            self.read += len(msgs)
            found = []
            for m in msgs:
                if m.error() is not None:  # partition EOF is not enabled: a real error
                    log.warning("api: decisions reader: %s", m.error())
                    continue
                waiting = pending.get(m.key())
                if waiting is not None:
                    found.append((waiting.decided, (m.value(), m.partition(), m.offset())))
            if found:  # one wake-up of the event loop for all of them
                self.matched += len(found)
                self.loop.call_soon_threadsafe(_set_all, found)  # type: ignore[union-attr]

    # -- requests (on the loop) ------------------------------------------------------
    def ready(self) -> tuple[bool, str]:
        if not self.reading.is_set():
            return False, "the decisions reader is not positioned yet"
        if not self.alive():
            return False, "a Kafka thread stopped"
        return True, "reading decisions"

    def remembered(self, transaction_id: str) -> Answer | None:
        answer = self._answers.get(transaction_id)
        if answer is None:
            return None
        self._answers.move_to_end(transaction_id)
        return Answer(answer.decision, answer.source, answer.sha256, answer.partition,
                      answer.offset, {}, replayed=True)

    def _remember(self, transaction_id: str, answer: Answer) -> None:
        if self.api.remember <= 0:
            return
        self._answers[transaction_id] = answer
        if len(self._answers) > self.api.remember:
            self._answers.popitem(last=False)

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    async def decide(self, txn: dict[str, Any], encoded: bytes, deadline: float) -> Answer:
        """The answer for a validated transaction (``encoded`` as the topic takes it) by
        ``deadline`` (``time.perf_counter()``); raises :class:`Overloaded` or
        :class:`Unavailable` (see the module doc)."""
        txn_id = txn["transaction_id"]
        first = self.remembered(txn_id)
        if first is not None:
            return first
        key = txn_id.encode()
        pending = self._pending.get(key)
        if pending is None:
            if len(self._pending) >= self.api.max_pending:
                raise Overloaded(f"{len(self._pending)} requests in flight")
            pending = self._produce(txn, key, encoded)
        t0 = pending.started
        marks: dict[str, float] = {}
        try:
            await asyncio.wait_for(asyncio.shield(pending.acked),
                                   max(0.0, deadline - time.perf_counter()))
        except TimeoutError:
            self._forget(key, pending)
            raise Unavailable("the broker did not acknowledge the transaction in time") \
                from None
        error = pending.acked.result()
        if error is not None:
            self._forget(key, pending)
            raise Unavailable(f"the broker refused the transaction: {error}")
        marks["produce"] = (time.perf_counter() - t0) * 1000.0
        # Answer with the stand-in a little before the deadline: computing and sending
        # it takes well under this margin.
        wait = deadline - 0.003 - time.perf_counter()
        try:
            value, partition, offset = await asyncio.wait_for(asyncio.shield(pending.decided),
                                                              max(0.0, wait))
        except TimeoutError:
            return self._finish(key, txn_id, pending, self._standin(txn, marks))
        marks["decision"] = (time.perf_counter() - t0) * 1000.0
        return self._finish(key, txn_id, pending, Answer(
            json_ready(self.codecs.decision.decode(value)), "stream",
            hashlib.sha256(value).hexdigest(), partition, offset, marks))

    def _produce(self, txn: dict[str, Any], key: bytes, encoded: bytes) -> _Pending:
        assert self.loop is not None and self._producer is not None
        pending = _Pending(self.loop)
        loop = self.loop

        def delivered(err: Any, _msg: Any) -> None:
            loop.call_soon_threadsafe(_set, pending.acked, None if err is None else str(err))

        # Registered before it is produced: its decision cannot come before we look.
        self._pending[key] = pending
        try:
            self._producer.produce(self.settings.topics.transactions, value=encoded,
                                   key=txn["card_id"].encode(), on_delivery=delivered)
        except (BufferError, KafkaException) as exc:
            del self._pending[key]
            raise Unavailable(f"the producer cannot take the transaction: {exc}") from None
        return pending

    def _forget(self, key: bytes, pending: _Pending) -> None:
        if self._pending.get(key) is pending:
            del self._pending[key]

    def _finish(self, key: bytes, txn_id: str, pending: _Pending, answer: Answer) -> Answer:
        """The first answer for this transaction is remembered and returned; a concurrent
        retry (waiting on the same transaction, with its own deadline) that ends second
        answers with the first one too."""
        self._forget(key, pending)
        first = self.remembered(txn_id)
        if first is not None:
            return first
        self._remember(txn_id, answer)
        if answer.source == "standin":  # after this answer is sent, not before
            self.loop.call_soon(self._publish_standin, answer.decision)  # type: ignore[union-attr]
        return answer

    def _publish_standin(self, decision: dict[str, Any]) -> None:
        assert self._producer is not None
        txn_id = decision["transaction_id"]

        def delivered(err: Any, _msg: Any) -> None:  # in the deliveries thread
            if err is None:
                self.standins_published += 1
            else:
                self._standin_lost(txn_id, str(err))

        try:
            value = self.codecs.decision.encode(decision)
        except Exception as exc:  # fastavro's errors: counted and logged, never raised here
            self._standin_lost(txn_id, f"cannot encode it: {type(exc).__name__}: {exc}")
            return
        try:
            self._producer.produce(self.settings.topics.decisions_standins, value=value,
                                   key=txn_id.encode(), on_delivery=delivered)
        except (BufferError, KafkaException) as exc:
            self._standin_lost(txn_id, str(exc))

    def _standin_lost(self, txn_id: str, why: str) -> None:
        self.standins_unpublished += 1
        log.error("api: the stand-in answered for transaction %s is not on %s: %s", txn_id,
                  self.settings.topics.decisions_standins, why)

    def _standin(self, txn: dict[str, Any], marks: dict[str, float]) -> Answer:
        scorer = self.rules()
        score = scorer.score_batch([txn])[0]
        now_ms = int(self.clock() * 1000)
        decision = {
            "transaction_id": txn["transaction_id"], "card_id": txn["card_id"],
            "decision": str(score.outcome), "score": float(score.score),
            "reasons": [*score.reasons, "fallback:timeout"],
            "model_version": scorer.version, "stage": "rules", "fallback": True,
            "timings_ms": dict(marks), "late_ms": 0.0, "event_time": txn["event_time"],
            "source_timestamp": now_ms, "decided_at": now_ms, "amount": txn["amount"],
            "currency": txn["currency"], "amount_ref": round(txn["amount_ref"], 4),
            "rules_version": scorer.ruleset.version, "variant": None,
        }
        return Answer(decision, "standin", marks_ms=marks)
