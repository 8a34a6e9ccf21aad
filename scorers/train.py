"""Training: features of a labelled history -> two model families -> ONNX -> an artifact.

:func:`train` takes validated events (``("transaction", dict)`` / ``("label", dict)``, in
arrival order) and:

1. computes the features with the worker's own code (:mod:`fraudstream.scorers.dataset`),
   so a label feeds a feature only once it would have been available; with
   ``genuine_sample`` below 1, keeps only a share of the training window's unlabelled
   transactions, weighted (:mod:`fraudstream.scorers.sampling`);
2. splits by event time into train / validation / test windows;
3. fits gradient-boosted trees (LightGBM) and a logistic regression on scaled features;
4. exports each to ONNX and refuses to go on unless ONNX Runtime reproduces the native
   probabilities on the test window within :data:`ONNX_TOLERANCE`;
5. weighs the two on the validation window (best average precision), and picks the
   review and decline thresholds from the targets given;
6. measures AUC ROC, average precision and card precision at 100 a day on the test
   window, for the rules alone, each model and the ensemble;
7. writes the artifact: ONNX files and ``metadata.json`` (feature names and order,
   thresholds, windows, data hash, library versions, metrics, reference histograms of
   every feature and of the score, for drift detection, and a probe batch: rows of the
   test window with their ensemble scores), a report with plots, and last
   ``SHA256SUMS``, which seals every other file (:mod:`fraudstream.scorers.artifact`).

A transaction without a label in the history counts as genuine.
"""

from __future__ import annotations

import hashlib
import json
import platform
import time
from collections.abc import Callable, Container, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from fraudstream.schemas.fx import Rates
from fraudstream.scorers.artifact import ArtifactError, check_probe, choose_probe, write_sums
from fraudstream.scorers.dataset import (  # noqa: F401 (re-exported)
    BLOCK,
    Dataset,
    TrainingError,
    build_dataset,
    known_targets,
    token,
)
from fraudstream.scorers.metrics import summary
from fraudstream.scorers.sampling import balanced, genuine_sampler, weighted_quantiles
from fraudstream.scorers.train_report import write_report
from fraudstream.scorers.windows import Windows
from fraudstream.state.features import FEATURE_NAMES, FEATURE_VERSION, FeatureConfig

#: Largest difference allowed between ONNX Runtime's and the native probabilities.
ONNX_TOLERANCE = 1e-4
MODELS = ("lightgbm", "logistic")


@dataclass(frozen=True)
class TrainConfig:
    valid_frac: float = 0.2
    test_frac: float = 0.2
    #: Share of the validation window's transactions sent to review or decline.
    review_rate: float = 0.02
    #: Decline only where the validation precision reaches this.
    decline_precision: float = 0.9
    trees: int = 300
    seed: int = 7
    features: FeatureConfig = field(default_factory=FeatureConfig)
    #: Explicit event-time windows (:mod:`fraudstream.scorers.windows`); None: fractions.
    windows: Windows | None = None
    #: The rates table the history's amounts were converted with (``amount_ref``), kept
    #: in the metadata: a worker whose table differs materially says so at load.
    rates: Rates | None = None
    #: Share of the unlabelled transactions before ``sample_until_ms`` (event time, inside
    #: the training window) kept in the training set, each weighing 1 / share
    #: (:mod:`fraudstream.scorers.sampling`); 1.0 keeps every one.
    genuine_sample: float = 1.0
    sample_until_ms: int | None = None


def split_by_time(times: np.ndarray, valid_frac: float, test_frac: float,
                  also: tuple[int, int] | None = None) -> dict[str, np.ndarray]:
    """Index arrays of the train, valid and test windows: consecutive spans of event time
    (of ``times``, and of ``also``: the first and last of rows not kept)."""
    if not (0 < valid_frac < 1 and 0 < test_frac < 1 and valid_frac + test_frac < 1):
        raise TrainingError("valid and test fractions must be in (0, 1) and sum below 1")
    lo, hi = int(times.min()), int(times.max()) + 1
    if also is not None:
        lo, hi = min(lo, also[0]), max(hi, also[1] + 1)
    valid_from = lo + int((hi - lo) * (1 - valid_frac - test_frac))
    test_from = lo + int((hi - lo) * (1 - test_frac))
    windows = {
        "train": (lo, valid_from), "valid": (valid_from, test_from), "test": (test_from, hi),
    }
    return {name: np.flatnonzero((times >= a) & (times < b)) for name, (a, b) in windows.items()}


