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
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from fraudstream.state.features import FEATURE_NAMES, FeatureConfig
from fraudstream.state.offline import OfflineStats, offline_batches
from fraudstream.streams.cli.history_input import (
    HistorySource,
    add_history_arguments,
    history_events,
    rates_table,
)
from fraudstream.streams.settings import Settings
from fraudstream.streams.traffic.csv_source import CsvMappingError

ID_COLUMNS = ("transaction_id", "event_time", "card_id", "merchant_id")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", type=Path, help="CSV or Parquet of transactions (labels optional)")
    p.add_argument("--out", type=Path, required=True, help="output .csv or .parquet")
    add_history_arguments(p)
    p.add_argument("--batch", type=int, default=500, help="micro-batch size, as the worker's")


def run(args: argparse.Namespace, settings: Settings) -> int:
    t0 = time.perf_counter()
    errors: list[str] = []
    try:
        rates = rates_table(args, settings, "features")
        events = history_events(HistorySource.from_args(args, settings, rates), errors,
                                args.reader)
    except (CsvMappingError, OSError) as exc:
        print(f"fraudstream features: {exc}", file=sys.stderr)
        return 2
    fs = settings.features
    config = FeatureConfig(allowed_lateness_ms=int(fs.allowed_lateness_s * 1000),
                           label_delay_ms=int(fs.label_delay_s * 1000))
    stats = OfflineStats()
    batches = offline_batches(events, config, args.batch, stats)
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
        def table(txns: list[Mapping[str, Any]], X: np.ndarray) -> pa.Table:
            ids = [pa.array([t[c] for t in txns], type=schema.field(c).type)
                   for c in ID_COLUMNS]
            return pa.Table.from_arrays(
                [*ids, *(pa.array(X[:, j]) for j in range(X.shape[1]))], schema=schema)

        # Row groups of ~50,000 rows, not one per micro-batch. Each one is encoded and
        # written on a thread (pyarrow lets go of the GIL) while the next is computed.
        pending: Future[None] | None = None
        with pq.ParquetWriter(out, schema) as writer, ThreadPoolExecutor(1) as pool:
            def write(txns: list[Mapping[str, Any]], mats: list[np.ndarray]) -> None:
                nonlocal pending
                t = table(txns, np.concatenate(mats))
                if pending is not None:
                    pending.result()
                pending = pool.submit(writer.write_table, t)

            txns: list[Mapping[str, Any]] = []
            mats: list[np.ndarray] = []
            for chunk, X in batches:
                txns.extend(chunk)
                mats.append(X)
                if len(txns) >= 50_000:
                    write(txns, mats)
                    n += len(txns)
                    txns, mats = [], []
            if txns:
                write(txns, mats)
                n += len(txns)
            if pending is not None:
                pending.result()
        return n
    with out.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        for txns, X in batches:
            for txn, row in zip(txns, X.tolist(), strict=True):
                w.writerow([*(txn[c] for c in ID_COLUMNS), *(repr(x) for x in row)])
            n += len(txns)
    return n
