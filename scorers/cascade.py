"""The model stage of the cascade: the active model (and a shadow) under a deadline.

Rules always run first and their decision stands ready. :meth:`ModelStage.run` then gives
the model what is left of the batch's budget, and at least ``floor_s`` (the model
timeout): the call runs in a worker thread (ONNX Runtime releases the GIL) and is
abandoned when that time is up, so a stalled model costs one timeout, not a stalled
worker. While an abandoned call is still running, the next batches fall back at once
("busy") rather than queue behind it.

A batch already past its budget when the model stage starts (a backlog, a fetch that
waited) is still decided by a healthy model: it is late either way, and the rules would
only make it late and less accurate. The decision says how late (``late_ms``); the
fallback is kept for a model that fails or stalls.

Causes of a fallback, named in the decision's reasons as ``fallback:<cause>``: ``timeout``,
``busy``, ``error`` (the model raised), ``nan`` (a non-finite score for that event),
``degraded`` (the features could not be read), ``model_unavailable`` (the registry's
ACTIVE pointer names a version that was refused, and no model serves:
:attr:`ModelStage.unavailable`). With no ACTIVE pointer at all the rules decide by design:
no fallback.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

import numpy as np

from fraudstream.scorers.base import Score
from fraudstream.scorers.canary import CANARY, CHAMPION, Rollout, in_canary
from fraudstream.scorers.drift import DriftConfig, DriftMonitor

#: (score, stage, fallback cause or None) -> the rules' decision fields.
RulesVerdict = Callable[[Score, str, "str | None"], dict[str, Any]]

log = logging.getLogger("fraudstream.cascade")


class ModelStage:
    def __init__(self, active: Any = None, shadow: Any = None,
                 drift: DriftConfig | None = None) -> None:
        #: Swapped whole by the worker when the registry's pointers change.
        self.active = active
        self.shadow = shadow
        self.drift_config = drift
        #: The monitor of the active version (its last window feeds the drift gauges).
        self.drift: DriftMonitor | None = None
        #: The fallback cause while ``active`` is None although a version should serve
        #: (``"model_unavailable"``); None when the rules decide by design.
        self.unavailable: str | None = None
        #: The rollout in force and its canary version, loaded (None: no rollout).
        self.rollout: Rollout | None = None
        self.canary: Any = None
        #: Milliseconds of the last call of each version (its model-stage time).
        self.took_ms: dict[str, float] = {}
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")
        self._pending: Future[Any] | None = None

    def serving_canary(self) -> Any:
        """The canary version while it serves a share of cards (a running rollout), and
        not once it is the active version."""
        rollout, active = self.rollout, self.active
        if rollout is None or self.canary is None or rollout.share <= 0.0:
            return None
        if active is not None and active.version == self.canary.version:
            return None
        return self.canary

    def serve_canary(self, canary: Any, verdicts: list[dict[str, Any]], card_ids: list[str],
                     X: np.ndarray | None, scores: list[Score], deadline: float, floor_s: float,
                     blend: Callable[[np.ndarray], tuple[np.ndarray, list[bool]]],
                     rules: RulesVerdict, fallbacks: Counter[str]) -> dict[str, float]:
        """Give the canary's cards the canary's decisions (in place); every verdict gets
        its variant. Returns the model-stage times of both variants for this batch."""
        assert self.rollout is not None
        mine = in_canary(card_ids, self.rollout.share)
        for v in verdicts:
            v["variant"] = CHAMPION
        idx = np.flatnonzero(mine).tolist()
        if not idx:
            return {}
        times = {}
        if self.active is not None and self.active.version in self.took_ms:
            times[f"model_{CHAMPION}"] = self.took_ms[self.active.version]
        p, reasons, cause = (self.run(canary, X, deadline, floor_s) if X is not None
                             else (None, None, "degraded"))
        if canary.version in self.took_ms and X is not None:
            times[f"model_{CANARY}"] = self.took_ms[canary.version]
        if p is None or reasons is None:
            fallbacks[f"canary_{cause}"] += len(idx)
            for i in idx:
                v = verdicts[i]
                v.update(variant=CANARY, fallback=True,
                         reasons=[*v["reasons"], f"fallback:canary_{cause}"])
            return times
        p, online = blend(p)
        picked = verdicts_of(canary, [scores[i] for i in idx], p[idx],
                             [reasons[i] for i in idx], "model", fallbacks, "canary_", rules)
        for i, v in zip(idx, picked, strict=True):
            if online and online[i] and not v["fallback"]:
                v["stage"] = "online"
            v["variant"] = CANARY
            verdicts[i] = v
        return times

    def drift_monitor(self, model: Any) -> DriftMonitor | None:
        """The drift monitor of ``model`` (a new one when the active version changed)."""
        if self.drift_config is None or getattr(model, "reference", None) is None:
            return None
        if self.drift is None or self.drift.version != model.version:
            self.drift = DriftMonitor(model.version, model.reference, self.drift_config)
        return self.drift

    def run(self, model: Any, X: np.ndarray, deadline: float, floor_s: float = 0.0
            ) -> tuple[np.ndarray | None, list[list[str]] | None, str | None]:
        """(scores, reasons, None) or (None, None, cause). The call may take what is left
        before ``deadline`` (``perf_counter`` time), and at least ``floor_s``."""
        remaining = max(deadline - time.perf_counter(), floor_s)
        if remaining <= 0:
            return None, None, "timeout"
        if self._pending is not None and not self._pending.done():
            return None, None, "busy"
        started = time.perf_counter()
        try:
            if remaining == float("inf"):
                # No deadline (a replay): the model runs on this thread, as long as it
                # takes. The hand-off to the model's thread and back is for a deadline.
                scores, reasons = _predict(model, X)
            else:
                future = self._pool.submit(_predict, model, X)
                self._pending = future
                scores, reasons = future.result(timeout=remaining)
            self.took_ms[model.version] = (time.perf_counter() - started) * 1000.0
        except FutureTimeout:
            return None, None, "timeout"
        except Exception:  # any failure of the model is a fallback, never a crash
            log.exception("model %s failed on a batch of %d", model.version, len(X))
            return None, None, "error"
        return scores, reasons, None


def _predict(model: Any, X: np.ndarray) -> tuple[np.ndarray, list[list[str]]]:
    return model.predict(X), model.reasons(X)


def verdicts_of(model: Any, scores: list[Score], p: np.ndarray, reasons: list[list[str]],
                stage: str, fallbacks: Counter[str], cause_prefix: str, rules: RulesVerdict,
                ) -> list[dict[str, Any]]:
    """``model``'s decisions: its thresholds, the rules' guardrails as a floor, the rules'
    decision (fallback ``nan``, counted as ``<cause_prefix>nan``) where its score is not
    finite. The shadow and the canary go through the same steps as the champion, so they
    show what the version decides when it serves."""
    verdicts = []
    for s, value, why in zip(scores, p.tolist(), reasons, strict=True):
        if not math.isfinite(value):
            fallbacks[f"{cause_prefix}nan"] += 1
            verdicts.append(rules(s, stage, "nan"))
            continue
        outcome = model.thresholds.outcome(value)
        if s.hard and s.outcome.rank > outcome.rank:
            outcome = s.outcome  # a guardrail is a floor
        verdicts.append({"decision": str(outcome), "score": value,
                         "reasons": [*(s.reasons if s.hard else []), *why],
                         "model_version": model.version, "stage": stage,
                         "fallback": False})
    return verdicts
