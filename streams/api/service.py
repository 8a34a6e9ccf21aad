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
  flight: the same answer as the first request, when it comes.
- a retry of a transaction another instance answered with a stand-in: that stand-in.
  Every instance reads ``decisions.standins`` next to ``decisions`` (from
  ``standins_lookback_s`` back at start) and remembers the stand-ins it reads, so a caller
  whose retry a load balancer sends elsewhere gets what it was first answered with, not
  the streamed decision that followed. A request waiting here for that transaction is
  answered with it as soon as it is read.
- any other retry this instance does not remember (forgotten, or answered from the stream
  by another instance) goes to the stream again, where the workers' dedupe state returns
  the first decision, the same bytes.

What this does not close: a retry that reaches another instance within the moment
between a stand-in's answer and its record being read there (a produce and a fetch, a
few milliseconds) is decided again; and two instances that each answer a stand-in for
the same transaction (a caller that retried before its first deadline) answered their
callers each with their own. Both are counted where they show (``standins_conflicting``:
a stand-in read for a transaction this instance answered otherwise).
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
from fraudstream.streams.topics import offsets_at, take_available

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
        #: The streamed decision (value, partition, offset), or another instance's stand-in.
        self.decided: asyncio.Future[tuple[bytes, int, int] | Answer] = loop.create_future()
        self.started = time.perf_counter()


def _set(fut: asyncio.Future[Any], value: Any) -> None:
    if not fut.done():
        fut.set_result(value)


def _set_all(results: list[tuple[asyncio.Future[Any], Any]]) -> None:
    for fut, value in results:
        _set(fut, value)


def _verdict(decision: dict[str, Any]) -> tuple[Any, ...]:
    """What a caller acts on in a decision: two stand-ins of the same rules agree on it."""
    return (decision.get("decision"), decision.get("score"), decision.get("stage"),
            decision.get("model_version"), decision.get("rules_version"))


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
        #: Stand-ins read on ``decisions.standins``: remembered for retries (another
        #: instance's, or one this instance had forgotten), answered otherwise here
        #: first (another outcome, score, stage or version), and unreadable (logged).
        self.standins_adopted = 0
        self.standins_conflicting = 0
        self.standins_unreadable = 0
        #: Stand-ins older than this Kafka timestamp are not read (set when positioned).
        self._standins_since = 0

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

    def _partitions(self, topic: str) -> list[int]:
        assert self._consumer is not None
        meta = self._consumer.list_topics(topic, timeout=10).topics.get(topic)
        if meta is None or meta.error is not None or not meta.partitions:
            raise LookupError(f"topic {topic!r} not found")
        return sorted(meta.partitions)

    def _position(self) -> None:
        """Assign every partition of ``decisions`` at its high watermark, read now: a
        decision of a transaction produced after this is never missed; and every
        partition of ``decisions.standins`` from ``standins_lookback_s`` ago."""
        assert self._consumer is not None
        topics = self.settings.topics
        parts = []
        for p in self._partitions(topics.decisions):
            _low, high = self._consumer.get_watermark_offsets(
                TopicPartition(topics.decisions, p), timeout=10)
            parts.append(TopicPartition(topics.decisions, p, high))
        since = int((self.clock() - self.api.standins_lookback_s) * 1000)
        partitions = self._partitions(topics.decisions_standins)
        starts = offsets_at(self._consumer, topics.decisions_standins, partitions, since)
        parts += [TopicPartition(topics.decisions_standins, p, starts[p]) for p in partitions]
        self._standins_since = since
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
        standins_topic = self.settings.topics.decisions_standins
        while not self._stop.is_set():
            msgs = take_available(consumer, 0.1, 5000)
            self.reader_beat = time.monotonic()
            found, standins = [], []
            for m in msgs:
                if m.error() is not None:  # partition EOF is not enabled: a real error
                    log.warning("api: decisions reader: %s", m.error())
                    continue
                if m.topic() == standins_topic:
                    standin = self._read_standin(m)
                    if standin is not None:
                        standins.append(standin)
                    continue
                self.read += 1
                waiting = pending.get(m.key())
                if waiting is not None:
                    found.append((waiting.decided, (m.value(), m.partition(), m.offset())))
            if found:  # one wake-up of the event loop for all of them
                self.matched += len(found)
                self.loop.call_soon_threadsafe(_set_all, found)  # type: ignore[union-attr]
            if standins:
                self.loop.call_soon_threadsafe(self._adopt, standins)  # type: ignore[union-attr]

    def _read_standin(self, m: Any) -> tuple[str, Answer] | None:
        """A record of ``decisions.standins`` as the answer it was (in the reader thread);
        None for one older than the lookback, or unreadable (counted and logged)."""
        if m.timestamp()[1] < self._standins_since:
            return None  # the broker's lookup by time is coarse: it may start earlier
        try:
            decision = json_ready(self.codecs.decision.decode(m.value()))
            txn_id = decision["transaction_id"]
        except Exception as exc:  # a record another writer put there: never raised here
            self.standins_unreadable += 1
            log.error("api: unreadable record at %s[%d]@%d: %s: %s", m.topic(),
                      m.partition(), m.offset(), type(exc).__name__, exc)
            return None
        return txn_id, Answer(decision, "standin", replayed=True)

    def _adopt(self, standins: list[tuple[str, Answer]]) -> None:
        """Stand-ins read on ``decisions.standins`` (on the loop): remembered for retries,
        and the answer of a request here waiting for that transaction. A transaction
        this instance answered first keeps its answer."""
        for txn_id, answer in standins:
            first = self._answers.get(txn_id)
            if first is not None:
                if _verdict(first.decision) != _verdict(answer.decision):
                    self.standins_conflicting += 1
                    log.warning("api: transaction %s was answered here with %s (%s) and "
                                "elsewhere with a stand-in (%s)", txn_id, first.source,
                                first.decision.get("decision"), answer.decision["decision"])
                continue
            self.standins_adopted += 1
            self._remember(txn_id, answer)
            waiting = self._pending.get(txn_id.encode())
            if waiting is not None:
                _set(waiting.decided, answer)

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

    async def decide(self, txn: dict[str, Any], encoded: bytes, deadline: float,
                     rates_version: str | None = None) -> Answer:
        """The answer for a validated transaction (``encoded`` as the topic takes it,
        ``rates_version`` the table it was read with) by ``deadline``
        (``time.perf_counter()``); raises :class:`Overloaded` or :class:`Unavailable` (see
        the module doc)."""
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
            value = await asyncio.wait_for(asyncio.shield(pending.decided), max(0.0, wait))
        except TimeoutError:
            return self._finish(key, txn_id, pending,
                                self._standin(txn, marks, rates_version))
        if isinstance(value, Answer):  # another instance's stand-in, read meanwhile
            return self._finish(key, txn_id, pending, value)
        marks["decision"] = (time.perf_counter() - t0) * 1000.0
        value, partition, offset = value
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
        if answer.source == "standin" and not answer.replayed:  # after it is sent, not before
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

    def _standin(self, txn: dict[str, Any], marks: dict[str, float],
                 rates_version: str | None) -> Answer:
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
            "rates_version": rates_version,
        }
        return Answer(decision, "standin", marks_ms=marks)
