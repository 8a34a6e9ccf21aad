"""Records of the control topic (``fraudstream.control``): the desired state that every
worker applies, and the audit trail of who changed it, when and why.

One record per change, JSON, written twice by the publisher: under the key of what it sets
(``rules``: a rules document; ``model``: ``{"active": version, "shadow": version or
null}``, whose files travel on the artifacts topic; ``canary``: a rollout and its step,
:mod:`fraudstream.scorers.canary`; ``rates``: an exchange-rates table as its file reads,
:mod:`fraudstream.schemas.fx`), so that a compacted topic keeps the
latest, and under a key of its own (``audit/<kind>/<published_at>/<sha256 prefix>``), so
that compaction keeps every change for the history. A worker applies the latest record of
each kind that it accepts.

The value::

    {"kind": "rules", "version": "2026-12-02", "sha256": "<of the document>",
     "document": {...}, "published_by": "ana@fraud-ops", "published_at": 1796205600000,
     "reason": "block merchant m-991 after the chargeback wave"}

``sha256`` covers the document in canonical JSON (sorted keys, no spaces): a record whose
document does not match it is refused as corrupt. What a document must hold is the reader
of its kind's business (:mod:`fraudstream.scorers.rules_file` for rules).

**Fenced changes.** A publisher reads the state in force, makes its change from it, and
names that state in ``prev`` (its :meth:`ControlRecord.ref`; ``""``: none was published).
Every reader replays the audit records in the topic's order (one partition) through
:class:`Heads`: a record whose ``prev`` is no longer the state in force of its kind was made
from a state another change replaced meanwhile, so it is *superseded*: no reader applies it,
and the publisher, reading the topic back, is told so. Two operators publishing at once, or
a controller that lost its lease while frozen, cannot overwrite a change they did not see.
The audit records, each under a key of its own, are what readers replay: compaction keeps
all of them, while the state key keeps only the last record written, superseded or not. A
record without ``prev`` (written before fencing, or by hand) applies as it comes.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, replace
from typing import Any

KINDS = ("rules", "model", "canary", "rates")
AUDIT_PREFIX = "audit/"


class ControlError(ValueError):
    """A control record that cannot be applied; the message says why."""


def digest(document: Any) -> str:
    """sha256 of ``document`` in canonical JSON."""
    text = json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class ControlRecord:
    kind: str
    version: str
    sha256: str
    document: Any
    published_by: str
    published_at: int  # epoch ms
    reason: str
    #: The state this change was made from (see the module doc); None: unfenced.
    prev: str | None = None

    @classmethod
    def make(cls, kind: str, version: str, document: Any, published_by: str,
             published_at: int, reason: str) -> ControlRecord:
        return cls(kind, version, digest(document), document, published_by, published_at,
                   reason)

    def state_key(self) -> bytes:
        return self.kind.encode()

    def audit_key(self) -> bytes:
        return f"{AUDIT_PREFIX}{self.kind}/{self.published_at:013d}/{self.sha256[:12]}".encode()

    def ref(self) -> str:
        """What names this change: its audit key."""
        return self.audit_key().decode()

    def after(self, head: ControlRecord | None) -> ControlRecord:
        """This change, fenced: made from ``head``, the state of its kind in force."""
        return replace(self, prev=ref_of(head))

    def encode(self) -> bytes:
        fields = asdict(self)
        if self.prev is None:
            del fields["prev"]
        return json.dumps(fields, sort_keys=True, separators=(",", ":"),
                          ensure_ascii=False).encode()


def active_version(state: ControlRecord | None) -> str | None:
    """The active version a model state names (None: no state, or none named)."""
    doc = state.document if state is not None else None
    active = doc.get("active") if isinstance(doc, dict) else None
    return active if isinstance(active, str) else None


def ref_of(record: ControlRecord | None) -> str:
    return "" if record is None else record.ref()


APPLIED, REPEATED, SUPERSEDED = "applied", "repeated", "superseded"


class Heads:
    """The state of each kind in force, as every reader of the topic agrees on it: offer
    each audit record in the topic's order (see the module doc)."""

    def __init__(self) -> None:
        self._head: dict[str, ControlRecord] = {}

    def get(self, kind: str) -> ControlRecord | None:
        return self._head.get(kind)

    def offer(self, record: ControlRecord) -> str:
        """APPLIED (now the state of its kind), REPEATED (the change in force, read
        again) or SUPERSEDED (made from a state no longer in force: not applied)."""
        head = self._head.get(record.kind)
        if head is not None and head.ref() == record.ref():
            return REPEATED
        if record.prev is not None and record.prev != ref_of(head):
            return SUPERSEDED
        self._head[record.kind] = record
        return APPLIED


def decode(value: bytes | None) -> ControlRecord:
    """The record in ``value``, checked: a known kind, every field of its type, and a
    document that matches its sha256. Raises :class:`ControlError`."""
    if value is None:
        raise ControlError("empty record (a tombstone)")
    try:
        data = json.loads(value)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ControlError(f"not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ControlError("not a JSON object")
    types = {"kind": str, "version": str, "sha256": str, "published_by": str,
             "published_at": int, "reason": str}
    for name, kind in types.items():
        if not isinstance(data.get(name), kind) or isinstance(data.get(name), bool):
            raise ControlError(f"field {name!r} missing or not a {kind.__name__}")
    if data["kind"] not in KINDS:
        raise ControlError(f"unknown kind {data['kind']!r}; expected one of {list(KINDS)}")
    if "document" not in data:
        raise ControlError("field 'document' missing")
    if digest(data["document"]) != data["sha256"]:
        raise ControlError("the document does not match its sha256 (corrupt or edited)")
    prev = data.get("prev")
    if prev is not None and not isinstance(prev, str):
        raise ControlError("field 'prev' not a string")
    return ControlRecord(data["kind"], data["version"], data["sha256"], data["document"],
                         data["published_by"], data["published_at"], data["reason"], prev)


def is_audit(key: bytes | None) -> bool:
    return key is not None and key.startswith(AUDIT_PREFIX.encode())


def audit_kind(key: bytes) -> str:
    """The kind an audit key names (``audit/<kind>/...``), for a record that cannot be read;
    ``unknown`` for none of :data:`KINDS`."""
    kind = key[len(AUDIT_PREFIX):].split(b"/", 1)[0].decode("utf-8", "replace")
    return kind if kind in KINDS else "unknown"
