"""The autopilot's record: one JSON event per step on ``fraudstream.autopilot`` (one
partition, compacted, each event under a key of its own so that all stay), read back by a
restarted autopilot to resume, and by ``fraudstream model history``.

The value::

    {"kind": "rejected", "at": 1796205600000, "version": "v20261202-...",
     "champion": "v20261125-...", "reason": "average precision 0.41 against ...",
     "details": {...}}

Kinds, in the order a retraining goes: ``started`` (the autopilot process, and what it
resumed), ``trigger``, ``skipped`` (a trigger the guards held back), ``training_started``,
``training_failed``, ``trained``, ``rejected`` or ``accepted`` (the replay comparison),
``shadow_started``, ``canary_started``, then ``promoted``, ``rolled_back`` or ``aborted``.

Fenced by term: an autopilot that takes the lease writes ``started`` first, and every
later event of its own carries that event's offset as its ``term``. Reading in order, an
event whose term is older than the last ``started`` came from an autopilot that no longer
held the lease (its session lapsed while it worked): it stays on the topic, shown as
superseded, and nothing resumes from it.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from fraudstream.streams.control.topic import control_consumer, read_to_end, write_acked
from fraudstream.streams.settings import Settings

KINDS = ("started", "trigger", "skipped", "training_started", "training_failed", "trained",
         "rejected", "accepted", "shadow_started", "canary_started", "promoted",
         "rolled_back", "aborted")
#: A rollout of the autopilot's ended with one of these.
ENDINGS = ("promoted", "rolled_back", "aborted")


@dataclass(frozen=True)
class Event:
    kind: str
    at: int
    reason: str
    version: str | None = None
    champion: str | None = None
    details: dict[str, Any] = field(default_factory=dict)
    #: The offset of the ``started`` event of the autopilot that wrote it (None: a
    #: ``started`` event itself, or one written before terms).
    term: int | None = None
    #: Where it was read on the topic (not written: the broker assigns it).
    offset: int | None = field(default=None, compare=False)

    def key(self) -> bytes:
        return f"{self.at:013d}/{self.kind}".encode()

    def encode(self) -> bytes:
        data = asdict(self)
        del data["offset"]
        return json.dumps(data, sort_keys=True, default=str).encode()

    @classmethod
    def decode(cls, value: bytes | None) -> Event | None:
        """The event, or None for a record that is not one."""
        try:
            data = json.loads(value or b"")
            data.pop("offset", None)
            event = cls(**data)
        except (ValueError, TypeError):
            return None
        return event if event.kind in KINDS else None


def publish_event(settings: Settings, event: Event) -> Event:
    """The event, acknowledged by the broker, with its offset; raises RuntimeError naming
    what failed."""
    offsets = write_acked(settings, settings.topics.autopilot,
                          [(event.key(), event.encode())], 15.0, linger_ms=0)
    return replace(event, offset=offsets[0])


def read_events(settings: Settings, timeout_s: float = 30.0) -> list[Event]:
    """Every event on the topic, oldest first (none when the topic does not exist)."""
    try:
        consumer = control_consumer(settings, f"autopilot-{int(time.time() * 1000)}",
                                    settings.topics.autopilot)
    except LookupError:
        return []
    out = []
    try:
        for msg in read_to_end(consumer, timeout_s):
            event = Event.decode(msg.value())
            if event is not None:
                out.append(replace(event, offset=msg.offset()))
    finally:
        consumer.close()
    return out


@dataclass
class Resume:
    """Where a (re)started autopilot stands, from its events."""

    #: "idle", "shadow" or "canary".
    phase: str = "idle"
    version: str | None = None
    champion: str | None = None
    #: When the phase began (epoch ms).
    phase_at: int = 0
    last_training_at: int | None = None
    rollout_ended_at: int | None = None
    training_failed_at: int | None = None
    #: A training or comparison that a stop cut short (its version, if it had one).
    interrupted: str | None = None


def superseded(events: list[Event]) -> list[bool]:
    """For each event (in topic order): whether an autopilot that no longer held the
    lease wrote it (its term older than a ``started`` before it)."""
    term: int | None = None
    out = []
    for e in events:
        if e.kind == "started" and e.offset is not None:
            term = e.offset
        out.append(e.kind != "started" and e.term is not None and term is not None
                   and e.term < term)
    return out


def resume(events: list[Event]) -> Resume:
    r = Resume()
    open_training = False
    for e, stale in zip(events, superseded(events), strict=True):
        if stale:
            continue
        if e.kind == "training_started":
            r.last_training_at, open_training = e.at, True
            r.phase, r.version, r.champion = "idle", None, e.champion
        elif e.kind == "trained":
            r.version = e.version
        elif e.kind in ("training_failed", "skipped"):
            r.training_failed_at, open_training = e.at, False
        elif e.kind in ("rejected",) + ENDINGS:
            r.rollout_ended_at, open_training = e.at, False
            r.phase, r.version = "idle", None
        elif e.kind in ("shadow_started", "canary_started"):
            r.phase, r.version, r.champion, r.phase_at = e.kind.split("_")[0], e.version, \
                e.champion, e.at
            open_training = False
    if open_training:
        r.interrupted = r.version or "-"
    return r
