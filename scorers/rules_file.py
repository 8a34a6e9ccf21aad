"""Reading a rules file: every key validated, every rule compiled into a predicate.

The format is documented in :mod:`fraudstream.scorers.rules` (what a rules author
reads); this module enforces it. Every error names the file, the rule id and the key at
fault (:class:`RulesError`). Compiling turns each rule into one closure over frozensets
and constants, so that the scorer's work per event is a call per applicable rule.
"""

from __future__ import annotations

import ipaddress
import json
import math
import socket
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from fraudstream.schemas.validate import looks_like_pan
from fraudstream.scorers.base import Event, Features, Outcome, ScorerError, Thresholds
from fraudstream.state.features import INDEX

Predicate = Callable[[Event, Features], bool]
"""Compiled rule condition: (event, features) -> fired? Never raises on schema events."""

CHANNELS = frozenset({"pos", "ecom", "atm", "moto", "contactless"})
BLOCKLIST_FIELDS = frozenset(
    {"card_id", "customer_id", "merchant_id", "terminal_id", "device_id", "ip"}
)
_OPS = (">", ">=", "<", "<=", "==", "!=")
_COMMON_KEYS = frozenset(
    {"id", "kind", "weight", "action", "description", "enabled", "channel", "mcc", "currency"}
)
_TOP_KEYS = frozenset({"version", "description", "thresholds", "rules"})
_NO_FEATURES: Features = {}


class RulesError(ScorerError, ValueError):
    """A rules file is unreadable or malformed.

    The message names the file, the rule id and the key at fault, e.g.
    ``rules.toml: rule 'R101_HIGH_AMOUNT_ECOM', key 'weight': must be in (0, 1], got 1.5``.
    The same parts are available as ``source``, ``rule_id`` and ``key``.
    """

    def __init__(
        self,
        message: str,
        *,
        source: str | None = None,
        rule_id: str | None = None,
        key: str | None = None,
    ) -> None:
        self.source, self.rule_id, self.key = source, rule_id, key
        where = []
        if rule_id is not None:
            where.append(f"rule {rule_id!r}")
        if key is not None:
            where.append(f"key {key!r}")
        prefix = f"{source}: " if source else ""
        super().__init__(f"{prefix}{', '.join(where)}: {message}" if where else prefix + message)


@dataclass(frozen=True, slots=True)
class Rule:
    """One validated, compiled rule. ``matches`` is for explanations and tests; the
    scorer uses the compiled predicate directly."""

    id: str
    kind: str
    weight: float
    action: Outcome | None
    channels: frozenset[str] | None
    predicate: Predicate = field(repr=False, compare=False)
    description: str = ""

    @property
    def action_rank(self) -> int:
        """0 without an ``action``, else the rank of the outcome it forces."""
        return 0 if self.action is None else self.action.rank

    @property
    def guardrail(self) -> bool:
        """True when firing forces an outcome (blocklists, rules with an ``action``)."""
        return self.action is not None

    def matches(self, event: Event, features: Features | None = None) -> bool:
        """Whether this rule fires for ``event`` (with its optional ``features``)."""
        if self.channels is not None and event.get("channel") not in self.channels:
            return False
        return self.predicate(event, _NO_FEATURES if features is None else features)



def read_toml(path: Path) -> dict[str, Any]:
    """The parsed TOML document at ``path``. Raises :class:`RulesError`."""
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except OSError as exc:
        raise RulesError(f"cannot read rules file: {exc}", source=str(path)) from exc
    except tomllib.TOMLDecodeError as exc:
        raise RulesError(f"not valid TOML: {exc}", source=str(path)) from exc


def compile_rules(data: Mapping[str, Any], base_dir: Path, source: str
                  ) -> tuple[str, Thresholds, tuple[Rule, ...]]:
    """(version, thresholds, the enabled rules in evaluation order) of a parsed rules
    document: guardrails first, decline before review, then weight descending, then file
    order. Blocklist ``file`` paths are resolved against ``base_dir``. Raises
    :class:`RulesError`."""
    for key in data:
        if key not in _TOP_KEYS:
            raise RulesError("unknown top-level key", source=source, key=key)
    version = data.get("version")
    if not isinstance(version, str) or not version.strip():
        raise RulesError("must be a non-empty string", source=source, key="version")
    thresholds = _read_thresholds(data.get("thresholds"), source)
    raw_rules = data.get("rules", [])
    if not isinstance(raw_rules, list):
        raise RulesError("must be an array of tables ([[rules]])", source=source,
                         key="rules")
    rules: list[Rule] = []
    seen: set[str] = set()
    for index, raw in enumerate(raw_rules):
        rule = _RuleReader(raw, index, source, base_dir).build()
        if rule is None:
            continue
        if rule.id in seen:
            raise RulesError("duplicate rule id", source=source, rule_id=rule.id, key="id")
        seen.add(rule.id)
        rules.append(rule)
    order = {rule.id: i for i, rule in enumerate(rules)}
    rules.sort(key=lambda r: (-r.action_rank, -r.weight, order[r.id]))
    return version.strip(), thresholds, tuple(rules)


