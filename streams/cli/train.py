"""``fraudstream train``: a model artifact from a labelled CSV or Parquet history.

The history is read as ``fraudstream features`` reads it (same column mapping flags), its
features computed by the worker's code, and :func:`fraudstream.scorers.train.train` does the rest.
The
artifact lands in ``--out/<version>/`` (ONNX files, metadata.json, report.md, plots).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from fraudstream.scorers.train import TrainConfig, TrainingError, data_sha256, train
from fraudstream.scorers.windows import WindowError, from_flags
from fraudstream.state.features import FeatureConfig
from fraudstream.streams.cli.history_input import (
    HistorySource,
    add_history_arguments,
    history_events,
    tables,
)
from fraudstream.streams.settings import Settings
from fraudstream.streams.traffic.csv_cells import parse_event_time
from fraudstream.streams.traffic.csv_source import CsvMappingError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", type=Path, help="CSV or Parquet of transactions with labels")
    p.add_argument("--out", type=Path, default=Path("models"), help="model registry folder")
    add_history_arguments(p)
    add_split_arguments(p)
    windows = p.add_argument_group(
        "explicit windows", "event times as ISO-8601 (a date is midnight UTC) or epoch "
        "numbers; each window is [from, to). Given, they replace the fractions: events before "
        "--warmup-from are not read, the others outside the windows feed the features only, "
        "and the models learn only from labels that arrived before --test-from")
    for flag, what in (("--warmup-from", "first event read (features only until --train-from)"),
                       ("--train-from", "default: the first transaction read"),
                       ("--train-to", ""), ("--valid-from", ""), ("--valid-to", ""),
                       ("--test-from", "start it a label delay after --valid-to"),
                       ("--test-to", "default: the end of the history")):
        windows.add_argument(flag, type=_event_time, default=None, metavar="TIME",
                             help=what or None)
    p.add_argument("--trees", type=int, default=300)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def add_split_arguments(p: argparse.ArgumentParser) -> None:
    """Windows by fractions and thresholds (shared by ``train`` and ``retrain``)."""
    p.add_argument("--valid-frac", type=float, default=0.2,
                   help="share of the event-time span for validation (after training)")
    p.add_argument("--test-frac", type=float, default=0.2,
                   help="share of the event-time span for the test window (the last)")
    p.add_argument("--review-rate", type=float, default=0.02,
                   help="share of transactions sent to review or decline (on validation)")
    p.add_argument("--decline-precision", type=float, default=0.9,
                   help="decline only where validation precision reaches this")


def _event_time(value: str) -> int:
    try:
        return parse_event_time(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def run(args: argparse.Namespace, settings: Settings) -> int:
    from tqdm import tqdm

    try:
        windows = from_flags(args.warmup_from, args.train_from, args.train_to, args.valid_from,
                             args.valid_to, args.test_from, args.test_to)
    except WindowError as exc:
        print(f"fraudstream train: {exc}", file=sys.stderr)
        return 2

    errors: list[str] = []
    try:
        rules, rates = tables(args, settings, "train")
        events = history_events(HistorySource.from_args(args, settings, rates), errors,
                                args.reader)
    except (CsvMappingError, OSError) as exc:
        print(f"fraudstream train: {exc}", file=sys.stderr)
        return 2
    fs = settings.features
    config = TrainConfig(
        valid_frac=args.valid_frac, test_frac=args.test_frac, review_rate=args.review_rate,
        decline_precision=args.decline_precision, trees=args.trees, seed=args.seed,
        windows=windows, rates=rates,
        features=FeatureConfig(allowed_lateness_ms=int(fs.allowed_lateness_s * 1000),
                               label_delay_ms=int(fs.label_delay_s * 1000)),
    )
    started = time.monotonic()

    def phase(name: str) -> None:
        bar.close()  # the features are built
        if not args.quiet:
            print(f"{time.monotonic() - started:7.1f} s  {name}", file=sys.stderr, flush=True)

    with tqdm(desc="features", unit=" txn", disable=args.quiet, file=sys.stderr) as bar:
        try:
            meta = train(events, args.out, config,
                         data_sha256([args.input]), rules, progress=bar,
                         phase=phase)
        except TrainingError as exc:
            print(f"fraudstream train: {exc}", file=sys.stderr)
            return 1
    if not args.quiet:
        print(f"{time.monotonic() - started:7.1f} s  done", file=sys.stderr)
    for line in errors[:20]:
        print(f"  skipped: {line}", file=sys.stderr)
    target = args.out / meta["version"]
    print(f"model {meta['version']} -> {target} ({len(errors)} rows skipped)", file=sys.stderr)
    print(json.dumps({"version": meta["version"], "path": str(target),
                      "thresholds": meta["thresholds"], "test": meta["metrics"]["test"]},
                     indent=2))
    print((target / "report.md").read_text(), file=sys.stderr)
    return 0
