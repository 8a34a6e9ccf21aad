"""``fraudstream produce``: send generated traffic (or a user's CSV) to ``transactions``
and ``labels``, at a given rate, with a progress line.

Transactions are keyed by card_id (so a card's events stay in one partition, as the
velocity features need), labels too. The Kafka timestamp is the send time.
"""

from __future__ import annotations

import argparse
import itertools
import random
import signal
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
from confluent_kafka import Producer

from fraudstream.schemas.codec import Codecs, make_registry
from fraudstream.streams.settings import Settings
from fraudstream.streams.traffic.malformed import MalformedFactory


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rate", type=float, default=500.0, help="events per second (0: unpaced)")
    p.add_argument("--count", type=int, default=0, help="stop after this many transactions")
    p.add_argument("--duration", type=float, default=0.0, help="stop after this many seconds")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--id-prefix", default="",
                   help="transaction_id prefix (default: seed and start time, unique per run)")
    p.add_argument("--format", choices=("avro", "json"), default=None,
                   help="default: FRAUDSTREAM_CODEC_INPUT_FORMAT")
    p.add_argument("--bad-ratio", type=float, default=0.0,
                   help="share of malformed transaction records (demo of the DLQ)")
    p.add_argument("--label-delay-days", type=float, default=None,
                   help="generated traffic: mean delay before a label is known (default 3); "
                        "--csv: when labels became known after their transaction, for a "
                        "file with labels and no label_time column (required then)")
    p.add_argument("--time-compression", type=float, default=1.0,
                   help="label delays are divided by this (86400: a day becomes a second)")
    p.add_argument("--no-labels", action="store_true", help="send transactions only")
    p.add_argument("--csv", type=Path, help="stream this CSV of historical transactions")
    p.add_argument("--map", action="append", default=[], metavar="FIELD=COLUMN",
                   help="CSV column for a field, e.g. --map card_id=cc_num (repeatable)")
    p.add_argument("--default", action="append", default=[], metavar="FIELD=VALUE",
                   help="value for a field the CSV lacks, e.g. --default currency=USD")
    p.add_argument("--speed", type=float, default=0.0,
                   help="event time runs this many times faster than the wall clock (3600: "
                        "an hour per second). CSV: paces by event time (0: use --rate). "
                        "Generated: event time starts in the past, so that it stays behind "
                        "the wall clock for --duration (or 6 h)")
    p.add_argument("--traffic-seed", type=int, default=None,
                   help="generated: other traffic in the same world (default: --seed)")
    p.add_argument("--start-ms", type=int, default=0,
                   help="generated with --speed: event time of the first paced transaction "
                        "(default: far enough back to stay behind the wall clock)")
    p.add_argument("--warmup-days", type=float, default=0.0,
                   help="generated: first send this many days of event time before the "
                        "start, unpaced, so that the worker's state is warm")
    p.add_argument("--hold-after-warmup", action="store_true",
                   help="after the warm-up, print 'warm-up sent N' and wait for SIGUSR1 "
                        "(the demo sends it once the worker decided the warm-up)")
    p.add_argument("--cards", type=int, default=2000,
                   help="generated: size of the card population (size it for the rate: a "
                        "card's genuine gap is cards * speed / rate event-seconds)")
    p.add_argument("--linger-ms", type=float, default=5.0,
                   help="producer batching: fewer, larger record batches (the embedded "
                        "broker's fetch cost grows with the batches it holds)")
    p.add_argument("--token-key", default="fraudstream-demo",
                   help="CSV: key for tokenizing card numbers found in the card column")
    p.add_argument("--quiet", action="store_true", help="no progress line")


