"""The worker's view of the model registry: :class:`ModelWatcher` keeps a
:class:`fraudstream.scorers.cascade.ModelStage` on the ACTIVE and SHADOW versions.

What a worker does with each state of a pointer:

- unset: no model in that role. Without an ACTIVE version the rules decide by design
  (``fallback=false``).
- a version that loads and passes its checks (its digest, when the pointer carries one;
  sanity; probe batch): it serves from the next batch on.
- a version that is refused: logged as an error with the reason, and
  ``fraudstream_model_refused{role,version}`` is 1 until it loads or the pointer moves.
  The model that was serving keeps serving. When none was, every decision says so:
  ``fallback=true``, reason ``fallback:model_unavailable``, counted in
  ``fraudstream_fallbacks_total{cause="model_unavailable"}``.

A version that loads but was trained on features computed with other settings, or on
amounts converted with a rates table that moved materially since, serves; the log says
what differs and ``fraudstream_model_trained_otherwise{role,version}`` is 1 while it
serves.

A refused version is tried again when the pointer or any of its files change (size or
mtime, read every check), so restoring the files or promoting again needs no restart. A
serving version whose files change is checked again too: if it is now refused, the copy
in memory, checked when it was loaded, keeps serving, and the refusal shows as above.
"""

from __future__ import annotations

import logging
from typing import Any

from fraudstream.schemas.fx import Rates
from fraudstream.scorers.cascade import ModelStage
from fraudstream.scorers.onnx_model import ArtifactError
from fraudstream.scorers.registry import ACTIVE, SHADOW, Registry
from fraudstream.streams.worker.metrics import WorkerMetrics

log = logging.getLogger("fraudstream.worker")
UNAVAILABLE = "model_unavailable"


class ModelWatcher:
    def __init__(self, registry: Registry, stage: ModelStage,
                 metrics: WorkerMetrics | None = None,
                 features: tuple[int, int] | None = None,
                 rates: Rates | None = None) -> None:
        self.registry = registry
        self.stage = stage
        self.metrics = metrics
        #: This worker's (label delay, allowed lateness) in ms, checked against what each
        #: loaded version was trained with.
        self.features = features
        #: The rates table this worker converts amounts with.
        self.rates = rates
        #: Per pointer: what was last acted on (target and its files' fingerprint).
        self._seen: dict[str, Any] = {ACTIVE: None, SHADOW: None}
        #: Per pointer: the version it names that was refused, if any.
        self.refused: dict[str, str | None] = {ACTIVE: None, SHADOW: None}
        #: Per pointer: the version serving that was trained with other feature settings
        #: or a rates table that moved materially (logged why), if any.
        self.otherwise: dict[str, str | None] = {ACTIVE: None, SHADOW: None}

    def check(self) -> None:
        for pointer in (ACTIVE, SHADOW):
            self._check(pointer)
        if self.metrics is not None:
            self.metrics.set_models(getattr(self.stage.active, "version", None),
                                    getattr(self.stage.shadow, "version", None))
            self.metrics.set_refused(self.refused)
            self.metrics.set_trained_otherwise(self.otherwise)

    def rates_changed(self, rates: Rates) -> None:
        """A new rates table in force: each model serving is checked against it again (a
        table whose rates moved materially from its training's is named, as at load)."""
        self.rates = rates
        for pointer, attr in ((ACTIVE, "active"), (SHADOW, "shadow")):
            model = getattr(self.stage, attr)
            if model is None or self.features is None:
                continue
            mismatch = model.feature_mismatch(*self.features, rates)
            if mismatch and self.otherwise[pointer] is None:
                log.warning("models: %s %s: %s", pointer, model.version, mismatch)
            self.otherwise[pointer] = model.version if mismatch else None
        if self.metrics is not None:
            self.metrics.set_trained_otherwise(self.otherwise)

    def _check(self, pointer: str) -> None:
        target = self.registry.pinned(pointer)
        seen = (target, self.registry.fingerprint(target[0]) if target else None)
        if seen == self._seen[pointer]:
            return
        self._seen[pointer] = seen
        attr = "active" if pointer == ACTIVE else "shadow"
        if target is None:
            setattr(self.stage, attr, None)
            self.refused[pointer] = None
            self.otherwise[pointer] = None
            if pointer == ACTIVE:
                self.stage.unavailable = None
            log.warning("models: no %s version: %s", pointer,
                        "the rules decide" if pointer == ACTIVE else "no shadow")
            return
        version, digest = target
        try:
            model = self.registry.load(version, expect=digest)
        except ArtifactError as exc:
            current = getattr(self.stage, attr)
            self.refused[pointer] = version
            if current is not None:
                outcome = f"{current.version} (as loaded) keeps serving"
            elif pointer == ACTIVE:
                self.stage.unavailable = UNAVAILABLE
                outcome = f"no model serves: decisions fall back to the rules ({UNAVAILABLE})"
            else:
                outcome = "no shadow"
            log.error("models: %s %s refused, %s: %s", pointer, version, outcome,
                      " ".join(str(exc).split()))
            return
        current = getattr(self.stage, attr)
        self.refused[pointer] = None
        if current is None or current.version != version \
                or getattr(current, "digest", None) != model.digest:
            # (the same files again, touched or restored: the one in memory stays)
            setattr(self.stage, attr, model)
            log.warning("models: %s is now %s", pointer, version)
            mismatch = (model.feature_mismatch(*self.features, self.rates)
                        if self.features is not None else None)
            self.otherwise[pointer] = version if mismatch else None
            if mismatch:
                log.warning("models: %s", mismatch)
        if pointer == ACTIVE:  # after the swap: no batch sees neither model nor cause
            self.stage.unavailable = None
