"""``fraudstream generate``: a simulated history as a CSV in arrival order, with the
label columns ``fraudstream features`` and training read (label, fraud_type, label_time).
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path
from typing import Any

from fraudstream.streams.traffic.generator import DAY_MS, generate_history
from fraudstream.streams.traffic.world import GeneratorConfig

COLUMNS = ("transaction_id", "event_time", "card_id", "customer_id", "merchant_id",
           "terminal_id", "amount", "currency", "mcc", "country", "card_country", "lat", "lon",
           "device_id", "ip", "channel", "label", "fraud_type", "label_time")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, required=True, help="CSV file to write")
    p.add_argument("--days", type=float, default=1.0)
    p.add_argument("--per-day", type=int, default=20_000, help="transactions a day")
    p.add_argument("--start", type=float, default=0.0,
                   help="start, epoch seconds (default: --days before now)")
    p.add_argument("--cards", type=int, default=2000)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--late-ratio", type=float, default=0.0,
                   help="share of transactions that arrive late (up to --late-max-s)")
    p.add_argument("--late-max-s", type=float, default=7200.0)
    p.add_argument("--label-delay-days", type=float, default=3.0,
                   help="mean delay before a label is known")


def write_history(args: argparse.Namespace) -> int:
    start_ms = int(args.start * 1000) if args.start else int(time.time() * 1000) - int(
        args.days * DAY_MS)
    config = GeneratorConfig(seed=args.seed, n_cards=args.cards,
                             label_delay_days=args.label_delay_days, id_prefix=f"g{args.seed}")
    txns, labels = generate_history(config, start_ms, args.days, args.per_day,
                                    args.late_ratio, int(args.late_max_s * 1000))
    write_csv(args.out, txns, labels)
    print(f"{len(txns)} transactions, {len(labels)} labels -> {args.out}", file=sys.stderr)
    return 0


def write_csv(path: Path, txns: list[dict[str, Any]], labels: list[dict[str, Any]]) -> None:
    """Transactions in the given (arrival) order, each with its label if it has one."""
    by_id = {lab["transaction_id"]: lab for lab in labels}
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(COLUMNS)
        for t in txns:
            lab = by_id.get(t["transaction_id"])
            row = {**t, "label": "" if lab is None else int(lab["is_fraud"]),
                   "fraud_type": (lab or {}).get("fraud_type") or "",
                   "label_time": "" if lab is None else lab["label_time"]}
            w.writerow(["" if row.get(c) is None else row[c] for c in COLUMNS])
