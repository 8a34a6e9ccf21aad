"""``fraudstream rules publish FILE --reason TEXT | history``: rules and blocklists for every
worker, through the control topic (``FRAUDSTREAM_TOPICS_CONTROL``).

``publish`` validates the file as a worker would (every key, every rule), reads each
blocklist ``file`` into the rule's values (a worker on another machine has no such file),
refuses a value that looks like a raw card number, then writes the document with who
published it, when and why. Running workers apply it between two batches; a worker that
starts later starts with it. Nothing is written when any check fails (one line on stderr,
exit code 2). ``history`` lists every publication, the one in force last.
"""

from __future__ import annotations

import argparse
import getpass
import heapq
import socket
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from fraudstream.schemas.control import (
    SUPERSEDED,
    ControlError,
    ControlRecord,
    Heads,
    decode,
    is_audit,
)
from fraudstream.scorers.rules import RuleSet
from fraudstream.scorers.rules_file import inline_document, read_toml
from fraudstream.streams.control.topic import latest
from fraudstream.streams.settings import Settings


def add_arguments(p: argparse.ArgumentParser) -> None:
    publish_arguments(p, "validate a rules file and put it in force on every worker",
                      "a rules file (TOML), as FRAUDSTREAM_SCORING_RULES_PATH takes",
                      "every publication: when, by whom, which version, why")


def publish_arguments(p: argparse.ArgumentParser, publish_help: str, file_help: str,
                      history_help: str) -> argparse.ArgumentParser:
    """``publish FILE --reason --by`` and ``history``, for a document published on the
    control topic; returns the ``publish`` parser."""
    sub = p.add_subparsers(dest="action", required=True)
    q = sub.add_parser("publish", help=publish_help)
    q.add_argument("file", type=Path, help=file_help)
    who_and_why(q)
    sub.add_parser("history", help=history_help)
    return q


def who_and_why(q: argparse.ArgumentParser, why: str = "why: kept in the audit trail",
                **reason: object) -> None:
    """``--reason`` (required unless ``reason`` says otherwise) and ``--by`` (see
    :func:`_who`) of a change published on the control topic."""
    q.add_argument("--reason", help=why, **(reason or {"required": True}))
    q.add_argument("--by", default=None, help="who (default: user@host)")


def run(args: argparse.Namespace, settings: Settings) -> int:
    if args.action == "publish":
        return _publish(args, settings)
    return history(settings)


def exit_code(command: str, write: Callable[[], None]) -> int:
    """Run ``write`` (a publication): 0, or (with one line on stderr) 3 when it was not
    written, 4 when it was superseded (another change of its kind came first)."""
    from fraudstream.streams.control.topic import SUPERSEDED_EXIT, Superseded

    try:
        write()
    except RuntimeError as exc:
        print(f"fraudstream {command}: {exc}", file=sys.stderr)
        return SUPERSEDED_EXIT if isinstance(exc, Superseded) else 3
    return 0


def _not_sent(settings: Settings, record: ControlRecord, command: str) -> int:
    """Publish ``record`` (see :func:`exit_code`)."""
    from fraudstream.streams.control.topic import publish

    return exit_code(command, lambda: publish(settings, record))


def _who(by: str | None) -> str:
    return by or f"{getpass.getuser()}@{socket.gethostname()}"


def _publish(args: argparse.Namespace, settings: Settings) -> int:

    path: Path = args.file
    ruleset = RuleSet.load(path)  # a RulesError is one line (fraudstream.streams.cli.main)
    document = inline_document(read_toml(path), path.parent)
    ruleset = RuleSet.from_document(document, source=str(path))
    if not args.reason.strip():
        print("fraudstream rules: --reason must say why", file=sys.stderr)
        return 2
    record = ControlRecord.make("rules", ruleset.version, document, _who(args.by),
                                int(time.time() * 1000), args.reason.strip()
                                ).after(latest(settings, "rules"))
    code = _not_sent(settings, record, "rules")
    if code:
        return code
    print(f"rules {ruleset.version} ({len(ruleset.rules)} rules, sha256 "
          f"{record.sha256[:12]}) published to {settings.topics.control}")
    return 0


def history(settings: Settings, kinds: tuple[str, ...] | None = None,
            autopilot: bool = False) -> int:
    """Every publication (of ``kinds``, or all), oldest first; with ``autopilot``, the
    autopilot's events among them."""
    from fraudstream.streams.control.topic import control_consumer, read_to_end

    rows: list[tuple[int, str]] = []
    replayed = Heads()
    try:
        consumer = control_consumer(settings, f"history-{int(time.time() * 1000)}")
    except LookupError:
        consumer = None
    try:
        for msg in read_to_end(consumer, 30.0) if consumer is not None else ():
            if not is_audit(msg.key()):
                continue
            try:
                rec = decode(msg.value())
            except ControlError as exc:
                print(f"offset {msg.offset()}: not a control record: {exc}", file=sys.stderr)
                continue
            superseded = replayed.offer(rec) == SUPERSEDED
            if kinds is None or rec.kind in kinds:
                at = datetime.fromtimestamp(rec.published_at / 1000, tz=UTC)
                rows.append((rec.published_at, f"{at.isoformat(timespec='seconds')}\t"
                             f"{rec.kind}\t{rec.version}\t{rec.sha256[:12]}\t"
                             f"{rec.published_by}\t{rec.reason}"
                             + ("\t(superseded: another change came first; not applied)"
                                if superseded else "")))
    finally:
        if consumer is not None:
            consumer.close()
    if autopilot:
        from fraudstream.streams.autopilot.events import read_events, superseded
        from fraudstream.streams.cli.autopilot import line

        # merged by time, each in its own order (a record published by hand may carry
        # any time: the control topic's order is the order of publication)
        events = read_events(settings)
        rows = list(heapq.merge(rows, [(e.at, line(e, stale)) for e, stale in zip(
            events, superseded(events), strict=True)], key=lambda r: r[0]))
    for _at, text in rows:
        print(text)
    if not rows:
        print(f"nothing published on {settings.topics.control}", file=sys.stderr)
    return 0
