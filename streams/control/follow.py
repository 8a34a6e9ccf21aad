"""A worker follows the control topic: the rules in force are the latest published
rules it accepts, swapped in between two batches; the model versions in force are fetched
into its models folder and pointed at there, where the model watcher loads them.

At start the worker reads the topic to its end before it decides anything, so a restarted
worker resumes with the rules in force (the rules file, ``FRAUDSTREAM_SCORING_RULES_PATH``,
serves only while nothing was published). Then a thread follows the topic and hands each
accepted change to the batch loop (:meth:`ControlFollower.take`). A record that cannot be
applied (not a control record, a document that fails validation, a blocklist file not
inlined, a value like a raw card number, a digest that does not match) is refused with a
warning naming it, and counted; the rules in force stay. Changes are read as the audit
records replay them (:class:`~fraudstream.schemas.control.Heads`): a change made from a
state that another change replaced first is superseded, refused and counted the same way.

A canary rollout (key ``canary``, :mod:`fraudstream.scorers.canary`) is applied the same
way: the canary version fetched and loaded in the follower's thread, then handed to the
batch loop with the rollout's step (:meth:`ControlFollower.take_canary`), so a step, a
rollback or an abort changes which cards the canary serves from the next batch. A rollout
record that cannot be applied stops the canary: the champion serves every card.

An exchange-rates table (key ``rates``, :mod:`fraudstream.schemas.fx`) is checked as the
rates file is, and handed over the same way (:meth:`ControlFollower.take_rates`): amounts
of the next batch convert with it. A table in another reference currency than the rates
file's is refused: the amounts in the feature state, the rules' thresholds and the models
are in that one.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

from confluent_kafka import Consumer, KafkaException, Message

from fraudstream.schemas.control import (
    REPEATED,
    SUPERSEDED,
    ControlError,
    ControlRecord,
    Heads,
    audit_kind,
    decode,
    is_audit,
)
from fraudstream.schemas.fx import Rates, RatesError
from fraudstream.scorers.canary import Rollout
from fraudstream.scorers.registry import ACTIVE, SHADOW, Registry
from fraudstream.scorers.rules import RuleSet, RulesScorer
from fraudstream.scorers.rules_file import RulesError
from fraudstream.streams.control.artifacts import download
from fraudstream.streams.control.topic import control_consumer, read_to_end
from fraudstream.streams.settings import Settings

log = logging.getLogger("fraudstream.worker")


class ControlFollower:
    """The control topic as one worker applies it: :meth:`initial` at start, then a
    thread (:meth:`start`); the batch loop takes new rules with :meth:`take`."""

    def __init__(self, settings: Settings, catch_up_s: float = 30.0,
                 models: bool = True) -> None:
        self.settings = settings
        #: Whether model states are applied (a worker), or only rules read (a replay).
        self.models = models
        self.topic = settings.topics.control
        self.catch_up_s = catch_up_s
        self._consumer: Consumer | None = None
        self._lock = threading.Lock()
        self._pending: RulesScorer | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        #: Control records refused, by kind (they changed nothing in force).
        self.refused: Counter[str] = Counter()
        #: Rules versions applied from the topic, in order.
        self.applied: list[str] = []
        #: The changes in force, as every reader of the topic replays them.
        self.heads = Heads()
        self._models_msgs: list[Message] = []
        self._canary_msg: Message | None = None
        #: The rollout to serve and its canary version, loaded (None, None: no canary).
        self._canary_pending: tuple[Rollout | None, Any] | None = None
        #: The rates table in force (after :meth:`initial`: the latest accepted on the
        #: topic, else the rates file's), and one accepted since the last :meth:`take_rates`.
        self.rates: Rates | None = None
        self._rates_pending: Rates | None = None

    def initial(self, from_file: RuleSet, rates: Rates | None = None) -> RulesScorer:
        """The rules to start with: the latest accepted on the topic, else the file's; and
        :attr:`rates` likewise (``rates``: the rates file's table, loaded if not given)."""
        self.rates = rates if rates is not None else Rates.load(
            self.settings.worker.rates_path)
        try:
            self._consumer = control_consumer(self.settings, "control")
        except (LookupError, KafkaException) as exc:
            log.warning("control: %s; rules from %s only", exc,
                        self.settings.scoring.rules_path)
            return RulesScorer(from_file)
        latest = None
        for msg in read_to_end(self._consumer, self.catch_up_s):
            latest = self._accept(msg, announce=False) or latest
        # The latest model state that applies, as running workers kept it: a refused one
        # changed nothing in force on them either.
        for msg in reversed(self._models_msgs):
            if self._apply_models(msg):
                break
        self._models_msgs = []
        if self._canary_msg is not None:
            self._apply_canary(self._canary_msg)
        if latest is None:
            log.warning("rules: version %s from %s (nothing published on %s)",
                        from_file.version, self.settings.scoring.rules_path, self.topic)
            return RulesScorer(from_file)
        scorer, where, record = latest
        log.warning("rules: version %s from %s, published by %s at %s (%s)",
                    scorer.ruleset.version, where, record.published_by,
                    _iso(record.published_at), record.reason)
        return scorer

    def start(self) -> None:
        """Follow the topic in a thread (after :meth:`initial`)."""
        if self._consumer is None or self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="control-follower",
                                        daemon=True)
        self._thread.start()

    def take(self) -> RulesScorer | None:
        """The rules accepted since the last call, if any (between two batches)."""
        with self._lock:
            scorer, self._pending = self._pending, None
        return scorer

    def take_rates(self) -> Rates | None:
        """The rates table accepted since the last call, if any (between two batches)."""
        with self._lock:
            table, self._rates_pending = self._rates_pending, None
        return table

    def take_canary(self) -> tuple[Rollout | None, Any] | None:
        """The rollout (and its loaded canary) changed since the last call, if it did."""
        with self._lock:
            change, self._canary_pending = self._canary_pending, None
        return change

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5.0)
        elif self._consumer is not None:
            self._consumer.close()  # never followed: the thread would have closed it
            self._consumer = None


    def _run(self) -> None:
        consumer = self._consumer
        assert consumer is not None
        try:
            while not self._stop.is_set():
                for msg in consumer.consume(100, 0.5):
                    if msg.error() is not None:
                        continue
                    accepted = self._accept(msg)
                    if accepted is not None:
                        with self._lock:
                            self._pending = accepted[0]
        except Exception:  # the rules in force stay; say why following stopped
            log.exception("control: following %s stopped", self.topic)
        finally:
            consumer.close()

    def _accept(self, msg: Message, announce: bool = True
                ) -> tuple[RulesScorer, str, ControlRecord] | None:
        key = msg.key()
        if not is_audit(key):  # the state copy: its audit record is the change
            return None
        where = f"{self.topic} offset {msg.offset()}"
        try:
            record = decode(msg.value())
        except ControlError as exc:
            kind = audit_kind(key)
            if kind in _EVERYONE or self.models:
                self.refused[kind] += 1
                log.warning("control: refused the %s record at %s: %s; what is in force "
                            "stays", kind, where, exc)
            return None
        verdict = self.heads.offer(record)
        if verdict == REPEATED or record.kind not in _EVERYONE and not self.models:
            return None
        if verdict == SUPERSEDED:
            # Counted as it happens; at start (the history read again) only logged: its
            # publisher was told, and every restart would raise the alert again.
            if announce:
                self.refused[record.kind] += 1
            log.log(logging.WARNING if announce else logging.INFO,
                    "control: the %s change %s at %s (by %s: %s) was made from a state "
                    "another change replaced first: not applied", record.kind,
                    record.version, where, record.published_by, record.reason)
            return None
        if record.kind == "model":
            if announce:
                self._apply_models(msg)
            else:
                self._models_msgs.append(msg)  # at start: the latest that applies
            return None
        if record.kind == "canary":
            if announce:
                self._apply_canary(msg)
            else:
                self._canary_msg = msg  # at start: the latest
            return None
        if record.kind == "rates":
            self._apply_rates(record, where, announce)
            return None
        try:
            ruleset = RuleSet.from_document(record.document, source=where)
        except RulesError as exc:
            self.refused["rules"] += 1
            log.warning("control: refused the rules at %s: %s; the rules in force stay",
                        where, exc)
            return None
        self.applied.append(ruleset.version)
        if announce:
            log.warning("rules: version %s from %s, published by %s at %s (%s); in force "
                        "from the next batch", ruleset.version, where, record.published_by,
                        _iso(record.published_at), record.reason)
        return RulesScorer(ruleset), where, record

    def _apply_models(self, msg: Message) -> bool:
        """The model versions in force: each one fetched from the artifacts topic into
        this worker's models folder if it is not there, then the folder's pointers set;
        the model watcher loads them as it loads a local promotion."""
        where = f"{self.topic} offset {msg.offset()}"
        root = self.settings.scoring.models_dir
        try:
            record = decode(msg.value())
            doc = record.document
            if not isinstance(doc, dict) or not isinstance(doc.get("active"), str) or \
                    not isinstance(doc.get("shadow"), str | None):
                raise ControlError("a model state needs 'active' (a version) and 'shadow' "
                                   "(a version or null)")
            root.mkdir(parents=True, exist_ok=True)
            registry = Registry(root)
            for version in (doc["active"], doc["shadow"]):
                if version is not None and version not in registry.versions():
                    download(self.settings, version, root)
            if registry.pointer(ACTIVE) != doc["active"]:
                registry.promote(doc["active"])
            if registry.pointer(SHADOW) != doc["shadow"]:
                registry.shadow(doc["shadow"])
        except Exception as exc:  # nothing is pointed at before every version is here
            # and checked (download), so a refused state changes nothing in force
            self.refused["model"] += 1
            log.warning("control: refused the model state at %s: %s; the models in force "
                        "stay", where, exc)
            return False
        log.warning("models: active %s, shadow %s, from %s, published by %s at %s (%s)",
                    doc["active"], doc["shadow"], where, record.published_by,
                    _iso(record.published_at), record.reason)
        return True

    def _apply_rates(self, record: ControlRecord, where: str, announce: bool) -> None:
        """A rates table: checked as the rates file is, in the reference currency of the
        table in force (the file's, see the module doc); then in force (at start) or handed
        to the batch loop."""
        assert self.rates is not None  # set by initial() before any record is read
        try:
            document = record.document
            if not isinstance(document, dict):
                raise RatesError("the document is not a table")
            table = Rates.from_mapping(document, where)
            if table.reference != self.rates.reference:
                raise RatesError(
                    f"amounts in {table.reference}, but this deployment's are in "
                    f"{self.rates.reference} (its feature state, rules and models): another "
                    "reference currency takes a new rates file and retrained models")
        except RatesError as exc:
            self.refused["rates"] += 1
            log.warning("control: refused the rates table at %s: %s; the rates in force "
                        "stay", where, exc)
            return
        moved = table.moved_from(self.rates)
        self.rates = table
        if announce:
            with self._lock:
                self._rates_pending = table
        log.log(logging.WARNING if announce else logging.INFO,
                "rates: table %s (%d currencies) from %s, published by %s at %s (%s)%s%s",
                table.version, len(table.units_per_ref), where, record.published_by,
                _iso(record.published_at), record.reason,
                "; in force from the next batch" if announce else "",
                f"; against the table before: {moved}" if moved else "")

    def _apply_canary(self, msg: Message) -> None:
        """The rollout in force: its canary version fetched (if need be), loaded and
        checked here, off the batch loop, then handed over with the step."""
        where = f"{self.topic} offset {msg.offset()}"
        root = self.settings.scoring.models_dir
        try:
            record = decode(msg.value())
            rollout = Rollout.from_document(record.document)
            model = None
            if rollout.share > 0.0:
                root.mkdir(parents=True, exist_ok=True)
                registry = Registry(root)
                if rollout.version not in registry.versions():
                    download(self.settings, rollout.version, root)
                model = registry.load(rollout.version, sealed=True)
        except Exception as exc:  # a canary that cannot be served serves no card
            self.refused["canary"] += 1
            log.warning("control: refused the rollout at %s: %s; the champion serves every "
                        "card", where, " ".join(str(exc).split()))
            with self._lock:
                self._canary_pending = (None, None)
            return
        with self._lock:
            self._canary_pending = (rollout, model)
        log.warning("canary: rollout %s %s, step %d of %d, %s of cards on %s (champion %s), "
                    "from %s", rollout.rollout, rollout.status, rollout.step + 1,
                    len(rollout.steps), f"{rollout.share:.0%}", rollout.version,
                    rollout.champion, where)


#: The kinds every follower applies; the others (model states, rollouts) only a worker's.
_EVERYONE = ("rules", "rates")


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=UTC).isoformat(timespec="seconds")


def rules_in_force(settings: Settings) -> RulesScorer:
    """The rules a worker starting now would decide with (the latest accepted on the
    control topic, else the rules file's), without following the topic or touching the
    models folder: for a replay."""
    return in_force(settings)[0]


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """The follower's lines held back to errors while a command reads what is in force:
    the command says it in its own words, not a worker's."""
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def in_force(settings: Settings) -> tuple[RulesScorer, Rates]:
    """The rules and the rates table a worker starting now would decide with (the latest
    accepted on the control topic, else the files'), without following the topic or
    touching the models folder: for a replay or a retraining."""
    follower = ControlFollower(settings, models=False)
    try:
        rules = follower.initial(RuleSet.load(settings.scoring.rules_path))
        assert follower.rates is not None
        return rules, follower.rates
    finally:
        follower.stop()
