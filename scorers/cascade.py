"""The model stage of the cascade: the active model (and a shadow) under a deadline.

Rules always run first and their decision stands ready. :meth:`ModelStage.run` then gives
the model what is left of the batch's budget: the call runs in a worker thread (ONNX
Runtime releases the GIL) and is abandoned when the deadline passes, so a stalled model
costs one budget, not a stalled worker. While an abandoned call is still running, the next
batches fall back at once ("busy") rather than queue behind it.

Causes of a fallback, named in the decision's reasons as ``fallback:<cause>``: ``deadline``
(no time left before the model stage), ``timeout``, ``busy``, ``error`` (the model
raised), ``nan`` (a non-finite score for that event), ``degraded`` (the features could not
be read), ``model_unavailable`` (the registry's ACTIVE pointer names a version that was
refused, and no model serves: :attr:`ModelStage.unavailable`). With no ACTIVE pointer at
all the rules decide by design: no fallback.
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

    def run(self, model: Any, X: np.ndarray, deadline: float
            ) -> tuple[np.ndarray | None, list[list[str]] | None, str | None]:
        """(scores, reasons, None) or (None, None, cause)."""
        remaining = deadline - time.perf_counter()
        if remaining <= 0:
            return None, None, "deadline"
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
