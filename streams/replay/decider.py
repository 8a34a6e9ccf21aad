"""A replay's deciding side: the online learners, rules, both models, the challenger's
decision records and the report's columns, for batches the reading side prepared.

What must run in the range's order across partitions stays with the reader
(:func:`fraudstream.streams.replay.engine.run_replay`): reading, decoding, dedupe and the
features, whose merchant, device and IP partials add up events of every partition. What
is left depends only on each batch and on per-partition state (one online learner per
partition and its feature log), so it can run in a second process, on a second core:
batches reach it in order over a bounded queue, and it decides exactly what one process
would (``tests/test_replay.py`` holds the two equal). With ``processes=1`` the same code
runs in the reader's process.
"""

from __future__ import annotations

import contextlib
import gc
import multiprocessing
import queue
import resource
import traceback
import zlib
from array import array
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any

from confluent_kafka import Producer

from fraudstream.schemas.codec import Codecs, make_registry
from fraudstream.schemas.control import active_version
from fraudstream.schemas.fx import Rates
from fraudstream.scorers.cascade import ModelStage
from fraudstream.scorers.online import OnlineStage
from fraudstream.scorers.registry import ACTIVE, Registry
from fraudstream.state.engine import MemoryStore
from fraudstream.streams.batch import Staged
from fraudstream.streams.control.artifacts import ArtifactTransferError, download
from fraudstream.streams.control.follow import in_force
from fraudstream.streams.control.topic import latest
from fraudstream.streams.pipeline import Limits, Pipeline
from fraudstream.streams.processes import die_with_parent
from fraudstream.streams.replay.ranges import ReplayConfig, ReplayError
from fraudstream.streams.settings import Settings

REPLAY_HEADER = "fraudstream-replay-id"
OUTCOMES = ("approve", "review", "decline", "none")
#: Batches between two freezes of the garbage collector's survivors.
FREEZE_EVERY = 5
#: Prepared batches waiting for the deciding process, at most (each ~0.2 MB pickled).
QUEUE_BATCHES = 8


class Decided:
    """Every decided transaction of the range, both sides, in columns (a million
    transactions take about 100 bytes each, and no object per transaction for the garbage
    collector to walk). Cards are crc32 tokens, never card numbers."""

    def __init__(self) -> None:
        self.transaction_ids: list[str] = []
        self.cards = array("L")
        self.event_times = array("q")
        self.partitions = array("l")
        #: Outcomes as indexes into OUTCOMES ("none": the side did not decide).
        self.champion = bytearray()
        self.challenger = bytearray()
        self.champion_score = array("d")
        self.challenger_score = array("d")

    def __len__(self) -> int:
        return len(self.transaction_ids)

    def add(self, transaction_id: str, card_id: str, event_time: int, partition: int,
            champion: str, champion_score: float, challenger: str,
            challenger_score: float) -> None:
        self.transaction_ids.append(transaction_id)
        self.cards.append(zlib.crc32(card_id.encode()))
        self.event_times.append(event_time)
        self.partitions.append(partition)
        self.champion.append(OUTCOMES.index(champion))
        self.champion_score.append(champion_score)
        self.challenger.append(OUTCOMES.index(challenger))
        self.challenger_score.append(challenger_score)


@dataclass
class DecidedPart:
    """What the deciding side counted, for :class:`~fraudstream.streams.replay.engine.
    ReplayResult`."""

    decided: Decided = field(default_factory=Decided)
    read: int = 0
    duplicates: int = 0
    bad: Counter[str] = field(default_factory=Counter)
    warmup: int = 0
    fallbacks: Counter[str] = field(default_factory=Counter)
    #: Milliseconds spent per pipeline stage (decode, dedupe, features, rules, model, total).
    stage_ms: Counter[str] = field(default_factory=Counter)
    bad_labels: int = 0
    published: int = 0
    #: Peak RSS of the deciding process, when it is its own (MB; None: it was not).
    peak_rss_mb: float | None = None


def champion_in_force(settings: Settings, registry: Registry) -> str | None:
    """The champion a replay compares against unless one is named: the active version in
    force on the control topic (what every worker serves), else the registry's ACTIVE
    version (a deployment that promotes in one shared folder)."""
    return active_version(latest(settings, "model")) or registry.pointer(ACTIVE)