class TopicWriter:
    """Encodes and produces transactions, labels and malformed records."""

    def __init__(self, settings: Settings, input_format: str, bad_ratio: float, seed: int,
                 linger_ms: float = 5.0) -> None:
        self.settings = settings
        self.codecs = Codecs(
            make_registry(settings.codec.registry_url, settings.codec.registry_username,
                          settings.codec.registry_password),
            settings.topics,
        )
        self.format = input_format
        self.producer = Producer({**settings.kafka.client_config(), "linger.ms": linger_ms,
                                  "queue.buffering.max.messages": 500_000})
        self.bad_ratio = bad_ratio
        self.rng = random.Random(seed ^ 0x5EED)
        self.malformed = MalformedFactory(self.codecs, input_format,
                                          settings.codec.max_record_bytes)
        self.counts: Counter[str] = Counter()
        self.errors = 0

    def _on_delivery(self, err: Any, _msg: Any) -> None:
        if err is not None:
            self.errors += 1

    def _produce(self, topic: str, key: bytes, value: bytes) -> None:
        while True:
            try:
                self.producer.produce(topic, value=value, key=key, on_delivery=self._on_delivery)
                return
            except BufferError:
                self.producer.poll(0.05)

    def transaction(self, txn: dict[str, Any], bad: bool = True) -> None:
        key = txn["card_id"].encode()
        if bad and self.bad_ratio and self.rng.random() < self.bad_ratio:
            kind = self.rng.choice(sorted(self.malformed.kinds))
            value, _expected = self.malformed.make(kind, txn)
            self.counts[f"bad:{kind}"] += 1
        elif self.format == "json":
            value = orjson.dumps(txn)
        else:
            value = self.codecs.transaction.encode(txn)
        self._produce(self.settings.topics.transactions, key, value)
        self.counts["transactions"] += 1

    def label(self, label: dict[str, Any]) -> None:
        value = orjson.dumps(label) if self.format == "json" else self.codecs.label.encode(label)
        self._produce(self.settings.topics.labels, label["card_id"].encode(), value)
        self.counts["labels"] += 1

    def close(self) -> int:
        left = self.producer.flush(30.0)
        return left + self.errors


def _generated(args: argparse.Namespace) -> Iterator[tuple[str, Any]]:
    from fraudstream.streams.traffic.generator import TrafficGenerator

    gen = TrafficGenerator(generator_config(args))
    wall0 = time.time() * 1000.0
    speed = args.speed
    # Event time S times faster than the wall clock starts in the past, far enough to stay
    # behind the wall clock (the worker refuses event times in the future).
    start_ms = args.start_ms or (wall0 - (args.duration or 6 * 3600) * speed * 1000.0
                                 if speed > 0 else wall0)
    if args.warmup_days > 0:
        from fraudstream.streams.traffic.generator import DAY_MS

        per_ms = args.rate / (speed if speed > 0 else 1.0) / 1000.0  # events per event-ms
        t = start_ms - args.warmup_days * DAY_MS
        rng = random.Random(args.seed ^ 0x3A11)
        while True:
            t += rng.expovariate(per_ms)
            if t >= start_ms:
                break
            yield "warmup", gen.next_transaction(int(t))
            if not args.no_labels:
                for label in gen.due_labels(int(t)):
                    yield "label", label
        yield "warmup_done", None  # the caller may hold here: live event time starts after
    mono0 = time.monotonic()
    while True:
        if speed > 0:
            now_ms = int(min(start_ms + (time.monotonic() - mono0) * speed * 1000.0,
                             time.time() * 1000.0))
        else:
            now_ms = int(time.time() * 1000)
        yield "transaction", gen.next_transaction(now_ms)
        if not args.no_labels:
            for label in gen.due_labels(now_ms):
                yield "label", label


def generator_config(args: argparse.Namespace) -> Any:
    """The generated world of ``--seed``, ``--cards``, label delay and time compression."""
    from fraudstream.streams.traffic.world import GeneratorConfig

    return GeneratorConfig(
        seed=args.seed,
        traffic_seed=getattr(args, "traffic_seed", None),
        n_cards=args.cards,
        label_delay_days=3.0 if args.label_delay_days is None else args.label_delay_days,
        label_delay_spread_days=(3.0 if args.label_delay_days is None
                                 else args.label_delay_days) / 2,
        time_compression=args.time_compression,
        # compressed demos: fraud campaigns play out in minutes, not hours
        campaign_time_scale=20.0 if args.time_compression > 1 else 1.0,
        id_prefix=args.id_prefix or f"t{args.seed}-{int(time.time()) % 1_000_000}",
    )