# --------------------------------------------------------------------------- validation


def _read_thresholds(raw: Any, source: str) -> Thresholds:
    if not isinstance(raw, Mapping):
        raise RulesError("missing [thresholds] table with review and decline", source=source,
                         key="thresholds")
    values = {}
    for name in ("review", "decline"):
        v = raw.get(name)
        if not _is_number(v) or not 0.0 < v <= 1.0:
            raise RulesError(f"must be a number in (0, 1], got {v!r}", source=source,
                             key=f"thresholds.{name}")
        values[name] = float(v)
    for key in raw:
        if key not in ("review", "decline"):
            raise RulesError("unknown key", source=source, key=f"thresholds.{key}")
    try:
        return Thresholds(**values)
    except ValueError as exc:
        raise RulesError(str(exc), source=source, key="thresholds") from exc


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


class _RuleReader:
    """Reads one ``[[rules]]`` table; every error names the rule id and the key."""

    def __init__(self, raw: Any, index: int, source: str, base_dir: Path) -> None:
        self.source, self.base_dir = source, base_dir
        self.rule_id = f"#{index + 1}"  # until the id itself is known
        if not isinstance(raw, Mapping):
            self.fail("rules", "each rule must be a table")
        self.raw = raw
        rid = raw.get("id")
        if not isinstance(rid, str) or not rid.strip():
            self.fail("id", f"must be a non-empty string, got {rid!r}")
        self.rule_id = rid.strip()

    def fail(self, key: str, message: str) -> NoReturn:
        raise RulesError(message, source=self.source, rule_id=self.rule_id, key=key)

    def build(self) -> Rule | None:
        raw = self.raw
        kind = raw.get("kind")
        if kind is None:
            self.fail("kind", f"missing; expected one of {sorted(_KINDS)}")
        if kind not in _KINDS:
            self.fail("kind", f"unknown kind {kind!r}; expected one of {sorted(_KINDS)}")
        builder, kind_keys = _KINDS[kind]
        for key in raw:
            if key not in _COMMON_KEYS and key not in kind_keys:
                self.fail(key, f"unknown key for kind {kind!r}")
        weight = raw.get("weight")
        if weight is None:
            self.fail("weight", "missing")
        if not _is_number(weight) or not 0.0 < weight <= 1.0:
            self.fail("weight", f"must be a number in (0, 1], got {weight!r}")
        enabled = raw.get("enabled", True)
        if not isinstance(enabled, bool):
            self.fail("enabled", f"must be true or false, got {enabled!r}")
        description = raw.get("description", "")
        if not isinstance(description, str):
            self.fail("description", "must be a string")
        action_raw = raw.get("action", "decline" if kind == "blocklist" else None)
        action = None
        if action_raw is not None:
            if action_raw not in ("review", "decline"):
                self.fail("action", f"must be 'review' or 'decline', got {action_raw!r}")
            action = Outcome(action_raw)

        channels = None
        if "channel" in raw:
            channels = self.str_set("channel")
            for ch in channels:
                if ch not in CHANNELS:
                    self.fail("channel", f"unknown channel {ch!r}; expected {sorted(CHANNELS)}")
        checks: list[Predicate] = []
        if "mcc" in raw:
            checks.append(_in_set("mcc", self.mcc_set()))
        if "currency" in raw:
            checks.append(_in_set("currency", frozenset(c.upper()
                                                        for c in self.str_set("currency"))))
        condition = builder(self)
        if condition is not None:
            checks.append(condition)
        predicate = _all_of(checks)  # every kind contributes at least one check
        if not enabled:
            return None
        return Rule(self.rule_id, kind, float(weight), action, channels, predicate,
                    description)

    # -- typed getters

    def require(self, key: str) -> Any:
        if key not in self.raw:
            self.fail(key, "missing")
        return self.raw[key]

    def str_set(self, key: str) -> frozenset[str]:
        value = self.require(key)
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not all(isinstance(v, str) and v.strip() for v in items):
            self.fail(key, f"must be a non-empty string or a list of them, got {value!r}")
        return frozenset(v.strip() for v in items)

    def mcc_set(self) -> frozenset[str]:
        value = self.require("mcc")
        items = value if isinstance(value, list) else [value]
        out = set()
        for v in items:
            if isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 9999:
                out.add(f"{v:04d}")
            elif isinstance(v, str) and len(v.strip()) == 4 and v.strip().isdigit():
                out.add(v.strip())
            else:
                self.fail("mcc", f"must be 4-digit merchant category codes, got {v!r}")
        if not out:
            self.fail("mcc", "must not be empty")
        return frozenset(out)

    def comparison(self) -> tuple[str, float]:
        op = self.require("op")
        if op not in _OPS:
            self.fail("op", f"unknown operator {op!r}; expected one of {list(_OPS)}")
        value = self.require("value")
        if not _is_number(value):
            self.fail("value", f"must be a finite number, got {value!r}")
        return op, float(value)

    def blocklist_values(self) -> list[tuple[str, str]]:
        """(value, key it came from) for inline ``values`` and the ``file``."""
        if "values" not in self.raw and "file" not in self.raw:
            self.fail("values", "a blocklist needs 'values' and/or 'file'")
        out: list[tuple[str, str]] = []
        if "values" in self.raw:
            values = self.raw["values"]
            if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
                self.fail("values", "must be a list of strings")
            out += [(v.strip(), "values") for v in values if v.strip()]
        if "file" in self.raw:
            rel = self.raw["file"]
            if not isinstance(rel, str) or not rel:
                self.fail("file", "must be a path string")
            path = self.base_dir / rel
            try:
                out += [(v, "file") for v in read_blocklist_file(path)]
            except (OSError, UnicodeDecodeError) as exc:
                self.fail("file", f"cannot read blocklist file {str(path)!r}: {exc}")
        return out


