"""``fraudstream tail TOPIC``: print, or export to a file, the decoded records of a topic.

Follow mode (none of ``--from``, ``--to``, ``--until-idle``): new records (all of them with
``--from-beginning``) as they arrive, until ``--count`` records (default 10; 0: no limit) or
Ctrl-C, as tail always did.

Export mode (any of ``--from``, ``--to``, ``--until-idle``): the records of a range of
Kafka timestamps, then the command ends by itself. The range follows Kafka's
``offsets_for_times`` meaning, as ``fraudstream replay`` does: on each partition it starts
at the first record whose timestamp is at or after ``--from`` (reading is sought there)
and ends before the first record at or after ``--to`` (that partition is then done). The
export ends when every partition is done, or when no record arrived for ``--until-idle``
seconds (default :data:`DEFAULT_IDLE_S`): a partition whose newest record is older than
``--to`` cannot tell that it is done, so the wait is what ends it. With
``--from-beginning --until-idle S`` it exports the whole topic.

Formats: ``jsonl`` (one JSON object per record, as tail always printed) or ``csv`` (a
header of the topic's Avro schema fields in schema order; maps and arrays as compact JSON
in one cell, timestamps as ISO 8601 UTC, bytes as the same text as in jsonl, null as an
empty cell). A record that cannot be decoded is never dropped silently: jsonl writes it as
``{"undecodable": reason, "partition": p, "offset": o}``, csv writes that to stderr. A
one-line summary goes to stderr at the end.

Card numbers: decisions, labels and transactions carry card tokens and dead letters are
masked by the worker, but the input topics are whatever producers wrote, so every string
and bytes value is masked again here (:func:`fraudstream.schemas.validate.mask_pans`) before it is
written: a raw card number never reaches the output.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import re
import signal
import sys
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any, TextIO

import orjson
from confluent_kafka import OFFSET_BEGINNING, OFFSET_END, Consumer, KafkaException, TopicPartition

from fraudstream.schemas.codec import AvroCodec, Codecs, DecodeError, make_registry, schema_text
from fraudstream.schemas.validate import mask_pans
from fraudstream.streams.settings import Settings
from fraudstream.streams.topics import offsets_at

#: Seconds without a record after which an export (``--from`` or ``--to`` given, no
#: ``--until-idle``) ends. Far longer than the first fetch after the partitions are
#: assigned (well under a second on the embedded broker and on a healthy cluster) and than
#: the gaps between a live worker's decision batches, so a quiet 5 s means the topic has
#: nothing more; short enough for scripts. It is only paid when some partition has no
#: record past ``--to`` (yet): a range in the past of a busy topic ends without it.
DEFAULT_IDLE_S = 5.0
#: Records read per poll; the output is flushed after each poll.
BATCH = 500
FOLLOW_COUNT = 10
#: ``fraudstream tail --help`` (plain text, for a terminal).
DESCRIPTION = f"""\
Print the decoded records of a topic, or export a range of them to a file.

Without --from, --to or --until-idle it follows the topic: new records (all of
them with --from-beginning) as they arrive, until --count records or Ctrl-C.

