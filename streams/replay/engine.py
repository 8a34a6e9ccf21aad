"""``fraudstream replay``: a range of ``transactions`` through a champion and a challenger.

The replay reads the range with its own consumer: partitions assigned by hand, offsets
never committed, so the live workers' group never sees it. It rebuilds the features from
empty in its own memory (optionally warmed up on an earlier stretch of the topic), and
runs the live worker's :class:`fraudstream.streams.pipeline.Pipeline`: dedupe, features,
rules (those in force on the control topic, as a worker starting now would take them),
the champion as the active model and the challenger as the shadow, each through the same
cascade (thresholds, guardrails, online blend). It writes the challenger's decisions to
``decisions.shadow`` (or ``--topic``), each with a ``fraudstream-replay-id`` header; it
never writes to ``decisions``, the dead-letter topic or the live state.

Order: the partitions' records are merged as the live worker decides them. Merchant,
device and IP features add up events across partitions, so this order is what makes them
match live ones. With event-time alignment on (``FRAUDSTREAM_WORKER_ALIGN_WAIT_MS`` above
0, the default) that is event time: the earliest transaction next, ties to the lower
partition, each partition keeping its own order, as
:class:`fraudstream.streams.worker.align.Aligner` merges them. With alignment off it is
Kafka timestamp order, how a worker without it meets live traffic.

Range bounds (``--from``, ``--to``, ``--warmup-from``): an integer is an offset, used on
every chosen partition; anything else is a time (ISO 8601, or ``@<epoch ms>``). Times
follow Kafka's ``offsets_for_times`` meaning (a partition's range starts at its first
record whose Kafka timestamp is at or after the time), resolved on the records read: the
embedded broker answers that lookup only to the record batch. ``--from`` is included and
``--to`` is not; without ``--to`` the range ends at the end of each partition when the
replay starts. With ``--event-time`` the times are transactions' event times: a history
loaded in one go has Kafka timestamps of the load, and a fraud team names its windows in
event time. Event times are not indexed, so each partition is read from its start; the
range is the transactions with an event time in ``[from, to)``; a partition ends at its
first record past ``to`` by more than ``FRAUDSTREAM_FEATURES_ALLOWED_LATENESS_S``, and
records met after the range began that are outside it feed the state (a worker would have
met them), not the report.

Labels: the ``labels`` records (co-partitioned with ``transactions``) reach the features
and the online learners, read from 31 days (by Kafka timestamp) before the first record
read (the merchant fraud features count the labels of the last 30 days, which a replay
starting from empty state would otherwise miss) to the end of the range; in event-time
order each goes before the first transaction batch past ``label_time`` +
``FRAUDSTREAM_FEATURES_LABEL_DELAY_S``, as the aligner places it, and in Kafka order
before the first batch past its timestamp. The
quality measures use every label of the range's transactions, up to the end of the topic;
a transaction without a label counts as genuine (labels are chargebacks and a sample of
confirmations).

No deadline: a replay scores every transaction (a live worker would fall back on a late
batch), so fallbacks in a replay are the model's own (``nan``, ``error``) or degraded
features. The online learners start empty (``--online learn``, as a worker started at
``--from`` would) or are left out on both sides (``--online off``).

Two processes (``processes=2``, the default): this one reads the range, decodes, finds
repeats and computes the features, in the order above; a second one
(:mod:`fraudstream.streams.replay.decider`) takes each prepared batch in turn and runs the
rest (online learners, rules, both models, the challenger's records, the report's
columns). The decisions are those of one process (``processes=1``), on two cores.

A replay is restartable, not resumable: the same arguments give the same decisions and
report, and a second run writes its challenger decisions again under its own id.
"""

from __future__ import annotations

import bisect
import gc
import resource
import time
from dataclasses import dataclass, field, fields, replace
from typing import Any

from fraudstream.schemas.codec import Codecs, DecodeError, decode_json
from fraudstream.schemas.fx import Rates
from fraudstream.schemas.validate import ValidationError
from fraudstream.state.engine import FeatureConfig, FeatureEngine, MemoryStore
from fraudstream.streams.control.follow import in_force
from fraudstream.streams.pipeline import Limits, Pipeline, RawRecord, dedupe_key
from fraudstream.streams.replay.decider import (
    FREEZE_EVERY,
    OUTCOMES,
    REPLAY_HEADER,
    Decided,
    DecidedPart,
    DecideSide,
    RemoteDecider,
    load_models,
    replay_codecs,
)
from fraudstream.streams.replay.ranges import (
    EventTimeOf,
    RangeReader,
    ReplayConfig,
    ReplayError,
    read_labels,
)
from fraudstream.streams.settings import Settings
from fraudstream.streams.worker.align import record_times