def read_blocklist_file(path: Path) -> list[str]:
    """A blocklist file's values: one per line, blank lines and ``#`` comments skipped."""
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            out.append(line)
    return out


def inline_document(data: Mapping[str, Any], base_dir: Path) -> dict[str, Any]:
    """A rules document that stands alone, as ``fraudstream rules publish`` sends it: each
    blocklist's ``file`` read into its ``values`` (a worker elsewhere has no such file),
    and plain JSON types only (TOML dates as ISO text). Validate the document first."""
    doc: dict[str, Any] = json.loads(json.dumps(data, default=str))
    for raw in doc.get("rules", []):
        if isinstance(raw, dict) and raw.get("kind") == "blocklist" and "file" in raw:
            raw["values"] = [*raw.get("values", []),
                             *read_blocklist_file(base_dir / raw.pop("file"))]
    return doc


def check_portable(doc: Mapping[str, Any], source: str) -> None:
    """What a published rules document must also be: blocklists inline, and no value
    that looks like a raw card number (the control topic is read by every worker and
    kept). Raises :class:`RulesError`."""
    for raw in doc.get("rules", []) if isinstance(doc.get("rules"), list) else []:
        if not isinstance(raw, dict) or raw.get("kind") != "blocklist":
            continue
        rule_id = str(raw.get("id", "?"))
        if "file" in raw:
            raise RulesError("a published document holds its blocklists inline ('values'); "
                             "fraudstream rules publish reads the files into them",
                             source=source, rule_id=rule_id, key="file")
        values = raw.get("values", [])
        if isinstance(values, list) and any(isinstance(v, str) and looks_like_pan(v)
                                            for v in values):
            raise RulesError("a value looks like a raw card number; blocklist the card's "
                             "token (card_id) instead", source=source, rule_id=rule_id,
                             key="values")


# --------------------------------------------------------------------------- compilers
# Each builder validates its kind's keys and returns the kind's condition (None when the
# common filters are the whole condition). Closures capture frozensets and floats built
# once here; they read fields with ``event.get`` so absent optional fields never raise.


def _all_of(checks: list[Predicate]) -> Predicate:
    if len(checks) == 1:
        return checks[0]
    if len(checks) == 2:
        a, b = checks
        return lambda e, f: a(e, f) and b(e, f)
    checks_t = tuple(checks)
    return lambda e, f: all(c(e, f) for c in checks_t)


def _in_set(name: str, values: frozenset[str]) -> Predicate:
    return lambda e, f: e.get(name) in values


def _compare(getter: Callable[[Event, Features], Any], op: str, bound: float) -> Predicate:
    # One specialised closure per operator: no operator-module call on the hot path.
    # ``x is not None`` guards optional values; NaN compares false (except with !=).
    if op == ">":
        return lambda e, f: (x := getter(e, f)) is not None and x > bound
    if op == ">=":
        return lambda e, f: (x := getter(e, f)) is not None and x >= bound
    if op == "<":
        return lambda e, f: (x := getter(e, f)) is not None and x < bound
    if op == "<=":
        return lambda e, f: (x := getter(e, f)) is not None and x <= bound
    if op == "==":
        return lambda e, f: (x := getter(e, f)) is not None and x == bound
    return lambda e, f: (x := getter(e, f)) is not None and x == x and x != bound