def _fit(name: str, X: np.ndarray, y: np.ndarray, config: TrainConfig,
         weights: np.ndarray | None = None) -> Any:
    """``weights``: each row's weight (a sampled training set); None: every row once."""
    if name == "lightgbm":
        import lightgbm as lgb

        w = np.ones(len(y)) if weights is None else weights.astype(np.float64)
        pos = max(1.0, float(w[y == 1].sum()))
        model = lgb.LGBMClassifier(
            n_estimators=config.trees, learning_rate=0.05, num_leaves=31,
            min_child_samples=20, subsample=0.8, subsample_freq=1, colsample_bytree=0.8,
            scale_pos_weight=min(50.0, float(w[y == 0].sum()) / pos),
            random_state=config.seed, verbose=-1,
        ).fit(X, y, sample_weight=None if weights is None else w)
        return _float32_thresholds(model)
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if weights is None:
        return make_pipeline(StandardScaler(), LogisticRegression(
            max_iter=2000, C=0.5, class_weight="balanced", random_state=config.seed)
        ).fit(X, y)
    # the classes balanced by weight, as "balanced" balances them by count
    return make_pipeline(StandardScaler(), LogisticRegression(
        max_iter=2000, C=0.5, random_state=config.seed)).fit(
        X, y, standardscaler__sample_weight=weights,
        logisticregression__sample_weight=balanced(y, weights))


def _float32_thresholds(model: Any) -> Any:
    """Move each split threshold down to the largest float32 at or below it.

    LightGBM splits at midpoints in double precision; ONNX trees compare in float32, so a
    midpoint between two values one float32 step apart rounds onto the upper value and
    that value goes the other way (measured: 4e-3 of probability on generated data). The
    features are float32 already, so the moved threshold splits the training data exactly
    as before, and native and ONNX predictions agree.
    """
    import re

    import lightgbm as lgb

    def snap(match: re.Match[str]) -> str:
        out = []
        for text in match.group(1).split():
            value = float(text)
            f = np.float32(value)
            if float(f) > value:
                f = np.nextafter(f, np.float32(-np.inf))
            out.append(repr(float(f)))
        return "threshold=" + " ".join(out)

    text = re.sub(r"^threshold=(.*)$", snap, model.booster_.model_to_string(), flags=re.M)
    # The byte sizes of the trees changed: without them LightGBM reads trees in sequence.
    text = re.sub(r"^tree_sizes=.*\n", "", text, flags=re.M)
    model._Booster = lgb.Booster(model_str=text)
    return model


def to_onnx(name: str, model: Any, n_features: int) -> bytes:
    """The model as ONNX: one float input ``x`` [n, features]; outputs label, probabilities."""
    if name == "lightgbm":
        import onnxmltools
        from onnxmltools.convert.common.data_types import FloatTensorType

        onx = onnxmltools.convert_lightgbm(
            model, initial_types=[("x", FloatTensorType([None, n_features]))],
            zipmap=False, target_opset=15)
    else:
        from skl2onnx import convert_sklearn
        from skl2onnx.common.data_types import FloatTensorType as SkFloat

        onx = convert_sklearn(model, initial_types=[("x", SkFloat([None, n_features]))],
                              options={id(model): {"zipmap": False}}, target_opset=15)
    return onx.SerializeToString()