With any of these it exports, then ends by itself. Each partition is read from
its first record with a Kafka timestamp at or after --from, up to (excluded)
its first record at or after --to. The export ends when every partition has
reached --to, or when no record arrived for --until-idle seconds (default
{DEFAULT_IDLE_S:g}). A summary line goes to stderr.

  fraudstream tail decisions --format csv --out decisions.csv \\
      --from 2026-01-05T00:00:00Z --to 2026-01-06T00:00:00Z"""
#: A string worth passing to the card-number mask (13 or more digits in a run).
_MAYBE_PAN = re.compile(r"[0-9][0-9 -]{11,}[0-9]")


class TailError(Exception):
    """Arguments or a topic that tail cannot work with."""


class _Terminated(Exception):
    """SIGTERM: stop as on Ctrl-C (the output flushed, the summary printed)."""


def _on_sigterm(signum: int, frame: object) -> None:
    raise _Terminated


def parse_time(text: str) -> int:
    """Epoch milliseconds of an ISO 8601 time with a zone, or of ``@<epoch ms>``."""
    text = text.strip()
    if text.startswith("@") and text[1:].lstrip("-").isdigit():
        return int(text[1:])
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise TailError(f"{text!r} is neither an ISO 8601 time nor @<epoch ms>") from None
    if when.tzinfo is None:
        raise TailError(f"time {text!r} has no time zone (add Z or +00:00)")
    return int(when.timestamp() * 1000)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("topic", help="topic name: decisions, transactions.dlq, transactions, "
                                 "labels, drift, decisions.shadow, decisions.standins")
    p.add_argument("--format", choices=("jsonl", "csv"), default="jsonl",
                   help="jsonl: one JSON object a line; csv: a header of the schema's "
                        "fields, then a row a record (default: jsonl)")
    p.add_argument("--out", type=Path, default=None, metavar="FILE",
                   help="write the records to FILE (default: standard output)")
    p.add_argument("--from", dest="start", default=None, metavar="TIME",
                   help="export from each partition's first record with a Kafka timestamp "
                        "at or after TIME: ISO 8601 with a zone (2026-01-05T00:00:00Z) or "
                        "@<epoch ms>")
    p.add_argument("--to", dest="end", default=None, metavar="TIME",
                   help="stop each partition at its first record at or after TIME "
                        "(excluded)")
    p.add_argument("--until-idle", type=float, default=None, metavar="SECONDS",
                   help="end once no record arrived for this long (default with --from or "
                        f"--to: {DEFAULT_IDLE_S:g})")
    p.add_argument("--from-beginning", action="store_true",
                   help="start at each partition's oldest record (default: only new ones)")
    p.add_argument("--count", type=int, default=None,
                   help=f"stop after this many records (default: {FOLLOW_COUNT} when "
                        "following, no limit in an export; 0: no limit)")


@dataclass
class Plan:
    """What one tail run does, from its arguments."""

    start_ms: int | None
    end_ms: int | None
    idle_s: float | None  # None: follow until --count or Ctrl-C
    count: int  # 0: no limit
    export: bool

    @staticmethod
    def from_args(args: argparse.Namespace) -> Plan:
        start = parse_time(args.start) if args.start is not None else None
        end = parse_time(args.end) if args.end is not None else None
        if start is not None and args.from_beginning:
            raise TailError("--from and --from-beginning exclude each other")
        if start is not None and end is not None and end <= start:
            raise TailError("--to must come after --from")
        if args.until_idle is not None and args.until_idle <= 0:
            raise TailError("--until-idle must be positive")
        if args.count is not None and args.count < 0:
            raise TailError("--count must be 0 or more")
        export = start is not None or end is not None or args.until_idle is not None
        idle = args.until_idle if args.until_idle is not None else (
            DEFAULT_IDLE_S if export else None)
        count = args.count if args.count is not None else (0 if export else FOLLOW_COUNT)
        return Plan(start, end, idle, count, export)


def _text(data: bytes) -> str:
    return (mask_pans(data) or b"").decode("utf-8", "replace")


def plain(value: Any) -> Any:
    """A decoded Avro value as JSON-ready data: card numbers masked in every string and
    bytes value, bytes as UTF-8 text, timestamps as ISO 8601 UTC."""
    if isinstance(value, str):
        return _text(value.encode()) if _MAYBE_PAN.search(value) else value
    if isinstance(value, bytes):
        return _text(value)
    if isinstance(value, datetime):
        return (value.astimezone(UTC) if value.tzinfo else value.replace(tzinfo=UTC)).isoformat()
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, dict):
        return {plain(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    return value


def csv_cell(value: Any) -> Any:
    """One CSV cell of a :func:`plain` value."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict | list):
        return orjson.dumps(value).decode()
    return value


class _Writer:
    def __init__(self, out: TextIO, fmt: str, fields: list[str]) -> None:
        self.out = out
        self.fields = fields
        self.csv = csv.writer(out, lineterminator="\n") if fmt == "csv" else None
        if self.csv is not None:
            self.csv.writerow(fields)

    def record(self, record: dict[str, Any]) -> None:
        rec = plain(record)
        if self.csv is not None:
            self.csv.writerow([csv_cell(rec.get(f)) for f in self.fields])
        else:
            self.out.write(orjson.dumps(rec).decode() + "\n")

    def undecodable(self, reason: str, partition: int, offset: int) -> None:
        reason = _text(reason.encode())
        if self.csv is not None:
            print(f"undecodable record at partition {partition} offset {offset}: {reason}",
                  file=sys.stderr)
        else:
            self.out.write(orjson.dumps({"undecodable": reason, "partition": partition,
                                         "offset": offset}).decode() + "\n")


def _codec(codecs: Codecs, settings: Settings, topic: str) -> AvroCodec | None:
    topics = settings.topics
    return {
        topics.transactions: codecs.transaction,
        topics.labels: codecs.label,
        topics.decisions: codecs.decision,
        topics.decisions_shadow: codecs.decision,
        topics.decisions_standins: codecs.decision,
        topics.dlq: codecs.dead_letter,
        topics.drift: codecs.drift_event,
        topics.features: codecs.feature_vector,
    }.get(topic)


def _start_offsets(consumer: Consumer, topic: str, partitions: list[int], plan: Plan,
                   from_beginning: bool) -> list[TopicPartition]:
    if plan.start_ms is None:
        where = OFFSET_BEGINNING if from_beginning else OFFSET_END
        return [TopicPartition(topic, p, where) for p in partitions]
    # records before --from are skipped as they are read
    return [TopicPartition(topic, p, offset)
            for p, offset in offsets_at(consumer, topic, partitions, plan.start_ms).items()]


