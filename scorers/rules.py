"""Declarative fraud rules: a versioned TOML file compiled into fast Python predicates.

The rules scorer runs on every event of the hot path and is the fallback when a model
misses its deadline, so it must be cheap: :meth:`RuleSet.load` validates the file once and
compiles every rule into a closure over frozensets and constants; scoring an event is then
a dictionary lookup plus one call per applicable rule.

File format: a top-level ``version`` (reported as ``rules@<version>``), a
``[thresholds]`` table (``review``, ``decline``) on the combined score, and one
``[[rules]]`` table per rule; ``scorers/rules/default.toml`` is the worked example.

Rule keys common to every kind: ``id``, ``kind``, ``weight`` (required); ``action``
(``"review"`` | ``"decline"``: a guardrail that forces at least that outcome);
``description``; ``enabled`` (default true); and the optional filters ``channel``,
``mcc``, ``currency`` (a value or a list; the rule only applies when the event matches).

Kinds and their own keys:

- ``amount``: ``op``, ``value`` -- ``amount_ref <op> value``: the amount converted into
  the rates table's reference currency (EUR by default, :mod:`fraudstream.schemas.fx`), so one
  threshold means the same value in every currency. With ``in_currency = "JPY"`` the rule
  compares the original amount instead and applies only to transactions in that currency.
- ``mcc``: fires when the event's ``mcc`` is in the (required) ``mcc`` list.
- ``country``: ``countries`` list; ``field`` = ``"country"`` (default) or
  ``"card_country"``.
- ``country_mismatch``: ``country != card_country`` when ``card_country`` is known.
- ``blocklist``: ``field`` (card_id, customer_id, merchant_id, terminal_id, device_id,
  ip); ``values`` (inline list) and/or ``file`` (one value per line, ``#`` comments,
  path relative to the rules file). For ``ip``, values may be addresses or CIDR
  networks. A blocklist is a guardrail: ``action`` defaults to ``"decline"``.
- ``feature``: ``feature``, ``op``, ``value`` -- ``features[feature] <op> value``; does
  not fire when the feature is missing (or None/NaN).

``op`` is one of ``>``, ``>=``, ``<``, ``<=``, ``==``, ``!=``.

:mod:`fraudstream.scorers.rules_file` validates and compiles a file; its errors are
:class:`~fraudstream.scorers.rules_file.RulesError`.

Combination: ``score = 1 - prod(1 - weight)`` over the fired rules (0 when none fired);
the outcome comes from the thresholds, raised to the most severe fired guardrail action;
``reasons`` lists the fired rule ids, guardrails first (decline before review), then by
weight descending, then in file order.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import repeat
from pathlib import Path
from typing import Any

from fraudstream.scorers.base import Event, Features, Outcome, Score, Thresholds
from fraudstream.scorers.rules_file import (
    CHANNELS,
    Predicate,
    Rule,
    check_portable,
    compile_rules,
    read_toml,
)

__all__ = [
    "DEFAULT_RULES_PATH",
    "RuleSet",
    "RulesScorer",
]

DEFAULT_RULES_PATH = Path(__file__).with_name("rules") / "default.toml"

_NO_FEATURES: Features = {}
_Compiled = tuple[str, Predicate, float, int]  # (id, predicate, 1 - weight, action rank)


@dataclass(frozen=True, slots=True)
class RuleSet:
    """A validated rules file: version, thresholds, and the enabled rules in evaluation
    order (guardrails first, decline before review, then weight descending, then file
    order). Immutable; to reload, load a new one and swap the scorer."""

    version: str
    thresholds: Thresholds
    rules: tuple[Rule, ...]
    source: str = "<dict>"

    @classmethod
    def load(cls, path: str | Path) -> RuleSet:
        """Read, validate and compile a TOML rules file. Raises
        :class:`~fraudstream.scorers.rules_file.RulesError`."""
        path = Path(path)
        return cls.from_dict(read_toml(path), base_dir=path.parent, source=str(path))

    @classmethod
    def from_document(cls, doc: Mapping[str, Any], source: str) -> RuleSet:
        """A published rules document (:func:`~fraudstream.scorers.rules_file.
        inline_document`): blocklists inline, no raw card number, then validated like a
        file. Raises :class:`~fraudstream.scorers.rules_file.RulesError`."""
        check_portable(doc, source)
        return cls.from_dict(doc, source=source)

    @classmethod
    def default(cls) -> RuleSet:
        """The rules shipped with the package (``scorers/rules/default.toml``)."""
        return cls.load(DEFAULT_RULES_PATH)

    @classmethod
    def from_dict(
        cls,
        data: Mapping[str, Any],
        *,
        base_dir: str | Path | None = None,
        source: str = "<dict>",
    ) -> RuleSet:
        """Validate and compile an already-parsed rules document (same shape as the TOML).

        Blocklist ``file`` paths are resolved against ``base_dir`` (default: the
        current directory). Raises :class:`~fraudstream.scorers.rules_file.RulesError`.
        """
        base = Path(base_dir) if base_dir is not None else Path()
        version, thresholds, rules = compile_rules(data, base, source)
        return cls(version=version, thresholds=thresholds, rules=rules, source=source)


class RulesScorer:
    """The :class:`~fraudstream.scorers.base.Scorer` for a :class:`RuleSet`; ``version`` is
    ``"rules@<ruleset version>"``. Stateless and thread-safe; ``learn_batch`` is a no-op.
    """

    def __init__(self, ruleset: RuleSet) -> None:
        self.ruleset = ruleset
        self.version = f"rules@{ruleset.version}"
        self._review = ruleset.thresholds.review
        self._decline = ruleset.thresholds.decline
        # Bucket the rules by channel once, so the channel filter costs nothing per rule,
        # and keep a second table without the feature rules for batches with no features.
        self._tables = (self._bucket(ruleset.rules),
                        self._bucket(r for r in ruleset.rules if r.kind != "feature"))

    @staticmethod
    def _bucket(rules: Iterable[Rule]) -> tuple[dict[Any, tuple[_Compiled, ...]],
                                                 tuple[_Compiled, ...]]:
        compiled = [(r, (r.id, r.predicate, 1.0 - r.weight, r.action_rank)) for r in rules]
        by_channel = {
            ch: tuple(c for r, c in compiled if r.channels is None or ch in r.channels)
            for ch in CHANNELS
        }
        return by_channel, tuple(c for r, c in compiled if r.channels is None)

    def score_batch(
        self,
        events: Sequence[Event],
        features: Sequence[Features] | None = None,
    ) -> list[Score]:
        """One :class:`Score` per event, in order. ``features`` (aligned with ``events``)
        feeds ``feature`` rules; without it those rules do not fire."""
        feature_rows: Iterable[Features]
        if features is None:
            by_channel, any_channel = self._tables[1]
            feature_rows = repeat(_NO_FEATURES, len(events))
        elif len(features) != len(events):
            raise ValueError(
                f"features must align with events: {len(features)} != {len(events)}"
            )
        else:
            by_channel, any_channel = self._tables[0]
            feature_rows = features
        review, decline = self._review, self._decline
        approve_o, review_o, decline_o = Outcome.APPROVE, Outcome.REVIEW, Outcome.DECLINE
        out: list[Score] = []
        append = out.append
        for event, feats in zip(events, feature_rows):  # noqa: B905 - lengths checked
            keep = 1.0
            forced = 0
            reasons: list[str] = []
            for rule_id, predicate, complement, rank in by_channel.get(
                event.get("channel"), any_channel
            ):
                if predicate(event, feats):
                    keep *= complement
                    reasons.append(rule_id)
                    if rank > forced:
                        forced = rank
            score = 1.0 - keep
            if score >= decline or forced == 2:
                outcome = decline_o
            elif score >= review or forced == 1:
                outcome = review_o
            else:
                outcome = approve_o
            append(Score(score, outcome, reasons, forced > 0))
        return out

    def learn_batch(self, features: Sequence[Features], labels: Sequence[int]) -> None:
        """Rules do not learn: a no-op."""

