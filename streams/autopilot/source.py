"""A range of the live ``transactions`` and ``labels`` topics as a training history: the
events :func:`fraudstream.scorers.train.train` takes, in the order the worker meets them.

Transactions come from :class:`~fraudstream.streams.replay.ranges.RangeReader` (the
replay's reader: the same bounds, offsets or Kafka times or event times, partitions merged
in event time as an aligned worker merges them, a partition paused when it runs ahead),
decoded and validated as the worker validates them; a record the worker would send to the
dead-letter topic is counted in ``errors`` with its reason, never used. Labels of the
range's partitions, from 31 days before the first transaction read (the merchant fraud
features count 30 days of them) to the end of the topic, go in before the first
transaction past their ``label_time``, as a history file's would
(:func:`fraudstream.streams.traffic.generator.arrival_events`); the feature code then
counts each only from ``label_time`` + the label delay, as the worker does. The rest come
after the last transaction: they still give the targets.

Memory: transactions stream through (a few batches buffered per partition); the labels
are held as decoded dicts while they wait, about 0.5 kB each.
"""

from __future__ import annotations

import heapq
from collections import Counter
from collections.abc import Iterator
from typing import Any

from fraudstream.schemas.codec import Codecs, DecodeError, decode_json
from fraudstream.schemas.fx import Rates
from fraudstream.schemas.validate import (
    ValidationError,
    mask_pans,
    validate_history_transaction,
    validate_label,
)
from fraudstream.streams.replay.engine import LABEL_LOOKBACK_MS, event_time_of
from fraudstream.streams.replay.ranges import RangeReader, ReplayConfig, read_labels
from fraudstream.streams.settings import Settings

Event = tuple[str, dict[str, Any]]


def topic_events(settings: Settings, codecs: Codecs, config: ReplayConfig,
                 errors: Counter[str], progress: Any = None, rates: Rates | None = None,
                 labelled: set[str] | None = None) -> Iterator[Event]:
    """Validated ``("transaction", dict)`` and ``("label", dict)`` events of the range.
    ``config`` takes the replay's bounds (``start``, ``end``, ``partitions``, ``batch``);
    unusable records are counted in ``errors`` by ``"<topic> <field>: <reason>"``.
    ``progress(n)`` after each batch of n records. Amounts convert with ``rates`` (default:
    the rates file's table). ``labelled`` is filled with the ids of the transactions that
    have a label before the first transaction is given (for a sampled training set)."""
    avro = settings.codec.input_format == "avro"
    decode = codecs.transaction.decode if avro else decode_json
    decode_label = codecs.label.decode if avro else decode_json
    rates = rates if rates is not None else Rates.load(settings.worker.rates_path)
    max_amount = settings.worker.max_amount
    group = f"fraudstream-retrain-{config.replay_id}"
    reader = RangeReader(settings, config, group, event_time_of(settings, codecs),
                         by_event_time=True)
    waiting: list[tuple[int, int, dict[str, Any]]] = []  # (label_time, order, label)
    labels_read = False
    try:
        for batch in reader.batches():
            if not labels_read:
                labels_read = True
                since = min(rec.timestamp_ms for _, rec, _t in batch) - LABEL_LOOKBACK_MS
                for k, raw in enumerate(read_labels(settings, reader.partitions, since,
                                                    group)):
                    try:
                        label = validate_label(decode_label(raw.value or b""))
                    except (DecodeError, ValidationError) as exc:
                        errors[f"{settings.topics.labels} {_why(exc)}"] += 1
                        continue
                    waiting.append((int(label["label_time"]), k, label))
                    if labelled is not None:
                        labelled.add(str(label["transaction_id"]))
                heapq.heapify(waiting)
            for _role, rec, _t in batch:
                try:
                    txn = validate_history_transaction(decode(rec.value or b""), rates,
                                                       max_amount)
                except (DecodeError, ValidationError) as exc:
                    errors[f"{settings.topics.transactions} {_why(exc)}"] += 1
                    continue
                while waiting and waiting[0][0] <= txn["event_time"]:
                    yield "label", heapq.heappop(waiting)[2]
                yield "transaction", txn
            if progress is not None:
                progress(len(batch))
        while waiting:
            yield "label", heapq.heappop(waiting)[2]
    finally:
        reader.close()


def _why(exc: DecodeError | ValidationError) -> str:
    """The reason, as the dead-letter record would give it, card numbers masked."""
    text = exc.reason if isinstance(exc, ValidationError) else f"{exc.kind}: {exc.reason}"
    return (mask_pans(text.encode()) or b"").decode(errors="replace")
