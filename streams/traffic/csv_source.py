"""A user's own history (CSV with their column names) as a stream of events in event-time order.

Contract of :func:`read_csv_events`:

* Yields ``("transaction", dict)`` (every field of ``schemas/transaction.avsc``),
  ``("label", dict)`` (``schemas/label.avsc``) and ``("error", dict)``.
* Transactions and labels come in non-decreasing time order (a transaction's
  ``event_time``, a label's ``label_time``); ties keep file order. A label comes after its
  transaction, at its ``label_time`` column or else ``event_time + label_delay_days``
  (which has no default: a file with labels and no ``label_time`` column is refused up
  front without it, since when labels became known decides what a model may learn), and
  only for rows whose label cell is filled (both classes: ``confirmed_fraud`` /
  ``confirmed_genuine``). With ``keep_order`` transactions come in file order instead (the
  order they arrived in, late events included) and a label once the latest event time
  seen reaches its ``label_time``.
* A ``.parquet`` file is read the same way (pyarrow), its columns mapped like a CSV's.
* Nothing vanishes: a row that cannot be mapped (missing required value, unparsable number
  or time, bad code) becomes ``("error", {"line", "column", "field", "reason"})``, the reason
  naming the user's column. An unreadable label cell gives an error too, and the transaction
  is still emitted. Errors come in file order; for a file that is not already sorted by
  time they all come before the first transaction.
* Raw card numbers never leave this module: a ``card_id`` of 13-19 digits (spaces or dashes
  allowed) is replaced by :func:`tokenize_card` under the caller's key. Without a key such a
  file is refused up front (:class:`CsvMappingError`), as are unknown or missing columns.
* A file already in time order streams in constant memory; otherwise its rows are held in
  memory (about 1 KB each) to be sorted. The file is read twice (check, then stream).
"""

from __future__ import annotations

import csv
import heapq
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path
from types import MappingProxyType
from typing import Any

from fraudstream.streams.traffic.csv_cells import (
    PARSE,
    looks_like_card_number,
    parse_event_time,
    text,
    tokenize_card,
)

__all__ = ["ColumnMapping", "CsvMappingError", "looks_like_card_number", "parse_event_time",
           "read_csv_events", "tokenize_card"]

REQUIRED = ("transaction_id", "event_time", "card_id", "merchant_id", "amount")
OPTIONAL = ("customer_id", "terminal_id", "currency", "mcc", "country", "card_country", "lat",
            "lon", "device_id", "ip", "channel", "label", "fraud_type", "label_time")
#: Schema fields the Transaction needs: from a column or from ``defaults``.
NEEDED = ("currency", "country", "channel")
_NO_DEFAULT = frozenset({"transaction_id", "event_time", "card_id", "amount", "label",
                         "label_time"})
MIN_EVENT_TIME_MS = 946_684_800_000  # 2000-01-01, as the worker checks: older is a unit mistake

class CsvMappingError(ValueError):
    """The file and the mapping do not fit (missing column, unknown field, key needed)."""