def _build_amount(r: _RuleReader) -> Predicate:
    op, bound = r.comparison()
    currency = r.raw.get("in_currency")
    if currency is None:
        return _compare(lambda e, f: e.get("amount_ref"), op, bound)
    if not isinstance(currency, str) or len(currency) != 3 or not currency.isalpha() \
            or not currency.isupper():
        r.fail("in_currency", f"must be an ISO 4217 code, got {currency!r}")
    return _compare(lambda e, f: e.get("amount") if e.get("currency") == currency else None,
                    op, bound)


def _build_feature(r: _RuleReader) -> Predicate:
    name = r.require("feature")
    if not isinstance(name, str) or not name:
        r.fail("feature", f"must be a feature name, got {name!r}")
    if name not in INDEX:
        r.fail("feature", f"unknown feature {name!r} (see state/features.py FEATURE_NAMES)")
    op, bound = r.comparison()
    return _compare(lambda e, f: f.get(name), op, bound)


def _build_mcc(r: _RuleReader) -> None:
    r.require("mcc")  # the common ``mcc`` filter is the whole condition


def _build_country(r: _RuleReader) -> Predicate:
    name = r.raw.get("field", "country")
    if name not in ("country", "card_country"):
        r.fail("field", f"must be 'country' or 'card_country', got {name!r}")
    countries = r.str_set("countries")
    for c in countries:
        if len(c) != 2 or not c.isalpha():
            r.fail("countries", f"must be ISO 3166-1 alpha-2 codes, got {c!r}")
    return _in_set(name, frozenset(c.upper() for c in countries))


def _build_country_mismatch(r: _RuleReader) -> Predicate:
    # Unknown card_country (None or empty) never counts as a mismatch.
    return lambda e, f: bool(cc := e.get("card_country")) and cc != e.get("country")


def _build_blocklist(r: _RuleReader) -> Predicate:
    name = r.require("field")
    if name not in BLOCKLIST_FIELDS:
        r.fail("field", f"cannot blocklist {name!r}; expected one of {sorted(BLOCKLIST_FIELDS)}")
    entries = r.blocklist_values()
    if name != "ip":
        return _in_set(name, frozenset(v for v, _ in entries))
    groups: dict[tuple[int, int], set[int]] = {}
    for value, key in entries:
        try:
            net = ipaddress.ip_network(value, strict=True)
        except ValueError as exc:
            r.fail(key, f"bad IP address or CIDR {value!r}: {exc}")
        bits = net.max_prefixlen
        shift = bits - net.prefixlen
        groups.setdefault((net.version, shift), set()).add(int(net.network_address) >> shift)
    return _ip_matcher(tuple((v, s, frozenset(p)) for (v, s), p in groups.items()))


def _ip_matcher(groups: tuple[tuple[int, int, frozenset[int]], ...]) -> Predicate:
    """Match an event's ``ip`` against networks grouped by (IP version, host bits).

    Parsing uses ``socket.inet_pton`` (strict, ~10x cheaper than ``ipaddress``); an
    unparseable or absent ip never matches. IPv4-mapped IPv6 addresses match as IPv4.
    """
    inet_pton, af4, af6 = socket.inet_pton, socket.AF_INET, socket.AF_INET6
    from_bytes = int.from_bytes

    def match(e: Event, f: Features) -> bool:
        s = e.get("ip")
        if not s:
            return False
        try:
            version, n = 4, from_bytes(inet_pton(af4, s), "big")
        except (OSError, ValueError, TypeError):
            try:
                version, n = 6, from_bytes(inet_pton(af6, s), "big")
            except (OSError, ValueError, TypeError):
                return False
            if n >> 32 == 0xFFFF:
                version, n = 4, n & 0xFFFFFFFF
        for v, shift, prefixes in groups:
            if v == version and (n >> shift) in prefixes:
                return True
        return False

    return match


_KINDS: dict[str, tuple[Callable[[_RuleReader], Predicate | None], frozenset[str]]] = {
    "amount": (_build_amount, frozenset({"op", "value", "in_currency"})),
    "feature": (_build_feature, frozenset({"feature", "op", "value"})),
    "mcc": (_build_mcc, frozenset()),
    "country": (_build_country, frozenset({"countries", "field"})),
    "country_mismatch": (_build_country_mismatch, frozenset()),
    "blocklist": (_build_blocklist, frozenset({"field", "values", "file"})),
}

