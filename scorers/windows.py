"""Explicit event-time windows for training: warm-up, train, validation, test.

``fraudstream train`` splits a history by fractions of its span unless told otherwise. A
fraud team states its protocol instead: features built from April on (warm-up, never fitted
on), fit on the last weeks of July, pick the ensemble weight and thresholds on the next
week, measure on a later one, after the label delay. :class:`Windows` says that, in epoch
milliseconds, each window ``[from, to)``.

With explicit windows:

* transactions before ``warmup_from`` are not read at all; those from it to the train
  window's start feed the features only, as do transactions between or after windows;
* the models learn only from labels known when the test window starts (``label_time``
  before it): a label that arrives later would not have been there to train on;
* the test window should start at least one label delay after the validation window
  ends, or its first days are judged by a model that could not have seen their labels'
  precursors; :meth:`Windows.gap_warning` says so, and the training report repeats it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

NAMES = ("train", "valid", "test")


class WindowError(ValueError):
    """Windows that cannot be used (out of order, overlapping, missing a bound)."""


@dataclass(frozen=True)
class Windows:
    train_to: int
    valid_from: int
    valid_to: int
    test_from: int
    #: None: from the first transaction read (at or after ``warmup_from``).
    train_from: int | None = None
    #: None: to the last transaction of the history.
    test_to: int | None = None
    #: None: every transaction of the history is read.
    warmup_from: int | None = None

    def __post_init__(self) -> None:
        points = [("--warmup-from", self.warmup_from), ("--train-from", self.train_from),
                  ("--train-to", self.train_to), ("--valid-from", self.valid_from),
                  ("--valid-to", self.valid_to), ("--test-from", self.test_from),
                  ("--test-to", self.test_to)]
        given = [(name, t) for name, t in points if t is not None]
        for (a, ta), (b, tb) in zip(given, given[1:], strict=False):
            strict = (a, b) in (("--train-from", "--train-to"), ("--valid-from", "--valid-to"),
                                ("--test-from", "--test-to"))
            if tb < ta or (strict and tb == ta):
                raise WindowError(f"{b} must come after {a}: windows are warm-up, train, "
                                  "valid, test, in that order, without overlap")

    def bounds(self, name: str) -> tuple[float, float]:
        lo, hi = {"train": (self.train_from, self.train_to),
                  "valid": (self.valid_from, self.valid_to),
                  "test": (self.test_from, self.test_to)}[name]
        return (-np.inf if lo is None else lo), (np.inf if hi is None else hi)

    def reads(self, event_time: int) -> bool:
        """Whether an event at ``event_time`` is read at all (features or fit)."""
        return self.warmup_from is None or event_time >= self.warmup_from

    def keeps(self, event_time: int) -> bool:
        """Whether a transaction at ``event_time`` is in one of the three windows."""
        for name in NAMES:
            lo, hi = self.bounds(name)
            if lo <= event_time < hi:
                return True
        return False

    def split(self, times: np.ndarray) -> dict[str, np.ndarray]:
        """Index arrays of the three windows."""
        out = {}
        for name in NAMES:
            lo, hi = self.bounds(name)
            out[name] = np.flatnonzero((times >= lo) & (times < hi))
        return out

    def gap_warning(self, label_delay_ms: int) -> str | None:
        """A sentence when the test window starts within one label delay of the end of the
        validation window, else None."""
        gap = self.test_from - self.valid_to
        if gap >= label_delay_ms:
            return None
        return (f"the test window starts {gap / 86_400_000:.1f} days after the validation "
                f"window ends, less than the label delay ({label_delay_ms / 86_400_000:.1f} "
                "days): its first days are judged by a model that could not have learned "
                "from the labels of the days just before")


def from_flags(warmup_from: int | None, train_from: int | None, train_to: int | None,
               valid_from: int | None, valid_to: int | None, test_from: int | None,
               test_to: int | None) -> Windows | None:
    """The windows the flags give, or None (the fractions apply) when none is given."""
    needed = {"--train-to": train_to, "--valid-from": valid_from, "--valid-to": valid_to,
              "--test-from": test_from}
    optional = (warmup_from, train_from, test_to)
    if all(v is None for v in needed.values()) and all(v is None for v in optional):
        return None
    missing = [name for name, v in needed.items() if v is None]
    if missing:
        raise WindowError(f"explicit windows need {', '.join(missing)} too (only --warmup-from, "
                          "--train-from and --test-to may be left out)")
    assert train_to is not None and valid_from is not None and valid_to is not None
    assert test_from is not None
    return Windows(train_to, valid_from, valid_to, test_from, train_from, test_to, warmup_from)