@dataclass(frozen=True)
class ColumnMapping:
    """Our field name -> the user's column name.

    Required fields default to a column of the same name. Optional ones: ``None`` uses a
    column of the same name when the header has one, ``""`` ignores the field. ``defaults``
    fills a field whose column is absent or whose cell is empty (e.g. ``currency="EUR"``);
    currency, country and channel need a column or a default. ``time_format``: ``auto``
    (ISO-8601, or epoch seconds / millis / micros told apart by magnitude), ``iso``,
    ``epoch_s``, ``epoch_ms``, or a ``strptime`` pattern. Times without a zone are UTC.
    ``transaction_id=None`` makes ids from the file name and line (``<stem>-<line>``).
    """

    transaction_id: str | None = "transaction_id"
    event_time: str = "event_time"
    card_id: str = "card_id"
    merchant_id: str = "merchant_id"
    amount: str = "amount"
    customer_id: str | None = None
    terminal_id: str | None = None
    currency: str | None = None
    mcc: str | None = None
    country: str | None = None
    card_country: str | None = None
    lat: str | None = None
    lon: str | None = None
    device_id: str | None = None
    ip: str | None = None
    channel: str | None = None
    label: str | None = None
    fraud_type: str | None = None
    label_time: str | None = None
    defaults: Mapping[str, str] = field(default_factory=dict, hash=False)
    time_format: str = "auto"

    def __post_init__(self) -> None:
        bad = sorted(set(self.defaults) - (set(REQUIRED + OPTIONAL) - _NO_DEFAULT))
        if bad:
            raise CsvMappingError(f"no default allowed for {bad}")
        object.__setattr__(self, "defaults", MappingProxyType(dict(self.defaults)))

    def __reduce__(self) -> tuple[Any, ...]:
        # A mappingproxy does not pickle; the history reader process needs the mapping.
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values["defaults"] = dict(self.defaults)
        return _mapping_from_fields, (values,)

    @classmethod
    def from_flags(cls, maps: Iterable[str] = (), defaults: Iterable[str] = (),
                   time_format: str = "auto") -> ColumnMapping:
        """Build from CLI flags: ``maps`` like ``card_id=cc_num``, ``defaults`` like
        ``currency=EUR``. ``is_fraud`` is accepted as another name for ``label``."""
        names = set(REQUIRED + OPTIONAL)

        def pairs(items: Iterable[str], what: str) -> dict[str, str]:
            out = {}
            for item in items:
                key, sep, value = item.partition("=")
                key = "label" if key.strip() == "is_fraud" else key.strip()
                if not sep or key not in names:
                    raise CsvMappingError(
                        f"{what} {item!r}: expected FIELD=VALUE, FIELD among {sorted(names)}")
                out[key] = value.strip()
            return out

        return cls(**pairs(maps, "--map"), defaults=pairs(defaults, "--default"),
                   time_format=time_format)

    def resolve(self, header: Sequence[str]) -> dict[str, int]:
        """Field -> column index for this header; raises :class:`CsvMappingError`."""
        index = {name.strip(): i for i, name in enumerate(header)}
        unset = [n for n in REQUIRED[1:] if not getattr(self, n) and n not in self.defaults]
        if unset:
            raise CsvMappingError(f"{unset} must be mapped to a column")
        out: dict[str, int] = {}
        missing = []
        for f in fields(self):
            if f.name in ("defaults", "time_format"):
                continue
            column = getattr(self, f.name)
            if f.name in OPTIONAL and column is None:
                column = f.name if f.name in index else ""
            if column == "" or column is None:
                continue
            if column in index:
                out[f.name] = index[column]
            elif f.name not in self.defaults:
                missing.append(f"{f.name} -> {column!r}")
        missing += [f"{n} (no column: map one or give a default)" for n in NEEDED
                    if n not in out and n not in self.defaults]
        if missing:
            raise CsvMappingError(f"columns not found: {missing}; the header has {list(index)}")
        return out


def _mapping_from_fields(values: dict[str, Any]) -> ColumnMapping:
    return ColumnMapping(**values)


def read_csv_events(path: str | Path, mapping: ColumnMapping | None = None, *,
                    label_delay_days: float | None = None, token_key: bytes | str | None = None,
                    delimiter: str = ",", encoding: str = "utf-8-sig",
                    keep_order: bool = False,
                    ) -> Iterator[tuple[str, dict[str, Any]]]:
    """Events of a CSV file in time order; see the module docstring for the contract.

    Header problems and card numbers without ``token_key`` raise :class:`CsvMappingError`
    here, before anything is yielded.
    """
    path = Path(path)
    mapping = mapping or ColumnMapping()
    cls = _ParquetRows if path.suffix.lower() in (".parquet", ".pq") else _Rows
    rows = cls(path, mapping, label_delay_days, token_key, delimiter, encoding)
    rows.check(need_order=not keep_order)
    return rows.events()


