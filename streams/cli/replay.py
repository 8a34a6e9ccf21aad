"""``fraudstream replay``: flags, progress bar and report (the work is streams/replay/engine.py)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fraudstream.streams.settings import Settings


def add_range_arguments(p: argparse.ArgumentParser, warmup: bool = True) -> None:
    """A range of ``transactions`` (shared by ``replay`` and ``retrain``)."""
    p.add_argument("--from", dest="start", required=True,
                   help="first offset (an integer, on every partition) or time "
                        "(ISO 8601 with a zone, or @<epoch ms>), included")
    p.add_argument("--to", dest="end", default=None,
                   help="end offset or time, excluded (default: the end of each partition)")
    p.add_argument("--event-time", action="store_true",
                   help=f"times in --from, --to{' and --warmup-from' if warmup else ''} are "
                        "transactions' event times (default: Kafka record timestamps)")
    p.add_argument("--partitions", default=None,
                   help="comma-separated partitions of transactions (default: all)")


def partitions_of(text: str | None) -> list[int] | None:
    return [int(x) for x in text.split(",")] if text else None


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_range_arguments(p)
    p.add_argument("--challenger", required=True,
                   help="model version to try (fetched from the artifacts topic when the "
                        "registry folder lacks it)")
    p.add_argument("--champion", default=None,
                   help="default: the active version in force on the control topic, else "
                        "the registry's ACTIVE version")
    p.add_argument("--warmup-from", default=None,
                   help="offset or time before --from: state is built from there, "
                        "without deciding")
    p.add_argument("--topic", default=None,
                   help="topic for the challenger's decisions (default: decisions.shadow)")
    p.add_argument("--no-publish", action="store_true", help="write the report only")
    p.add_argument("--online", choices=("learn", "off"), default="learn",
                   help="online learners: start empty and learn the range's labels, or none")
    p.add_argument("--models", type=Path, default=None,
                   help="model registry folder (default: FRAUDSTREAM_SCORING_MODELS_DIR)")
    p.add_argument("--batch", type=int, default=500, help="records per micro-batch")
    p.add_argument("--processes", type=int, choices=(1, 2), default=2,
                   help="2: decide in a second process, on a second core, while this one "
                        "reads and computes the features; 1: all in one process")
    p.add_argument("--replay-id", default=None, help="default: time and a random suffix")
    p.add_argument("--out", type=Path, default=None,
                   help="report folder (default: replays/<replay id>)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace, settings: Settings) -> int:
    from tqdm import tqdm

    from fraudstream.streams.replay.engine import run_replay
    from fraudstream.streams.replay.ranges import Bound, ReplayConfig, ReplayError
    from fraudstream.streams.replay.report import write_report

    if args.models is not None:
        settings = settings.replace(scoring={"models_dir": args.models})
    try:
        config = ReplayConfig(
            challenger=args.challenger, champion=args.champion,
            start=Bound.parse(args.start, args.event_time),
            end=Bound.parse(args.end, args.event_time) if args.end else None,
            warmup=Bound.parse(args.warmup_from, args.event_time) if args.warmup_from
            else None,
            partitions=partitions_of(args.partitions),
            topic=args.topic, publish=not args.no_publish, online=args.online == "learn",
            batch=args.batch, processes=args.processes)
        if args.replay_id:
            config.replay_id = args.replay_id
        bar = tqdm(unit=" txn", desc=f"replay {config.replay_id}", file=sys.stderr,
                   disable=args.quiet, mininterval=0.5)
        try:
            result = run_replay(settings, config, progress=bar.update)
        finally:
            bar.close()
    except (ReplayError, ValueError) as exc:
        print(f"fraudstream replay: {exc}", file=sys.stderr)
        return 2
    folder = args.out or Path("replays") / config.replay_id
    data = write_report(result, folder)
    c = data["counts"]
    print(f"replay {config.replay_id}: {c['read']:,} records, {c['decided']:,} decided, "
          f"{c['duplicates']:,} repeats, {c['bad']:,} bad; {data['flipped']:,} decisions "
          f"flip; {data['records_per_s']:,.0f} records/s")
    print(f"report: {folder / 'report.md'}")
    return 0