def _open(path: Path | None) -> tuple[TextIO, bool]:
    if path is None:
        return io.TextIOWrapper(sys.stdout.buffer, encoding="utf-8", newline="",
                                line_buffering=False), False
    return open(path, "w", encoding="utf-8", newline=""), True  # noqa: SIM115


def main(args: argparse.Namespace, settings: Settings) -> int:
    try:
        plan = Plan.from_args(args)
    except TailError as exc:
        print(f"fraudstream tail: {exc}", file=sys.stderr)
        return 2
    codecs = Codecs(
        make_registry(settings.codec.registry_url, settings.codec.registry_username,
                      settings.codec.registry_password),
        settings.topics,
    )
    codec = _codec(codecs, settings, args.topic)
    if codec is None:
        known = (settings.topics.transactions, settings.topics.labels, settings.topics.decisions,
                 settings.topics.decisions_shadow, settings.topics.decisions_standins,
                 settings.topics.dlq, settings.topics.drift,
                 settings.topics.features)
        print(f"fraudstream tail: unknown topic {args.topic!r}; one of {', '.join(known)}",
              file=sys.stderr)
        return 2
    fields = [f["name"] for f in json.loads(schema_text(codec.name))["fields"]]
    consumer = Consumer(settings.kafka.consumer_config(f"fraudstream-tail-{uuid.uuid4().hex[:8]}"))
    try:
        meta = consumer.list_topics(args.topic, timeout=10).topics.get(args.topic)
        if meta is None or meta.error is not None or not meta.partitions:
            raise TailError(f"topic {args.topic!r} not found")
        partitions = sorted(meta.partitions)
        consumer.assign(_start_offsets(consumer, args.topic, partitions, plan,
                                       args.from_beginning))
        out, is_file = _open(args.out)
    except (TailError, KafkaException, OSError) as exc:
        consumer.close()
        print(f"fraudstream tail: {exc}", file=sys.stderr)
        return 2
    started = {p: plan.start_ms is None for p in partitions}
    done: set[int] = set()
    written: Counter[int] = Counter()
    undecodable = 0
    ended = ""
    rc = 0
    writer = _Writer(out, args.format, fields)
    last_record = time.monotonic()
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        while True:
            lines = sum(written.values()) + undecodable
            if plan.count and lines >= plan.count:
                ended = f"--count {plan.count} reached"
                break
            if len(done) == len(partitions):
                ended = "every partition reached --to"
                break
            wait = 0.5
            if plan.idle_s is not None:
                quiet = time.monotonic() - last_record
                if quiet >= plan.idle_s:
                    ended = f"no record for {plan.idle_s:g} s"
                    break
                wait = min(wait, plan.idle_s - quiet)
            want = min(BATCH, plan.count - lines) if plan.count else BATCH
            for msg in consumer.consume(want, wait):
                if msg.error():
                    continue
                p = msg.partition()
                if p in done:
                    continue
                last_record = time.monotonic()
                ts_type, ts = msg.timestamp()
                ts = ts if ts_type and ts >= 0 else 0
                if not started[p]:
                    if ts < plan.start_ms:
                        continue
                    started[p] = True
                if plan.end_ms is not None and ts >= plan.end_ms:
                    done.add(p)
                    consumer.pause([TopicPartition(args.topic, p)])
                    continue
                try:
                    record = codec.decode(msg.value() or b"")
                except DecodeError as exc:
                    writer.undecodable(exc.reason, p, msg.offset())
                    undecodable += 1
                    continue
                writer.record(record)
                written[p] += 1
            out.flush()  # what was read is in the output, should the command be killed
    except (KeyboardInterrupt, _Terminated) as exc:
        # an export cut short says so in its exit status; following ends this way
        ended = "Ctrl-C" if isinstance(exc, KeyboardInterrupt) else "SIGTERM"
        rc = 130 if plan.export else 0
    except BrokenPipeError:  # e.g. piped into head
        ended = "output closed"
    finally:
        signal.signal(signal.SIGTERM, previous)
        consumer.close()
        try:
            out.flush()
        except BrokenPipeError:
            ended = "output closed"
        if ended == "output closed" and not is_file:
            # what is still buffered cannot be written: drop it, not a traceback at exit
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        if is_file:
            out.close()
        else:
            out.detach()
    total = sum(written.values())
    per = ", ".join(f"{p}: {written[p]}" for p in partitions)
    dest = str(args.out) if args.out is not None else "stdout"
    bad = f"{undecodable} undecodable" + (
        " (written as undecodable lines)" if undecodable and args.format == "jsonl"
        else " (on stderr)" if undecodable else "")
    print(f"fraudstream tail {args.topic}: {total} records written to {dest} "
          f"(partition {per}); {bad}; ended: {ended}", file=sys.stderr)
    return rc