def load_models(settings: Settings, config: ReplayConfig) -> tuple[Any, Any]:
    """The champion (:func:`champion_in_force` unless named) and the challenger, each
    fetched from the artifacts topic when the registry folder lacks it (a replay on
    another machine than the training); :class:`ReplayError` if either is missing or
    refused."""
    registry = Registry(settings.scoring.models_dir)
    champion = config.champion or champion_in_force(settings, registry)
    if champion is None:
        raise ReplayError(f"no --champion, no model state published on "
                          f"{settings.topics.control} and no ACTIVE version in "
                          f"{registry.root}")
    loaded = []
    for version in (champion, config.challenger):
        if version not in registry.versions():
            try:
                registry.root.mkdir(parents=True, exist_ok=True)
                download(settings, version, registry.root)
            except (ArtifactTransferError, LookupError) as exc:
                raise ReplayError(f"no version {version!r} in {registry.root}, and none "
                                  f"to fetch: {exc}") from None
        try:
            loaded.append(registry.load(version))
        except Exception as exc:  # a refused artifact: say why
            raise ReplayError(f"version {version} cannot be loaded: {exc}") from exc
    return loaded[0], loaded[1]


def replay_codecs(settings: Settings) -> Codecs:
    c = settings.codec
    return Codecs(make_registry(c.registry_url, c.registry_username, c.registry_password),
                  settings.topics)


class DecideSide:
    """Decides prepared batches in order and keeps the report's part of them."""

    def __init__(self, settings: Settings, config: ReplayConfig, out_topic: str,
                 models: tuple[Any, Any] | None = None, freeze: bool = False,
                 rates: Rates | None = None) -> None:
        """``models``: the champion and the challenger, if the caller loaded them (else
        :func:`load_models` loads them); ``rates``: the table the reading side converted
        amounts with, named by the decisions (else the one in force)."""
        #: Freeze the collector's survivors now and then (in a process of its own; in the
        #: reader's, the reader does).
        self.freeze = freeze
        self.codecs = codecs = replay_codecs(settings)
        champion, challenger = models or load_models(settings, config)
        self.store = store = MemoryStore()  # the learners and their feature log
        rules, rates_now = in_force(settings)  # what the workers decide with now
        self.pipeline = Pipeline(
            codecs, rules, replace(Limits.from_settings(settings), rates=rates or rates_now),
            input_format=settings.codec.input_format,
            models=ModelStage(active=champion, shadow=challenger),
            budget_ms=float("inf"),
            online=(OnlineStage(store, settings.scoring.online_max_weight)
                    if config.online else None),
            decision_records=False,  # the champion's verdicts go to the report, not a topic
        )
        self.labels_topic = settings.topics.labels
        self.out_topic = out_topic
        # bounded client queues: a replay reads and writes as fast as it can
        self.producer = Producer({**settings.kafka.client_config(), "linger.ms": 50,
                                  "queue.buffering.max.kbytes": 65536}
                                 ) if config.publish else None
        self.headers = [(REPLAY_HEADER, config.replay_id.encode())]
        self.part = DecidedPart()
        self.batches = 0

    def labelled(self, transaction_ids: Any) -> None:
        """The transactions labels will come for: the feature log keeps only theirs."""
        self.pipeline.feature_log_for = transaction_ids

    def decide(self, role: str, n_records: int, staged: Staged) -> None:
        res = self.pipeline.decide(staged)
        self.store.write(res.feature_writes)
        part = self.part
        for _key, value in res.dead_letters:
            dl = self.codecs.dead_letter.decode(value)
            if dl["source_topic"] == self.labels_topic:
                part.bad_labels += 1
            else:
                part.bad[f"{dl['error_kind']}:{dl['field'] or '-'}"] += 1
        if role == "warmup":
            part.warmup += n_records
        else:
            self._collect(res, n_records)
            if self.producer is not None:
                for key, value in res.shadow:
                    self.producer.produce(self.out_topic, key=key, value=value,
                                          headers=self.headers)
                part.published += len(res.shadow)
                self.producer.poll(0)
        self.batches += 1
        if self.freeze and self.batches % FREEZE_EVERY == 0:
            # The report's columns and the learners' state only grow: what survived a
            # collection moves out of the collector's sight.
            gc.collect()
            gc.freeze()

    def _collect(self, res: Any, n_records: int) -> None:
        """The batch's new decisions of both sides, into the columns of the report."""
        part = self.part
        part.read += n_records
        part.stage_ms.update(res.timings_ms)
        part.duplicates += res.duplicates
        part.fallbacks.update(res.fallbacks)
        challenger = res.shadow_verdicts
        if challenger is None:  # the challenger failed on this batch (counted in fallbacks)
            challenger = [{"decision": "none", "score": float("nan")}] * len(res.verdicts)
        add = part.decided.add
        for (rec, txn), a, b in zip(res.fresh, res.verdicts, challenger, strict=True):
            add(txn["transaction_id"], txn["card_id"], txn["event_time"], rec.partition,
                a["decision"], a["score"], b["decision"], b["score"])

    def finish(self) -> DecidedPart:
        if self.producer is not None and self.producer.flush(60) != 0:
            raise ReplayError("challenger decisions not all delivered")
        return self.part