__all__ = ["LABEL_LOOKBACK_MS", "OUTCOMES", "REPLAY_HEADER", "Decided", "ReplayResult",
           "event_time_of", "run_replay"]

#: Labels this far before the first record read are fed too: the merchant fraud features
#: count the labels of the last 30 complete days.
LABEL_LOOKBACK_MS = 31 * 86_400_000


@dataclass(kw_only=True)
class ReplayResult(DecidedPart):
    """The deciding side's part (what was decided and counted), and what the reading side
    knows: the range, the labels, the time taken."""

    config: ReplayConfig
    champion: str
    challenger: str
    labels_fed: int = 0
    #: transaction_id -> is_fraud, every label read for the range's transactions.
    labels: dict[str, bool] = field(default_factory=dict)
    seconds: float = 0.0
    ranges: dict[int, tuple[int, int | None]] = field(default_factory=dict)
    #: Peak RSS of the reading process (the deciding one's, when apart: ``peak_rss_mb``).
    reading_peak_rss_mb: float = 0.0
    #: (records read, labels fed, seconds) after each batch: the rate over the run.
    marks: list[tuple[int, int, float]] = field(default_factory=list)

    def add(self, part: DecidedPart) -> None:
        for f in fields(DecidedPart):
            setattr(self, f.name, getattr(part, f.name))


def reading_pipeline(settings: Settings, codecs: Codecs, partitions: int, rates: Rates
                     ) -> tuple[Pipeline, MemoryStore]:
    """The live worker's pipeline up to the features (:meth:`Pipeline.prepare`), on a
    fresh in-memory state; the caller writes each batch's ``feature_writes`` to the
    store, as the worker's committer does; amounts converted with ``rates``. It decides
    nothing: no rules, no model."""
    fs = settings.features
    store = MemoryStore(partitions)
    engine = FeatureEngine(
        FeatureConfig(allowed_lateness_ms=int(fs.allowed_lateness_s * 1000),
                      label_delay_ms=int(fs.label_delay_s * 1000)), store)
    return Pipeline(codecs, None, replace(Limits.from_settings(settings), rates=rates),
                    input_format=settings.codec.input_format, features=engine,
                    budget_ms=float("inf")), store


