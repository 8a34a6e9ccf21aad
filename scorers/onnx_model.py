"""Serving a trained artifact (:mod:`fraudstream.scorers.train`): ONNX Runtime sessions, one call
per
model per micro-batch.

:meth:`ModelScorer.load` refuses an artifact it cannot serve exactly as it was trained,
with a :class:`ArtifactError` naming the problem: missing, altered or added files
(``SHA256SUMS``, :mod:`fraudstream.scorers.artifact`), a feature list or version that is not the
worker's, ensemble weights or thresholds that make no usable model, ONNX that does not
load, or a probe batch whose scores are not finite, all one value, or not those stored at
training.

Sessions are tuned for latency: one intra-op thread, sequential execution. Reason codes
for a model decision are the features with the largest positive terms of the linear
model (coef * standardized value), computed for the whole batch with numpy.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fraudstream.schemas.fx import Rates, RatesError
from fraudstream.scorers.artifact import (
    ArtifactError,
    check_probe,
    check_thresholds,
    check_weights,
    probe_batch,
    verify_sums,
)
from fraudstream.scorers.base import Event, Features, Score, ScorerError, Thresholds
from fraudstream.state.features import FEATURE_NAMES, FEATURE_VERSION

REASONS = 3
__all__ = ["ArtifactError", "ModelScorer"]


class ModelScorer:
    def __init__(self, version: str, sessions: list[tuple[Any, float]], thresholds: Thresholds,
                 explain: dict[str, list[float]], reference: dict[str, Any] | None = None,
                 base_rate: float | None = None) -> None:
        self.version = version
        #: Reference histograms of the features and the score (drift detection).
        self.reference = reference
        self.sessions = sessions
        self.thresholds = thresholds
        #: The fraud rate of the training history (the online learners are corrected to it).
        self.base_rate = base_rate
        self._mean = np.asarray(explain["mean"], dtype=np.float64)
        self._scale = np.asarray(explain["scale"], dtype=np.float64)
        self._coef = np.asarray(explain["coef"], dtype=np.float64)
        self._name_list = list(FEATURE_NAMES)
        #: The whole artifact's digest (sha256 of its SHA256SUMS); None for a version
        #: written before artifacts were sealed.
        self.digest: str | None = None
        #: The feature settings its training history was computed with (ms), as far as
        #: its metadata says: {"label_delay_ms", "allowed_lateness_ms"}.
        self.trained_features: dict[str, int] = {}
        #: The rates table its history's amounts were converted with, if its metadata says.
        self.trained_rates: Rates | None = None

    @classmethod
    def load(cls, path: Path) -> ModelScorer:
        import onnxruntime as ort

        digest = verify_sums(path)
        meta_path = path / "metadata.json"
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError) as exc:
            raise ArtifactError(f"{path.name}: no readable metadata.json "
                                f"({_one_line(exc)})") from None
        if not isinstance(meta, dict):
            raise ArtifactError(f"{path.name}: metadata.json is not an object")
        version = str(meta.get("version", path.name))
        if version != path.name:
            raise ArtifactError(f"{path.name}: metadata.json names version {version!r}")
        if meta.get("feature_version") != FEATURE_VERSION or \
                meta.get("feature_names") != list(FEATURE_NAMES):
            raise ArtifactError(
                f"{version}: trained on features {meta.get('feature_version')!r} "
                f"({len(meta.get('feature_names') or [])} names), the worker computes "
                f"{FEATURE_VERSION!r} ({len(FEATURE_NAMES)}): retrain it")
        try:
            review, decline = meta["thresholds"]["review"], meta["thresholds"]["decline"]
            models = [(str(m["file"]), float(m["weight"]), m["sha256"]) for m in meta["models"]]
            explain = meta["explain"]
        except (KeyError, TypeError, ValueError) as exc:
            raise ArtifactError(f"{version}: metadata.json lacks or mangles {exc}") from None
        check_weights(version, [w for _f, w, _s in models])
        check_thresholds(version, review, decline)
        thresholds = Thresholds(float(review), float(decline))
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.log_severity_level = 3
        sessions = []
        for file, weight, sha in models:
            if Path(file).name != file or file.startswith("."):
                raise ArtifactError(f"{version}: model file {file!r} is not a file of the "
                                    "version's own folder")
            try:
                data = (path / file).read_bytes()
            except OSError as exc:
                raise ArtifactError(f"{version}: model file {file}: {exc}") from None
            if hashlib.sha256(data).hexdigest() != sha:
                raise ArtifactError(f"{version}: {file} does not match its sha256 in metadata")
            try:
                sessions.append((ort.InferenceSession(data, opts,
                                                      providers=["CPUExecutionProvider"]),
                                 weight))
            except Exception as exc:  # onnxruntime raises its own exception types
                raise ArtifactError(f"{version}: {file} is not a loadable ONNX model: "
                                    f"{_one_line(exc)}") from None
        rate = (meta.get("data") or {}).get("fraud_rate")
        try:
            scorer = cls(version, sessions, thresholds, explain, meta.get("reference"),
                         float(rate) if isinstance(rate, int | float) else None)
        except (KeyError, TypeError, ValueError) as exc:
            raise ArtifactError(f"{version}: metadata.json mangles explain "
                                f"({_one_line(exc)})") from None
        X, expected = probe_batch(meta, len(FEATURE_NAMES))
        try:
            scores = scorer.predict(X)
            scorer.reasons(X)
        except Exception as exc:  # onnxruntime raises its own exception types
            raise ArtifactError(f"{version}: the probe batch failed: {_one_line(exc)}") from None
        check_probe(version, scores, expected)
        scorer.digest = digest
        config = meta.get("config") if isinstance(meta.get("config"), dict) else {}
        scorer.trained_features = {k: int(config[k]) for k in (
            "label_delay_ms", "allowed_lateness_ms") if isinstance(config.get(k), int | float)}
        if meta.get("rates") is not None:
            try:
                scorer.trained_rates = Rates.from_mapping(meta["rates"], f"{version} metadata")
            except (RatesError, AttributeError) as exc:
                raise ArtifactError(f"{version}: metadata.json mangles rates ({exc})") from None
        return scorer

    def feature_mismatch(self, label_delay_ms: int, allowed_lateness_ms: int,
                         rates: Rates | None = None) -> str | None:
        """A sentence when this worker computes features with other settings than the
        training history was, or converts amounts with another rates table (the model is
        then served numbers it did not learn from)."""
        serving = {"label_delay_ms": label_delay_ms, "allowed_lateness_ms": allowed_lateness_ms}
        names = {"label_delay_ms": "FRAUDSTREAM_FEATURES_LABEL_DELAY_S",
                 "allowed_lateness_ms": "FRAUDSTREAM_FEATURES_ALLOWED_LATENESS_S"}
        diffs = [f"{names[k]}={serving[k] / 1000:g} here, {v / 1000:g} in training"
                 for k, v in self.trained_features.items() if v != serving[k]]
        if rates is not None and self.trained_rates is not None:
            moved = rates.moved_from(self.trained_rates)
            if moved:
                diffs.append(f"the rates table in force: {moved}")
        if not diffs:
            return None
        return (f"{self.version} was trained on features computed with other settings "
                f"({'; '.join(diffs)}): it is served numbers it did not learn from; "
                "retrain it, or set them as in training")

    def predict(self, X: np.ndarray) -> np.ndarray:
        """The ensemble's fraud probability per row (NaN rows are the caller's to handle)."""
        total = np.zeros(len(X), dtype=np.float64)
        for session, weight in self.sessions:
            total += weight * np.asarray(session.run(None, {"x": X})[1])[:, 1]
        return total

    def reasons(self, X: np.ndarray) -> list[list[str]]:
        """Per row, the features whose linear terms push the score up most."""
        terms = self._coef * (X.astype(np.float64) - self._mean) / np.where(
            self._scale == 0, 1.0, self._scale)
        top = np.argsort(-terms, axis=1)[:, :REASONS]
        positive = np.take_along_axis(terms, top, axis=1) > 0
        names = self._name_list
        return [[names[j] for j, up in zip(row, ups, strict=True) if up]
                for row, ups in zip(top.tolist(), positive.tolist(), strict=True)]

    def score_batch(self, events: Sequence[Event],
                    features: Sequence[Features] | None = None) -> list[Score]:
        if features is None or len(features) != len(events):
            raise ScorerError("the model needs one feature vector per event")
        X = np.array([f.row for f in features], dtype=np.float32)  # type: ignore[attr-defined]
        p = self.predict(X)
        reasons = self.reasons(X)
        return [Score(float(s), self.thresholds.outcome(float(s)), r)
                for s, r in zip(p.tolist(), reasons, strict=True)]

    def learn_batch(self, features: Sequence[Features], labels: Sequence[int]) -> None:
        """Trained offline: labels teach the online learners, not this model."""


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())