class RemoteDecider:
    """A :class:`DecideSide` in a child process, behind the same three calls. The child
    is started with ``spawn`` (no copy of this process's threads or client state)."""

    def __init__(self, settings: Settings, config: ReplayConfig, out_topic: str,
                 rates: Rates | None = None) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._inbox: Any = ctx.Queue(maxsize=QUEUE_BATCHES)
        self._outbox: Any = ctx.Queue()
        self._proc = ctx.Process(target=_serve, args=(settings, config, out_topic,
                                                      self._inbox, self._outbox, rates),
                                 name="fraudstream-replay-decider", daemon=True)
        self._proc.start()

    def labelled(self, transaction_ids: Any) -> None:
        self._send(("labelled", transaction_ids))

    def decide(self, role: str, n_records: int, staged: Staged) -> None:
        self._send(("batch", role, n_records, staged))

    def finish(self) -> DecidedPart:
        self._send(("end",))
        while True:
            try:
                kind, payload = self._outbox.get(timeout=0.5)
            except queue.Empty:
                self._check_alive()
                continue
            self._proc.join(30)
            if kind == "error":
                raise ReplayError(payload)
            return payload

    def close(self) -> None:
        """Stop the child if it still runs (the reading side failed, or was interrupted)."""
        if self._proc.is_alive():
            self._proc.terminate()
        self._proc.join(10)
        for q in (self._inbox, self._outbox):
            q.cancel_join_thread()
            q.close()

    def _send(self, message: tuple[Any, ...]) -> None:
        while True:
            try:
                self._inbox.put(message, timeout=0.5)
                return
            except queue.Full:
                self._check_alive()

    def _check_alive(self) -> None:
        """Raise the child's error, or say it died, instead of waiting for it forever."""
        with contextlib.suppress(queue.Empty):
            kind, payload = self._outbox.get_nowait()
            if kind == "error":
                raise ReplayError(payload)
        if not self._proc.is_alive():
            raise ReplayError(f"the replay's deciding process exited ({self._proc.exitcode})"
                              " without its result")


def _serve(settings: Settings, config: ReplayConfig, out_topic: str, inbox: Any,
           outbox: Any, rates: Rates | None = None) -> None:
    """The child process: decide every batch received, then send back the part. What it
    unpickles comes from the queue its parent, this replay, filled: prepared batches of
    decoded and validated transactions, never a record's bytes from a topic."""
    die_with_parent()  # a replay killed outright leaves no deciding process behind
    try:
        gc.set_threshold(50_000, 20, 20)  # as the reading side: batches make many objects
        side = DecideSide(settings, config, out_topic, freeze=True, rates=rates)
        while True:
            message = inbox.get()
            if message[0] == "batch":
                side.decide(*message[1:])
            elif message[0] == "labelled":
                side.labelled(message[1])
            else:
                part = side.finish()
                part.peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
                outbox.put(("done", part))
                return
    except ReplayError as exc:
        outbox.put(("error", str(exc)))
    except BaseException as exc:  # anything else: its traceback, for the reading side
        outbox.put(("error", f"the replay's deciding process failed: {exc!r}\n"
                             + traceback.format_exc()))
