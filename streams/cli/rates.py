"""``fraudstream rates publish FILE --reason TEXT | history``: the exchange-rates table for
every worker and API instance, through the control topic (``FRAUDSTREAM_TOPICS_CONTROL``),
without a restart.

``publish`` reads the file as a worker reads ``FRAUDSTREAM_WORKER_RATES_PATH``, and checks it
against the table in force (the latest published that a worker accepts, else this
machine's rates file):
- another reference currency is refused: the feature state, the rules' thresholds and the
  models are in the one in force;
- a currency the table in force has and the file lacks is refused unless
  ``--allow-dropped``: that currency's transactions would go to the dead letters;
- the same version with other rates is refused: a version names one table;
- rates that moved by more than 10% are named (a model trained with the table before is
  then flagged by the workers), not refused.

Nothing is written when a check fails (one line on stderr, exit code 2). Workers convert
the amounts of their next batch with the new table; one that starts later starts with it.
``history`` lists every table published, the one in force last.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from fraudstream.schemas.control import ControlRecord
from fraudstream.schemas.fx import Rates, read_file
from fraudstream.scorers.rules import RuleSet
from fraudstream.streams.cli.rules import _not_sent, _who, history, publish_arguments
from fraudstream.streams.control.follow import ControlFollower, quiet
from fraudstream.streams.settings import Settings


def add_arguments(p: argparse.ArgumentParser) -> None:
    q = publish_arguments(p, "check a rates table and put it in force on every worker and "
                             "API instance",
                          "a rates file (TOML), as FRAUDSTREAM_WORKER_RATES_PATH takes",
                          "every table published: when, by whom, which version, why")
    q.add_argument("--allow-dropped", action="store_true",
                   help="publish even if the file lacks currencies the table in force has "
                        "(their transactions then go to the dead letters)")


def run(args: argparse.Namespace, settings: Settings) -> int:
    if args.action == "publish":
        return _publish(args, settings)
    return history(settings, kinds=("rates",))


def _refused(message: str) -> int:
    print(f"fraudstream rates: {message}", file=sys.stderr)
    return 2


def _publish(args: argparse.Namespace, settings: Settings) -> int:
    path: Path = args.file
    document = read_file(path)  # a RatesError is one line (fraudstream.streams.cli.main)
    table = Rates.from_mapping(document, str(path))
    if not args.reason.strip():
        return _refused("--reason must say why")
    # The table in force as a worker reads it (a published table the workers refused is
    # not), and the last change of its kind, which this one is made from (the fence).
    follower = ControlFollower(settings, models=False)
    try:
        with quiet():
            follower.initial(RuleSet.load(settings.scoring.rules_path))
    finally:
        follower.stop()
    now, head = follower.rates, follower.heads.get("rates")
    assert now is not None
    if head is not None and head.version != now.version:
        print(f"note: the last table published ({head.version}) is not in force (the "
              f"workers refused it; see their logs): {now.version} is", file=sys.stderr)
    if table.reference != now.reference:
        return _refused(f"{path}: amounts in {table.reference}, the table in force "
                        f"({now.version}) in {now.reference}: the feature state, the rules' "
                        "thresholds and the models are in that one; another reference "
                        "currency takes a new rates file on every worker and retrained "
                        "models")
    dropped = sorted(set(now.units_per_ref) - set(table.units_per_ref))
    if dropped and not args.allow_dropped:
        return _refused(f"{path}: lacks {len(dropped)} currencies of the table in force "
                        f"({now.version}): {', '.join(dropped[:10])}; their transactions "
                        "would go to the dead letters (--allow-dropped to mean it)")
    if table.version == now.version:
        if table.units_per_ref == now.units_per_ref:
            print(f"rates {table.version} are in force already: nothing published")
            return 0
        return _refused(f"{path}: version {table.version} is in force with other rates: "
                        "give this table a version of its own")
    record = ControlRecord.make("rates", table.version, document, _who(args.by),
                                int(time.time() * 1000), args.reason.strip()).after(head)
    code = _not_sent(settings, record, "rates")
    if code:
        return code
    moved = table.moved_from(now)
    print(f"rates {table.version} ({len(table.units_per_ref)} currencies in "
          f"{table.reference}, sha256 {record.sha256[:12]}) published to "
          f"{settings.topics.control}"
          + (f"; against {now.version}: {moved}" if moved else ""))
    return 0
