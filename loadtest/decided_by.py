"""Who decided: every worker rate of ``python -m fraudstream.loadtest`` comes with how many of
its decisions the model made, how many the rules made by design (no ACTIVE model), and how
many fell back to the rules, by cause.

Read from the decisions themselves (``stage``, ``fallback``, and the ``fallback:<cause>``
reason; see ``fraudstream.scorers.cascade``), so the counts cover exactly the decisions a
rate was measured on. A rate whose decisions mostly fell back is features plus rules, not
the model: the report says so next to the number.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

MODEL = "model"
RULES = "rules"
#: the cause of a fallback decision that names none among its reasons
UNKNOWN = "unknown"
_PREFIX = "fallback:"


def decider(decision: Mapping[str, Any]) -> str:
    """``"model"``, ``"rules"`` (by design: no model to ask) or the fallback's cause
    (``timeout``, ``busy``, ``error``, ``nan``, ``degraded``, ``model_unavailable``;
    ``deadline`` from a worker of before late batches went to the model)."""
    if decision["fallback"]:
        for reason in decision["reasons"]:
            if reason.startswith(_PREFIX):
                return reason[len(_PREFIX):]
        return UNKNOWN
    return RULES if decision["stage"] == RULES else MODEL


def tally(deciders: Iterable[str]) -> dict[str, Any]:
    """Counts of :func:`decider` values: ``model``, ``rules``, ``fallback`` (all causes)
    and ``fallback_by_cause`` (largest first)."""
    counts = Counter(deciders)
    model, rules = counts.pop(MODEL, 0), counts.pop(RULES, 0)
    return {"model": model, "rules": rules, "fallback": sum(counts.values()),
            "fallback_by_cause": dict(counts.most_common())}


def describe(counts: Mapping[str, Any] | None) -> str:
    """One line for a report: ``model 9,950, fallback 50 (deadline 40, timeout 10)``;
    the rules' own decisions are named when there are any."""
    if counts is None:
        return "decided by: -"
    total = counts["model"] + counts["rules"] + counts["fallback"]
    if not total:
        return "decided by: no decisions"
    parts = [f"model {counts['model']:,}"]
    if counts["rules"]:
        parts.append(f"rules {counts['rules']:,} (no model)")
    fallback = f"fallback {counts['fallback']:,}"
    if counts["fallback"]:
        fallback += " (" + ", ".join(f"{cause} {n:,}" for cause, n in
                                     counts["fallback_by_cause"].items()) + ")"
    parts.append(fallback)
    return f"decided by: {', '.join(parts)} of {total:,}"


def brief(counts: Mapping[str, Any] | None) -> str:
    """The same for a table cell: ``9,950 model, 50 fb (deadline 40, timeout 10)``."""
    if counts is None:
        return "-"
    text = f"{counts['model']:,} model, {counts['fallback']:,} fb"
    if counts["fallback"]:
        text += " (" + ", ".join(f"{cause} {n:,}" for cause, n in
                                 counts["fallback_by_cause"].items()) + ")"
    if counts["rules"]:
        text += f", {counts['rules']:,} rules"
    return text
