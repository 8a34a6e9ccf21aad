"""Records of the control topic (``fraudstream.control``): the desired state that every
worker applies, and the audit trail of who changed it, when and why.

One record per change, JSON, written twice by the publisher: under the key of what it sets
(``rules``: a rules document; ``model``: ``{"active": version, "shadow": version or
null}``, whose files travel on the artifacts topic; ``canary``: a rollout and its step,
:mod:`fraudstream.scorers.canary`), so that a compacted topic keeps the
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
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Any

KINDS = ("rules", "model", "canary")
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

    @classmethod
    def make(cls, kind: str, version: str, document: Any, published_by: str,
             published_at: int, reason: str) -> ControlRecord:
        return cls(kind, version, digest(document), document, published_by, published_at,
                   reason)

    def state_key(self) -> bytes:
        return self.kind.encode()

    def audit_key(self) -> bytes:
        return f"{AUDIT_PREFIX}{self.kind}/{self.published_at:013d}/{self.sha256[:12]}".encode()

    def encode(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":"),
                          ensure_ascii=False).encode()


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
    return ControlRecord(data["kind"], data["version"], data["sha256"], data["document"],
                         data["published_by"], data["published_at"], data["reason"])


def is_audit(key: bytes | None) -> bool:
    return key is not None and key.startswith(AUDIT_PREFIX.encode())
