"""``fraudstream features``: the feature vectors of a CSV or Parquet history, computed by
the worker's own feature code (:mod:`fraudstream.state.offline`), written as CSV or Parquet.

Rows are validated as the worker validates transactions; a row that cannot be used is
counted and reported (first ones on stderr), never silently skipped. Feature settings
(``FRAUDSTREAM_FEATURES_ALLOWED_LATENESS_S``, ``..._LABEL_DELAY_S``) are the worker's.
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from fraudstream.schemas.fx import Rates
from fraudstream.schemas.validate import (
    ValidationError,
    mask_pans,
    validate_history_transaction,
    validate_label,
)
from fraudstream.state.features import FEATURE_NAMES, FeatureConfig
from fraudstream.state.offline import OfflineStats, offline_batches
from fraudstream.streams.settings import Settings
from fraudstream.streams.traffic.csv_source import ColumnMapping, CsvMappingError, read_csv_events

ID_COLUMNS = ("transaction_id", "event_time", "card_id", "merchant_id")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", type=Path, help="CSV or Parquet of transactions (labels optional)")
    p.add_argument("--out", type=Path, required=True, help="output .csv or .parquet")
    add_history_arguments(p)
    p.add_argument("--batch", type=int, default=500, help="micro-batch size, as the worker's")


def add_history_arguments(p: argparse.ArgumentParser) -> None:
    """How a history file is read: the column mapping, tokenization, labels and order
    (shared with ``fraudstream train``)."""
    p.add_argument("--map", action="append", default=[], metavar="FIELD=COLUMN",
                   help="column for a field, e.g. --map card_id=cc_num (repeatable)")
    p.add_argument("--default", action="append", default=[], metavar="FIELD=VALUE",
                   help="value for a field the file lacks, e.g. --default currency=USD")
    p.add_argument("--token-key", default=None,
                   help="key for tokenizing card numbers found in the card column")
    p.add_argument("--label-delay-days", type=float, default=3.0,
                   help="when a label becomes known, if the file has no label_time column")
    p.add_argument("--keep-order", action="store_true",
                   help="rows are in arrival order (late events stay late); "
                        "default: sort by event time")


def run(args: argparse.Namespace, settings: Settings) -> int:
    try:
        events = read_csv_events(
            args.input, ColumnMapping.from_flags(args.map, args.default),
            label_delay_days=args.label_delay_days, token_key=args.token_key,
            keep_order=args.keep_order,
        )
    except (CsvMappingError, OSError) as exc:
        print(f"fraudstream features: {exc}", file=sys.stderr)
        return 2
    fs = settings.features
    config = FeatureConfig(allowed_lateness_ms=int(fs.allowed_lateness_s * 1000),
                           label_delay_ms=int(fs.label_delay_s * 1000))
    errors: list[str] = []
    stats = OfflineStats()
    t0 = time.perf_counter()
    batches = offline_batches(checked_events(events, settings, errors), config, args.batch,
                              stats)
    written = _write(args.out, batches)
    took = time.perf_counter() - t0
    for line in errors[:20]:
        print(f"  skipped: {line}", file=sys.stderr)
    print(
        f"{written} feature rows -> {args.out} in {took:.1f} s "
        f"({written / took if took else 0:.0f}/s); {stats.labels} labels, "
        f"{stats.duplicates} duplicate transaction_ids, {stats.late} late, "
        f"{stats.too_late} too late, {len(errors)} rows skipped",
        file=sys.stderr,
    )
    return 0


def checked_events(events: Iterator[tuple[str, dict[str, Any]]], settings: Settings,
             errors: list[str]) -> Iterator[tuple[str, dict[str, Any]]]:
    """Events as the worker would accept them; the others reported in ``errors``."""
    rates = Rates.load(settings.worker.rates_path)
    for kind, record in events:
        if kind == "error":
            errors.append(f"line {record['line']}: {_masked(str(record['reason']))}")
            continue
        try:
            if kind == "transaction":
                yield kind, validate_history_transaction(record, rates,
                                                         settings.worker.max_amount)
            else:
                yield kind, validate_label(record)
        except ValidationError as exc:
            txn_id = _masked(str(record.get("transaction_id")))
            errors.append(f"{kind} {txn_id!r}: {_masked(exc.reason)}")


def _masked(text: str) -> str:
    """``text`` with card-number-like digit runs masked (error lines quote the input)."""
    return (mask_pans(text.encode()) or b"").decode(errors="replace")


def _write(out: Path, batches: Iterator[tuple[list[Mapping[str, Any]], np.ndarray]]) -> int:
    header = [*ID_COLUMNS, *FEATURE_NAMES]
    n = 0
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix.lower() in (".parquet", ".pq"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        schema = pa.schema([("transaction_id", pa.string()), ("event_time", pa.int64()),
                            ("card_id", pa.string()), ("merchant_id", pa.string()),
                            *((name, pa.float64()) for name in FEATURE_NAMES)])
        def write(txns: list[Mapping[str, Any]], X: np.ndarray) -> None:
            ids = [pa.array([t[c] for t in txns], type=schema.field(c).type)
                   for c in ID_COLUMNS]
            writer.write_table(pa.Table.from_arrays(
                [*ids, *(pa.array(X[:, j]) for j in range(X.shape[1]))], schema=schema))

        # Row groups of ~50,000 rows, not one per micro-batch.
        with pq.ParquetWriter(out, schema) as writer:
            txns: list[Mapping[str, Any]] = []
            mats: list[np.ndarray] = []
            for chunk, X in batches:
                txns.extend(chunk)
                mats.append(X)
                if len(txns) >= 50_000:
                    write(txns, np.concatenate(mats))
                    n += len(txns)
                    txns, mats = [], []
            if txns:
                write(txns, np.concatenate(mats))
                n += len(txns)
        return n
    with out.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        for txns, X in batches:
            for txn, row in zip(txns, X.tolist(), strict=True):
                w.writerow([*(txn[c] for c in ID_COLUMNS), *(repr(x) for x in row)])
            n += len(txns)
    return n