class _Rows:
    def __init__(self, path: Path, mapping: ColumnMapping, label_delay_days: float | None,
                 token_key: bytes | str | None, delimiter: str, encoding: str) -> None:
        if label_delay_days is not None and label_delay_days < 0:
            raise CsvMappingError("label_delay_days must be >= 0")
        self.path, self.mapping, self.key = path, mapping, token_key
        self.delay_ms = (None if label_delay_days is None
                         else round(label_delay_days * 86_400_000))
        self.delimiter, self.encoding = delimiter, encoding
        self.sorted = True

    def _reader(self) -> Iterator[tuple[int, list[str]]]:
        with self.path.open(newline="", encoding=self.encoding) as fh:
            reader = csv.reader(fh, delimiter=self.delimiter)
            self.header = next(reader, None)
            if self.header is None:
                raise CsvMappingError(f"{self.path}: empty file, no header")
            for row in reader:
                if row:
                    yield reader.line_num, row

    def check(self, need_order: bool = True) -> None:
        """Pass 1: header vs mapping, default values, card numbers vs key, and whether the
        rows are in time order (unless the caller keeps file order anyway)."""
        rows = self._reader()
        first = next(rows, None)
        self.cols = self.mapping.resolve(self.header)
        if "label" in self.cols and "label_time" not in self.cols and self.delay_ms is None:
            raise CsvMappingError(
                f"column {self.header[self.cols['label']]!r} holds labels but there is no "
                "label_time column: say when labels became known after their transaction "
                "(--label-delay-days), or map one (--map label_time=COLUMN)")
        for name, value in self.mapping.defaults.items():
            try:
                PARSE.get(name, text)(value)
            except ValueError as exc:
                raise CsvMappingError(f"default {name}={value!r}: {exc}") from None
        t_col, c_col = self.cols["event_time"], self.cols["card_id"]
        last = -math.inf
        if not need_order and self.key is not None:
            rows.close()  # nothing to look for in the rows
            return
        for _, row in _chain(first, rows):
            if c_col < len(row) and self.key is None and looks_like_card_number(row[c_col]):
                raise CsvMappingError(
                    f"column {self.header[c_col]!r} (card_id) holds card numbers: pass a "
                    "tokenization key so they are replaced by tokens")
            if not need_order:
                continue
            try:
                t = parse_event_time(row[t_col], self.mapping.time_format)
            except (ValueError, IndexError):
                continue
            if t < last:
                self.sorted = False
            last = max(last, t)

    def events(self) -> Iterator[tuple[str, dict[str, Any]]]:
        """Pass 2: map rows, merge labels in time order."""
        labels: list[tuple[int, int, dict[str, Any]]] = []
        held: list[tuple[int, int, dict[str, Any], dict[str, Any] | None]] = []
        latest = -math.inf
        for line, row in self._reader():
            txn, label, error = self._map(line, row)
            if error is not None:
                yield "error", error
            if txn is None:
                continue
            if not self.sorted:
                held.append((txn["event_time"], line, txn, label))
                continue
            latest = max(latest, txn["event_time"])
            yield from _due(labels, latest)
            yield "transaction", txn
            if label is not None:
                heapq.heappush(labels, (label["label_time"], line, label))
        held.sort(key=lambda h: (h[0], h[1]))
        for t, line, txn, label in held:
            yield from _due(labels, t)
            yield "transaction", txn
            if label is not None:
                heapq.heappush(labels, (label["label_time"], line, label))
        yield from _due(labels, math.inf)

    def _plan(self) -> list[tuple[str, int | None, str, Any, bool]]:
        """Per field: (name, column index or None, default, parser, required), worked out
        once per file."""
        plan = getattr(self, "_plan_cache", None)
        if plan is None:
            m = self.mapping

            def event_time(cell: str) -> int:
                t = parse_event_time(cell, m.time_format)
                if t < MIN_EVENT_TIME_MS:
                    raise ValueError(f"{cell!r} is before 2000 (wrong unit?)")
                return t

            plan = self._plan_cache = [
                (name, self.cols.get(name), m.defaults.get(name, ""),
                 event_time if name in ("event_time", "label_time") else PARSE.get(name, text),
                 name in REQUIRED and not (name == "transaction_id" and not m.transaction_id))
                for name in REQUIRED + OPTIONAL]
        return plan

    def _map(self, line: int, row: list[str]) -> tuple[
            dict[str, Any] | None, dict[str, Any] | None, dict[str, Any] | None]:
        """One row -> (transaction or None, label or None, error or None)."""
        if len(row) != len(self.header):
            reason = f"has {len(row)} fields, the header has {len(self.header)}"
            return None, None, {"line": line, "column": None, "field": None, "reason": reason}
        problems: list[tuple[str, str]] = []
        rec: dict[str, Any] = {}
        for name, col, default, parse, required in self._plan():
            cell = row[col].strip() if col is not None else ""
            if cell == "":
                cell = default
            if cell == "":
                if required:
                    problems.append((name, "missing value"))
                rec[name] = None
                continue
            try:
                rec[name] = parse(cell)
            except ValueError as exc:
                rec[name] = None
                problems.append((name, str(exc)))
        if (rec["lat"] is None) != (rec["lon"] is None) and not any(
                p[0] in ("lat", "lon") for p in problems):
            problems.append(("lat" if rec["lat"] is None else "lon", "lat and lon come together"))
        label_problem = next((p for p in problems if p[0] == "label"), None)
        problems = [p for p in problems if p[0] != "label"]
        if problems:
            return None, None, self._error(line, problems)
        if rec["transaction_id"] is None:
            rec["transaction_id"] = f"{self.path.stem}-{line}"
        if looks_like_card_number(rec["card_id"]):
            rec["card_id"] = tokenize_card(rec["card_id"], self.key or b"")
        is_fraud, fraud_type = rec.pop("label", None), rec.pop("fraud_type")
        label_time = rec.pop("label_time")
        label = None
        if is_fraud is not None and label_time is None and self.delay_ms is None:
            label_problem = label_problem or ("label_time", "missing value, and no label "
                                              "delay given (--label-delay-days)")
            is_fraud = None
        if is_fraud is not None:
            label = {"transaction_id": rec["transaction_id"], "card_id": rec["card_id"],
                     "merchant_id": rec["merchant_id"],
                     "is_fraud": is_fraud, "fraud_type": fraud_type if is_fraud else None,
                     "source": "confirmed_fraud" if is_fraud else "confirmed_genuine",
                     "event_time": rec["event_time"],
                     "label_time": label_time if label_time is not None
                     else rec["event_time"] + (self.delay_ms or 0)}
        error = self._error(line, [label_problem]) if label_problem else None
        if error:
            error["reason"] += " (transaction kept, no label)"
        return rec, label, error

    def _error(self, line: int, problems: list[tuple[str, str]]) -> dict[str, Any]:
        def column(name: str) -> str:
            if name in self.cols:
                return self.header[self.cols[name]]
            return f"default {name}" if name in self.mapping.defaults else name

        reason = "; ".join(f"column {column(n)!r} ({n}): {why}" for n, why in problems)
        return {"line": line, "column": column(problems[0][0]), "field": problems[0][0],
                "reason": reason}


