"""A history file as ``fraudstream features`` and ``train`` read it: mapped
(:func:`~fraudstream.streams.traffic.csv_source.read_csv_events`), then validated as the
worker validates, rows that cannot be used reported in ``errors`` (never silently skipped).

On a machine with more than one core the reading, mapping and validation run in a second
process, which hands validated events over in chunks while this one computes features:
the two halves cost about the same per row, so a long history is built in about half the
time. The pipe between them holds a few chunks, so memory stays bounded. The events, their
order and the errors are the same either way.
"""

from __future__ import annotations

import argparse
import os
import pickle
import subprocess
import sys
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from fraudstream.schemas.fx import Rates
from fraudstream.schemas.validate import (
    ValidationError,
    mask_pans,
    validate_history_transaction,
    validate_label,
)
from fraudstream.scorers.rules import RuleSet, RulesScorer
from fraudstream.streams.processes import die_with_parent
from fraudstream.streams.settings import Settings
from fraudstream.streams.traffic.csv_source import ColumnMapping, CsvMappingError, read_csv_events

#: Events per hand-over between the processes.
CHUNK = 2_000

Event = tuple[str, dict[str, Any]]


def add_history_arguments(p: argparse.ArgumentParser) -> None:
    """How a history file is read: the column mapping, tokenization, labels and order
    (shared by ``fraudstream features`` and ``train``)."""
    p.add_argument("--map", action="append", default=[], metavar="FIELD=COLUMN",
                   help="column for a field, e.g. --map card_id=cc_num (repeatable)")
    p.add_argument("--default", action="append", default=[], metavar="FIELD=VALUE",
                   help="value for a field the file lacks, e.g. --default currency=USD")
    p.add_argument("--token-key", default=None,
                   help="key for tokenizing card numbers found in the card column")
    p.add_argument("--label-delay-days", type=float, default=None,
                   help="when a label became known after its transaction, for a file with "
                        "labels and no label_time column (required then)")
    p.add_argument("--keep-order", action="store_true",
                   help="rows are in arrival order (late events stay late); "
                        "default: sort by event time")
    p.add_argument("--in-force", action="store_true",
                   help="convert amounts with the rates table every worker applies now (the "
                        "latest accepted on the control topic; train: the rules too) instead "
                        "of the files FRAUDSTREAM_WORKER_RATES_PATH and "
                        "FRAUDSTREAM_SCORING_RULES_PATH name")
    p.add_argument("--reader", choices=("auto", "process", "inline"), default="auto",
                   help="read and validate the file in a second process (process), in this "
                        "one (inline), or in a second process when there is a second core "
                        "(auto)")


def rates_table(args: argparse.Namespace, settings: Settings, command: str) -> Rates:
    """:func:`tables`' rates table, for a build that takes no rules."""
    if not args.in_force:
        return Rates.load(settings.worker.rates_path)
    return tables(args, settings, command)[1]


def tables(args: argparse.Namespace, settings: Settings, command: str
           ) -> tuple[RulesScorer, Rates]:
    """The rules and the rates table to build with: the files' (RatesError, RulesError
    when one cannot be read), or with ``--in-force`` those every worker applies now, which
    needs the broker (:class:`StartError` when it cannot be reached)."""
    if not args.in_force:
        return (RulesScorer(RuleSet.load(settings.scoring.rules_path)),
                Rates.load(settings.worker.rates_path))
    from fraudstream.streams.control.follow import in_force, quiet
    from fraudstream.streams.topics import connect

    connect(settings.kafka)  # one line and an exit code, not the files in silence
    with quiet():
        rules, rates = in_force(settings)
    print(f"fraudstream {command}: rules {rules.ruleset.version} and rates {rates.version} "
          f"({rates.reference}), as in force on {settings.topics.control}", file=sys.stderr)
    return rules, rates


