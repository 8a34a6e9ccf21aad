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
import time
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

import numpy as np

from fraudstream.scorers.drift import DriftConfig, DriftMonitor

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
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")
        self._pending: Future[Any] | None = None

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
        future = self._pool.submit(_predict, model, X)
        self._pending = future
        try:
            # an infinite deadline (a replay) waits as long as the model takes
            scores, reasons = future.result(
                timeout=remaining if remaining != float("inf") else None)
        except FutureTimeout:
            return None, None, "timeout"
        except Exception:  # any failure of the model is a fallback, never a crash
            log.exception("model %s failed on a batch of %d", model.version, len(X))
            return None, None, "error"
        return scores, reasons, None


def _predict(model: Any, X: np.ndarray) -> tuple[np.ndarray, list[list[str]]]:
    return model.predict(X), model.reasons(X)