def onnx_scores(onnx_bytes: bytes, X: np.ndarray) -> np.ndarray:
    """Fraud probabilities from ONNX Runtime, tuned as the worker runs it (one thread)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.log_severity_level = 3
    session = ort.InferenceSession(onnx_bytes, opts, providers=["CPUExecutionProvider"])
    probabilities = session.run(None, {"x": X.astype(np.float32)})[1]
    return np.asarray(probabilities)[:, 1]


def _thresholds(score: np.ndarray, y: np.ndarray, config: TrainConfig) -> dict[str, float]:
    review = float(np.quantile(score, 1.0 - config.review_rate))
    decline = 1.0
    for t in np.unique(score[score >= review]):
        chosen = score >= t
        if chosen.any() and y[chosen].mean() >= config.decline_precision:
            decline = float(t)
            break
    return {"review": review, "decline": max(decline, review)}


def _histogram(values: np.ndarray, bins: int = 10, weights: np.ndarray | None = None
               ) -> dict[str, list[float]]:
    """Quantile bin edges and the share of values in each bin (the drift reference);
    ``weights``: each value counted that many times (a sampled training set)."""
    edges = np.unique(weighted_quantiles(values, np.linspace(0, 1, bins + 1), weights))
    if len(edges) < 2:
        edges = np.array([edges[0], edges[0] + 1.0])
    counts, _ = np.histogram(np.clip(values, edges[0], edges[-1]), bins=edges,
                             weights=weights)
    return {"edges": edges.tolist(), "proportions": (counts / max(1, counts.sum())).tolist()}


def _versions() -> dict[str, str]:
    import lightgbm
    import onnx
    import onnxruntime
    import sklearn

    return {"python": platform.python_version(), "lightgbm": lightgbm.__version__,
            "scikit-learn": sklearn.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__, "numpy": np.__version__}


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=UTC).isoformat()


def train(events: Iterable[tuple[str, Mapping[str, Any]]], out_dir: Path, config: TrainConfig,
          data_hash: str, rules_scorer: Any, progress: Any = None,
          phase: Callable[[str], None] | None = None,
          labelled: Container[str] | None = None) -> dict[str, Any]:
    """Train, check and write an artifact under ``out_dir/<version>``; returns its metadata.
    ``progress.update(1)`` per transaction whose features are built; ``phase(name)`` as
    each later phase starts. ``labelled``: the ids of the transactions that have a label,
    known before the first one is read (needed to sample, ``config.genuine_sample``)."""
    t0 = time.monotonic()
    windows = config.windows
    step = phase or (lambda _name: None)
    weigh = None
    if config.genuine_sample < 1.0:
        if labelled is None or config.sample_until_ms is None:
            raise TrainingError("sampling genuine transactions needs the labelled "
                                "transactions known before reading, and where the "
                                "training window ends (a range with time bounds)")
        weigh = genuine_sampler(config.genuine_sample, config.sample_until_ms, labelled)
    ds = build_dataset(events, config.features, progress, windows, rules_scorer,
                       weigh=weigh)
    if windows is None:
        split = split_by_time(ds.times, config.valid_frac, config.test_frac,
                              ds.sampled_span)
        y_fit = ds.y
    else:
        split = windows.split(ds.times)
        y_fit = known_targets(ds, windows.test_from)
    for name, idx in split.items():
        if len(idx) == 0 or (y_fit if name != "test" else ds.y)[idx].sum() == 0:
            how = ("other --valid-frac / --test-frac" if windows is None else
                   "other windows (fraud labels known before --test-from for train and valid)")
            raise TrainingError(f"the {name} window has no fraud labels: a longer history, "
                                f"or {how}, is needed")
    row_weights = ds.weights
    if row_weights is not None and ds.sampled_span is not None:
        first_valid = int(ds.times[split["valid"]].min())
        if ds.sampled_span[1] >= first_valid or np.any(row_weights[split["valid"]] != 1.0):
            raise TrainingError(
                f"transactions up to {_iso(config.sample_until_ms or 0)} were sampled, but "
                f"the validation window starts at {_iso(first_valid)}: it must hold every "
                "transaction. The range's bounds are wider than its data; give bounds "
                "around it (or sample less far)")
    tr, va, te = split["train"], split["valid"], split["test"]
    w_tr = None if row_weights is None else row_weights[tr]

    models: dict[str, Any] = {}
    onnx_models: dict[str, bytes] = {}
    valid_scores: dict[str, np.ndarray] = {}
    test_scores: dict[str, np.ndarray] = {}
    for name in MODELS:
        step(f"fit {name} on {len(tr):,} transactions, check its ONNX export")
        models[name] = _fit(name, ds.X[tr], y_fit[tr], config, w_tr)
        onnx_models[name] = to_onnx(name, models[name], ds.X.shape[1])
        native = models[name].predict_proba(ds.X[te])[:, 1]
        test_scores[name] = onnx_scores(onnx_models[name], ds.X[te])
        gap = float(np.max(np.abs(native - test_scores[name])))
        if not gap <= ONNX_TOLERANCE:
            raise TrainingError(f"{name}: ONNX Runtime differs from the native model by "
                                f"{gap:.2e} (> {ONNX_TOLERANCE}); artifact not written")
        valid_scores[name] = onnx_scores(onnx_models[name], ds.X[va])

    # Ensemble: w * trees + (1 - w) * linear, w with the best validation average precision.
    from sklearn.metrics import average_precision_score

    step(f"ensemble weight and thresholds on {len(va):,} validation transactions")
    grid = np.linspace(0.0, 1.0, 21)
    aps = [average_precision_score(y_fit[va], w * valid_scores["lightgbm"]
                                   + (1 - w) * valid_scores["logistic"]) for w in grid]
    w = float(grid[int(np.argmax(aps))])
    weights = {"lightgbm": w, "logistic": 1.0 - w}

    def ensemble(scores: dict[str, np.ndarray]) -> np.ndarray:
        return sum(weights[n] * scores[n] for n in MODELS)

    thresholds = _thresholds(ensemble(valid_scores), y_fit[va].astype(bool), config)
    probe = choose_probe(ds.X[te], ensemble(test_scores), config.seed)
    rows = np.asarray(probe["rows"], dtype=np.float32)
    probe["scores"] = ensemble({n: onnx_scores(onnx_models[n], rows) for n in MODELS}).tolist()
    try:
        check_probe("the new model", np.asarray(probe["scores"]), None)
    except ArtifactError as exc:
        raise TrainingError(f"{exc}; artifact not written") from None
    step(f"test metrics on {len(te):,} transactions")
    rules = ds.rules[te].astype(np.float64)
    cards = ds.cards[te].tolist()

    def measure(score: np.ndarray) -> dict[str, float]:
        return summary(cards, ds.times[te], ds.y[te], score, known=ds.compromised)

    metrics = {
        "rules": measure(rules),
        **{n: measure(test_scores[n]) for n in MODELS},
        "ensemble": measure(ensemble(test_scores)),
    }
    step("online learner over the test window")
    with_online = _with_online(ds, te, ensemble(test_scores), config)
    metrics["ensemble+online"] = measure(with_online)

    created = datetime.now(tz=UTC)
    version = f"v{created:%Y%m%d-%H%M%S}-{data_hash[:8]}"
    target = out_dir / version
    target.mkdir(parents=True, exist_ok=False)
    for name, data in onnx_models.items():
        (target / f"{name}.onnx").write_bytes(data)
    meta = {
        "version": version,
        "created_at": created.isoformat(),
        "feature_version": FEATURE_VERSION,
        "feature_names": list(FEATURE_NAMES),
        "models": [{"name": n, "file": f"{n}.onnx", "weight": weights[n], "input": "x",
                    "output": "probabilities[:, 1]",
                    "sha256": hashlib.sha256(onnx_models[n]).hexdigest()} for n in MODELS],
        "thresholds": thresholds,
        # Reason codes: the linear model's terms coef * (x - mean) / scale, largest first.
        "explain": {
            "mean": models["logistic"][0].mean_.tolist(),
            "scale": models["logistic"][0].scale_.tolist(),
            "coef": models["logistic"][-1].coef_[0].tolist(),
        },
        "windows": {name: {"from": _iso(int(ds.times[idx].min())),
                           "to": _iso(int(ds.times[idx].max())),
                           "transactions": len(idx) + (ds.sampled_out if name == "train"
                                                       else 0),
                           "fraud": int(ds.y[idx].sum()),
                           "fraud_learned": int(y_fit[idx].sum()) if name != "test" else None}
                    for name, idx in split.items()},
        "sampling": None if row_weights is None else {
            "genuine_share": config.genuine_sample, "until": _iso(config.sample_until_ms or 0),
            "rows_kept": len(ds), "sampled_out": ds.sampled_out},
        "protocol": {
            "windows": "explicit" if windows is not None else "fractions",
            "labels_learned_before": None if windows is None else _iso(windows.test_from),
            "label_delay_median_days": ds.label_delay_ms / 86_400_000,
            "card_precision": "per day, cards known compromised before the day removed",
            "warnings": [] if windows is None or not (
                gap := windows.gap_warning(ds.label_delay_ms)) else [gap],
        },
        "data": {"sha256": data_hash, "transactions": len(ds) + ds.sampled_out,
                 "labels": ds.stats.labels,
                 "fraud_rate": float(np.average(ds.y, weights=ds.w))},
        "rates": None if config.rates is None else {
            "version": config.rates.version, "reference": config.rates.reference,
            "rates": config.rates.units_per_ref},
        "config": {k: v for k, v in asdict(config).items() if k not in ("features", "rates")}
        | {"allowed_lateness_ms": config.features.allowed_lateness_ms,
           "label_delay_ms": config.features.label_delay_ms},
        "libraries": _versions(),
        "metrics": {"test": metrics},
        "reference": {
            "features": {n: _histogram(ds.X[tr][:, i], weights=w_tr)
                         for i, n in enumerate(FEATURE_NAMES)},
            "score": _histogram(ensemble(valid_scores)),
        },
        # Rows of the test window and the ensemble's scores for them: checked at each load.
        "probe": probe,
        "training_seconds": round(time.monotonic() - t0, 1),
    }
    (target / "metadata.json").write_text(json.dumps(meta, indent=2))
    step("report and plots")
    write_report(target, meta, ds.y[te], {"rules": rules, **test_scores,
                                     "ensemble": ensemble(test_scores),
                                     "ensemble+online": with_online})
    write_sums(target)
    return meta


def _with_online(ds: Dataset, te: np.ndarray, scores: np.ndarray, config: TrainConfig,
                 max_weight: float = 0.3) -> np.ndarray:
    """The test window as the worker would live it with an online learner deployed at its
    start: each transaction is scored by the ensemble blended with the learner as it is
    then, at the weight its evidence earned; each label teaches the learner once available
    (label_time + delay), if its transaction was decided since the deployment (the
    feature log starts there), after weighing it against the ensemble's logged score."""
    from fraudstream.scorers.online import OnlineLearner

    learner = OnlineLearner()
    base_rate = float(ds.y.mean()) if len(ds.y) else None  # as in metadata data.fraud_rate
    order = te[np.argsort(ds.times[te], kind="stable")]
    position = {int(i): k for k, i in enumerate(te)}
    logged: dict[int, int] = {}
    delay = config.features.label_delay_ms
    pending = sorted((t + delay, txn_id, fraud) for t, txn_id, fraud in ds.labels)
    j = 0
    out = scores.copy()
    for i in order:
        t = int(ds.times[i])
        while j < len(pending) and pending[j][0] <= t:
            _avail, txn_id, fraud = pending[j]
            j += 1
            if txn_id in logged:
                x = ds.X[logged[txn_id]][None, :]
                learner.weigh(np.array([scores[position[logged[txn_id]]]]),
                              learner.predict_for(x, base_rate), [fraud])
                learner.learn(x, [fraud])
        w = learner.weight(max_weight)
        k = position[int(i)]
        if w > 0:
            out[k] = (1 - w) * scores[k] + w * float(
                learner.predict_for(ds.X[i][None, :], base_rate)[0])
        logged[int(ds.txn_keys[i])] = int(i)
    return out


def data_sha256(paths: Sequence[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        with path.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()