@dataclass(frozen=True)
class HistorySource:
    """What to read, and how: everything here crosses to the reading process."""

    path: Path
    mapping: ColumnMapping
    label_delay_days: float | None
    token_key: str | None
    keep_order: bool
    settings: Settings
    #: The table amounts are converted with (the workers' in force, or the rates file).
    rates: Rates

    @classmethod
    def from_args(cls, args: argparse.Namespace, settings: Settings,
                  rates: Rates) -> HistorySource:
        """``rates``: the table to convert with (:func:`tables`, :func:`rates_table`)."""
        return cls(Path(args.input), ColumnMapping.from_flags(args.map, args.default),
                   args.label_delay_days, args.token_key, args.keep_order, settings, rates)

    def raw(self) -> Iterator[Event]:
        """The mapped events; raises CsvMappingError or OSError before the first one."""
        return read_csv_events(self.path, self.mapping, label_delay_days=self.label_delay_days,
                               token_key=self.token_key, keep_order=self.keep_order)


def history_events(source: HistorySource, errors: list[str], reader: str = "auto",
                   ) -> Iterator[Event]:
    """Validated events of ``source`` in order; unusable rows appended to ``errors``.

    Raises :class:`CsvMappingError` or :class:`OSError` here, before anything is yielded,
    when the file and the mapping do not fit.
    """
    if reader == "inline" or (reader == "auto" and (os.cpu_count() or 1) < 2):
        return checked_events(source.raw(), source.settings, source.rates, errors)
    return _in_background(source, errors)


def checked_events(events: Iterator[Event], settings: Settings, rates: Rates,
                   errors: list[str]) -> Iterator[Event]:
    """Events as the worker would accept them, amounts converted with ``rates``; the
    others reported in ``errors``."""
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


def _in_background(source: HistorySource, errors: list[str]) -> Iterator[Event]:
    # A fresh interpreter running this module, not a fork (the parent may hold threads of
    # ONNX Runtime or numba, which a fork would copy mid-state) nor multiprocessing's spawn
    # (which re-runs the caller's main module). Events come back on a pipe of our own.
    rfd, wfd = os.pipe()
    proc = subprocess.Popen(
        [sys.executable, "-m", __name__, str(wfd)], stdin=subprocess.PIPE, pass_fds=(wfd,),
        preexec_fn=die_with_parent)
    os.close(wfd)
    conn = Connection(rfd, writable=False)
    try:
        assert proc.stdin is not None
        with proc.stdin:
            proc.stdin.write(pickle.dumps(source))
        first = _receive(conn, proc)
        if first[0] == "refused":
            raise first[1]
    except BaseException:
        _stop(proc, conn)
        raise
    return _relay(proc, conn, errors)


def _relay(proc: subprocess.Popen[bytes], conn: Connection,
           errors: list[str]) -> Iterator[Event]:
    try:
        while True:
            message = _receive(conn, proc)
            if message[0] == "end":
                return
            if message[0] == "failed":
                raise RuntimeError(f"reading the history failed:\n{message[1]}")
            _, events, new_errors = message
            errors.extend(new_errors)
            yield from events
    finally:
        _stop(proc, conn)


def _receive(conn: Connection, proc: subprocess.Popen[bytes]) -> tuple[Any, ...]:
    try:
        return conn.recv()  # type: ignore[no-any-return]
    except EOFError:
        code = proc.wait(5)
        raise RuntimeError("the history reader process ended without finishing "
                           f"(exit code {code})") from None


def _stop(proc: subprocess.Popen[bytes], conn: Connection) -> None:
    conn.close()
    if proc.poll() is None:
        proc.terminate()
    proc.wait(5)


def _read(conn: Connection, source: HistorySource) -> None:
    """The reading process: mapped and validated events to ``conn``, a chunk at a time."""
    try:
        try:
            raw = source.raw()
        except (CsvMappingError, OSError) as exc:
            conn.send(("refused", exc))
            return
        conn.send(("ready",))
        errors: list[str] = []
        chunk: list[Event] = []
        for event in checked_events(raw, source.settings, source.rates, errors):
            chunk.append(event)
            if len(chunk) >= CHUNK:
                conn.send(("events", chunk, errors))
                chunk = []
                errors.clear()  # the list checked_events appends to
        conn.send(("events", chunk, errors))
        conn.send(("end",))
    except (BrokenPipeError, KeyboardInterrupt):
        pass  # the reader of the events stopped first
    except Exception:  # reported to the parent, which raises it
        conn.send(("failed", traceback.format_exc()))
    finally:
        conn.close()


if __name__ == "__main__":
    _read(Connection(int(sys.argv[1]), readable=False), pickle.load(sys.stdin.buffer))