def run_replay(settings: Settings, config: ReplayConfig, progress: Any = None) -> ReplayResult:
    """Replay the range; ``progress(n)`` is called with the records read per batch."""
    out_topic = config.topic or settings.topics.decisions_shadow
    if out_topic in (settings.topics.decisions, settings.topics.dlq,
                     settings.topics.transactions, settings.topics.labels):
        raise ReplayError(f"a replay never writes to {out_topic!r}: name another --topic")
    if config.processes not in (1, 2):
        raise ReplayError(f"processes: 1 or 2, not {config.processes}")
    models = load_models(settings, config)  # refused here, before reading
    champion, challenger = (m.version for m in models)
    codecs = replay_codecs(settings)
    group = f"fraudstream-replay-{config.replay_id}"
    w = settings.worker
    # An aligned worker decides in event time: so does the replay (see the module doc).
    by_event_time = w.align_wait_ms > 0 and not w.repartition
    reader = RangeReader(settings, config, group, event_time_of(settings, codecs),
                         by_event_time)
    label_delay_ms = int(settings.features.label_delay_s * 1000)
    # Amounts converted as the workers convert them now: with the rates table in force,
    # which the deciding side names in its decisions (one table for both sides).
    rates = in_force(settings)[1]
    pipeline, store = reading_pipeline(settings, codecs, max(reader.partitions) + 1, rates)
    result = ReplayResult(config=config, champion=champion, challenger=challenger)
    result.ranges = {p: (r.first, r.stop) for p, r in reader.ranges.items()}
    seen: set[bytes] = set()  # dedupe keys decided: a repeat is counted, not decided again

    def lookup(_partition: int, keys: list[bytes]) -> list[bytes | None]:
        return [b"" if k in seen else None for k in keys]

    labels: list[RawRecord] | None = None
    label_times: list[int] = []
    fed = batches = read = 0
    thresholds = gc.get_threshold()
    gc.set_threshold(50_000, 20, 20)  # fewer young collections: batches make many objects
    t0 = time.monotonic()
    decider: DecideSide | RemoteDecider | None = None
    try:
        # The deciding process loads the versions named here, not ACTIVE again (it may
        # have moved meanwhile); in this process, the models already loaded.
        decider = (RemoteDecider(settings, replace(config, champion=champion), out_topic,
                                 rates) if config.processes == 2
                   else DecideSide(settings, config, out_topic, models, rates=rates))
        del models
        for batch in reader.batches():
            if labels is None:
                labels = read_labels(settings, reader.partitions,
                                     min(rec.timestamp_ms for _, rec, _t in batch)
                                     - LABEL_LOOKBACK_MS, group)
                due_at: dict[int, float] = {}
                for k, lab in enumerate(labels):
                    # every label of the range's transactions, for the measures
                    try:
                        rec = pipeline.read_label(lab)
                    except (DecodeError, ValidationError):
                        due_at[k] = float("-inf")  # counted as a bad label when it is fed
                        continue
                    tid = rec["transaction_id"]
                    result.labels[tid] = result.labels.get(tid, False) or bool(rec["is_fraud"])
                    due_at[k] = rec["label_time"] + label_delay_ms
                # The feature log serves labels looking for their features: the replay
                # knows every label to come, so it logs only the transactions one will read.
                decider.labelled(set(result.labels))
                if by_event_time:  # as the aligner: when they start to count
                    order = sorted(range(len(labels)), key=lambda k: (due_at[k], k))
                    labels = [labels[k] for k in order]
                    label_times = [due_at[k] for k in order]
                else:
                    label_times = [lab.timestamp_ms for lab in labels]
            until = bisect.bisect_right(label_times, max(t for _, _r, t in batch))
            due, fed = labels[fed:until], max(fed, until)
            result.labels_fed += len(due)
            for role, records in _runs(batch):
                if not records and not due:
                    continue
                staged = pipeline.prepare(records, lookup, due)
                due = []
                store.write(staged.out.feature_writes)
                # the deciding side writes its own state (learners, feature log) only
                staged.out.feature_writes = []
                if staged.out.features is not None:
                    staged.out.features.writes = []
                seen.update(dedupe_key(txn) for _rec, txn in staged.fresh)
                decider.decide(role, len(records), staged)
            if progress is not None:
                progress(len(batch))
            read += len(batch)
            result.marks.append((read, result.labels_fed, time.monotonic() - t0))
            batches += 1
            if batches % FREEZE_EVERY == 0:
                # The state only grows: what survived a collection moves out of the
                # collector's sight, or every full collection would walk the whole replay
                # again (that doubled the cost per record).
                gc.collect()
                gc.freeze()
        result.add(decider.finish())
    finally:
        gc.unfreeze()
        gc.set_threshold(*thresholds)
        reader.close()
        if isinstance(decider, RemoteDecider):
            decider.close()
    result.seconds = time.monotonic() - t0
    result.reading_peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result


def _runs(batch: list[tuple[str, RawRecord, float]]) -> list[tuple[str, list[RawRecord]]]:
    """The batch as runs of one role, in order (warm-up records come first in each
    partition; with event-time bounds, records outside the range that feed the state can
    come between the range's)."""
    runs: list[tuple[str, list[RawRecord]]] = []
    for role, rec, _t in batch:
        if runs and runs[-1][0] == role:
            runs[-1][1].append(rec)
        else:
            runs.append((role, [rec]))
    return runs or [("range", [])]


def event_time_of(settings: Settings, codecs: Codecs) -> EventTimeOf:
    """A transaction record's event time, as the worker's aligner reads it."""
    avro = settings.codec.input_format == "avro"
    decode = codecs.transaction.decode if avro else decode_json
    of = record_times(decode, decode, settings.topics.transactions, 0,
                      codecs.transaction.event_time if avro else None)
    topic = settings.topics.transactions
    return lambda value: of(topic, value)