def _from_csv(args: argparse.Namespace) -> Iterator[tuple[str, Any]]:
    from fraudstream.streams.traffic.csv_source import ColumnMapping, read_csv_events

    mapping = ColumnMapping.from_flags(args.map, args.default)
    yield from read_csv_events(args.csv, mapping, label_delay_days=args.label_delay_days,
                               token_key=args.token_key)


def main(args: argparse.Namespace, settings: Settings) -> int:
    fmt = args.format or settings.codec.input_format
    if args.csv:
        from fraudstream.streams.traffic.csv_source import CsvMappingError

        try:  # a bad mapping is reported before anything is sent
            events = _from_csv(args)
            first = next(events, None)
        except (CsvMappingError, OSError) as exc:
            print(f"fraudstream produce: {args.csv}: {exc}", file=sys.stderr)
            return 2
        events = itertools.chain([first] if first else [], events)
    else:
        events = _generated(args)
    writer = TopicWriter(settings, fmt, args.bad_ratio, args.seed, args.linger_ms)
    signal.signal(signal.SIGTERM, _interrupt)  # stop like Ctrl-C: flush, then report
    signal.signal(signal.SIGUSR1, _release)
    start = time.monotonic()
    last_report = start
    sent = 0
    first_event_ms: int | None = None
    csv_errors = 0
    try:
        for kind, item in events:
            if kind == "error":
                csv_errors += 1
                print(f"skipped CSV line {item['line']}: {item['reason']}", file=sys.stderr)
                continue
            if kind == "label":
                if not args.no_labels:
                    writer.label(item)
                continue
            if kind == "warmup":  # unpaced history before the paced traffic
                writer.transaction(item, bad=False)
                writer.counts["warmup"] += 1
                continue
            if kind == "warmup_done":  # paced traffic (and its event clock) starts next
                if args.hold_after_warmup:
                    _hold(writer)
                start = last_report = time.monotonic()
                continue
            # pacing: by rate, or by event time for CSV --speed
            if args.csv and args.speed > 0:  # CSV: paced by event time
                first_event_ms = first_event_ms or item["event_time"]
                due = (item["event_time"] - first_event_ms) / 1000.0 / args.speed
            else:
                due = sent / args.rate if args.rate > 0 else 0.0
            delay = start + due - time.monotonic()
            if delay > 0.002:
                writer.producer.poll(0)
                time.sleep(delay)
            writer.transaction(item)
            sent += 1
            now = time.monotonic()
            if not args.quiet and now - last_report >= 1.0:
                last_report = now
                _progress(writer, sent, now - start)
            if (args.count and sent >= args.count) or (
                args.duration and now - start >= args.duration
            ):
                break
    except KeyboardInterrupt:
        pass
    failed = writer.close()
    elapsed = time.monotonic() - start
    if not args.quiet:
        _progress(writer, sent, elapsed)
        sys.stderr.write("\n")
    bad = sum(v for k, v in writer.counts.items() if k.startswith("bad:"))
    print(
        f"sent {writer.counts['transactions']} transactions ({bad} malformed, "
        f"{writer.counts['warmup']} of warm-up history), "
        f"{writer.counts['labels']} labels in {elapsed:.1f}s"
        + (f"; {csv_errors} CSV lines skipped" if csv_errors else ""),
        file=sys.stderr,
    )
    if failed:
        print(f"{failed} records were not acknowledged by the broker", file=sys.stderr)
        return 1
    return 0


def _interrupt(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


_released: list[bool] = []


def _release(_signum: int, _frame: object) -> None:
    _released.append(True)


def _hold(writer: TopicWriter, timeout_s: float = 900.0) -> None:
    """Flush the warm-up, say how much was sent, and wait for SIGUSR1 (or the timeout)."""
    writer.producer.flush(60.0)
    print(f"warm-up sent {writer.counts['warmup']}", file=sys.stderr, flush=True)
    end = time.monotonic() + timeout_s
    while not _released and time.monotonic() < end:
        writer.producer.poll(0.05)


def _progress(writer: TopicWriter, sent: int, elapsed: float) -> None:
    rate = sent / elapsed if elapsed > 0 else 0.0
    sys.stderr.write(
        f"\rsent {sent} transactions, {writer.counts['labels']} labels, "
        f"{rate:,.0f}/s, {elapsed:.0f}s   "
    )
    sys.stderr.flush()