class _ParquetRows(_Rows):
    """A Parquet file's rows as the CSV reader's: cells as text, row numbers as lines."""

    def _reader(self) -> Iterator[tuple[int, list[str]]]:
        import pyarrow.parquet as pq

        try:
            pf = pq.ParquetFile(self.path)
        except Exception as exc:  # pyarrow raises several types for a bad file
            raise CsvMappingError(f"{self.path}: not a readable Parquet file: {exc}") from None
        self.header = list(pf.schema_arrow.names)
        line = 1
        for batch in pf.iter_batches(batch_size=10_000):
            columns = [batch.column(i).to_pylist() for i in range(batch.num_columns)]
            for row in zip(*columns, strict=True):
                line += 1
                yield line, [_cell(v) for v in row]


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, datetime):
        dt = value if value.tzinfo else value.replace(tzinfo=UTC)
        return dt.isoformat()
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return repr(value)
    return str(value)


def _chain(first: tuple[int, list[str]] | None,
           rest: Iterator[tuple[int, list[str]]]) -> Iterator[tuple[int, list[str]]]:
    if first is not None:
        yield first
    yield from rest


def _due(labels: list[tuple[int, int, dict[str, Any]]],
         until: float) -> Iterator[tuple[str, dict[str, Any]]]:
    while labels and labels[0][0] <= until:
        yield "label", heapq.heappop(labels)[2]
