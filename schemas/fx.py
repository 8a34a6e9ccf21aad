"""Amounts in one reference currency: a versioned rates table and the one conversion.

Every amount that features, rules and models use is ``amount_ref``: the transaction's
amount converted into the table's reference currency (EUR by default). The conversion
happens once, in :func:`fraudstream.schemas.validate.validate_transaction`, which every path goes
through (worker, replay, ``fraudstream features``, ``train``), so online and offline
numbers agree. The original ``amount`` and ``currency`` stay on the transaction and in its
decision.

The table is a TOML file (``schemas/rates.toml`` is the shipped one): a ``version``, the
``reference`` code, and ``[rates]``, units of each currency per one reference unit.
:meth:`Rates.load` refuses a file that is unreadable, lacks the reference currency at 1.0,
or has a code or rate that cannot be right, with a message naming the file and the key.
"""

from __future__ import annotations

import math
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_RATES_PATH = Path(__file__).with_name("rates.toml")
_CODE = re.compile(r"^[A-Z]{3}$")


class RatesError(ValueError):
    """A rates file that cannot be used; the message names the file and the key."""


#: How far (relative) a currency's rate may move between the table a model was trained
#: with and the one serving it before the worker names it at load.
RATES_MOVED = 0.10


@dataclass(frozen=True)
class Rates:
    """Units of each currency per one unit of ``reference``, as of ``version``."""

    version: str
    reference: str
    units_per_ref: dict[str, float] = field(repr=False)
    source: str = ""

    def rate(self, currency: str) -> float | None:
        """Units of ``currency`` per reference unit, or None when the table lacks it."""
        return self.units_per_ref.get(currency)

    def to_reference(self, amount: float, currency: str) -> float:
        """``amount`` of ``currency`` in the reference currency; KeyError when unknown."""
        return amount / self.units_per_ref[currency]

    def moved_from(self, trained: Rates, tolerance: float = RATES_MOVED) -> str | None:
        """A sentence when amounts convert materially otherwise with this table than with
        ``trained`` (the one a model learned from): another reference currency, or a
        currency of both whose rate moved by more than ``tolerance`` (relative). A new
        version with the day's small moves says nothing: tables are replaced daily."""
        if self.reference != trained.reference:
            return (f"amounts in {self.reference} here (table {self.version}), in "
                    f"{trained.reference} in training (table {trained.version})")
        moves = ((abs(self.units_per_ref[c] / r - 1.0), c)
                 for c, r in trained.units_per_ref.items() if c in self.units_per_ref)
        big = sorted(((m, c) for m, c in moves if m > tolerance), reverse=True)
        if not big:
            return None
        named = ", ".join(f"{c} {m:.0%}" for m, c in big[:5])
        return (f"table {self.version} here, {trained.version} in training: "
                f"{len(big)} rates moved by more than {tolerance:.0%} ({named})")

    @classmethod
    def from_mapping(cls, data: dict[str, Any], source: str = "") -> Rates:
        where = f"{source}: " if source else ""
        version = data.get("version")
        if not isinstance(version, str) or not version.strip():
            raise RatesError(f"{where}'version' must be a non-empty string")
        from fraudstream.schemas.validate import contains_pan  # (validate imports this)

        if contains_pan(version):  # it goes to logs and metrics
            raise RatesError(f"{where}'version' holds what looks like a raw card number")
        reference = data.get("reference")
        if not isinstance(reference, str) or not _CODE.match(reference):
            raise RatesError(f"{where}'reference' must be an ISO 4217 code, got {reference!r}")
        table = data.get("rates")
        if not isinstance(table, dict) or not table:
            raise RatesError(f"{where}'[rates]' must be a table of ISO 4217 code = rate")
        rates: dict[str, float] = {}
        for code, value in table.items():
            if not _CODE.match(code):
                raise RatesError(f"{where}rates.{code}: not an ISO 4217 code")
            if isinstance(value, bool) or not isinstance(value, int | float) or not (
                    math.isfinite(value) and value > 0):
                raise RatesError(f"{where}rates.{code}: must be a positive number, got {value!r}")
            rates[code] = float(value)
        if rates.get(reference) != 1.0:
            raise RatesError(f"{where}rates.{reference}: the reference currency must be 1.0")
        unknown = set(data) - {"version", "reference", "rates", "description"}
        if unknown:
            raise RatesError(f"{where}unknown key(s): {', '.join(sorted(unknown))}")
        return cls(version=version, reference=reference, units_per_ref=rates, source=source)

    @classmethod
    def load(cls, path: Path | str | None = None) -> Rates:
        path = Path(path) if path is not None else DEFAULT_RATES_PATH
        return cls.from_mapping(read_file(path), str(path))


def read_file(path: Path) -> dict[str, Any]:
    """A rates file's TOML as a mapping (what :meth:`Rates.from_mapping` takes, and what
    the control topic carries); :class:`RatesError` when unreadable or not TOML."""
    try:
        return tomllib.loads(path.read_text())
    except OSError as exc:
        raise RatesError(f"{path}: cannot read the rates file: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise RatesError(f"{path}: not valid TOML: {exc}") from exc
