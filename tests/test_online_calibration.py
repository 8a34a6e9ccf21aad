"""The online learner's probabilities, corrected for how labels are sampled."""

from __future__ import annotations

import numpy as np

from fraudstream.scorers.online import OnlineLearner, OnlineStage
from fraudstream.state.engine import MemoryStore
from fraudstream.state.features import FEATURE_NAMES


def population(rng: np.random.Generator, n: int, rate: float) -> tuple[np.ndarray, np.ndarray]:
    """Transactions whose first feature separates fraud from genuine, somewhat."""
    y = rng.random(n) < rate
    X = np.zeros((n, len(FEATURE_NAMES)), dtype=np.float32)
    X[:, 0] = rng.normal(np.where(y, 2.0, 0.0), 1.0)
    X[:, 1] = rng.normal(0.0, 1.0, n)
    return X, y


def test_a_learner_taught_every_fraud_and_few_genuine_labels_scores_at_the_base_rate():
    rng = np.random.default_rng(11)
    rate = 0.01
    X, y = population(rng, 60_000, rate)
    taught = y | (rng.random(len(y)) < 0.03)  # every fraud is labelled, 3% of genuine
    learner = OnlineLearner()
    learner.learn(X[taught], y[taught].tolist())
    assert 0.15 < y[taught].mean() < 0.4  # the labels over-represent fraud

    X_new, y_new = population(rng, 20_000, rate)
    raw = learner.predict(X_new)
    fixed = learner.predict_for(X_new, rate)
    assert raw.mean() > 0.1  # as if a fifth of traffic were fraud
    assert 0.004 < fixed.mean() < 0.025  # about the base rate
    # The order of scores is kept: the correction is monotone.
    assert np.array_equal(np.argsort(raw, kind="stable"), np.argsort(fixed, kind="stable"))
    assert fixed[y_new].mean() > 5 * fixed[~y_new].mean()
    # Without a base rate (an artifact that lacks it), the raw probability is used.
    assert np.array_equal(learner.predict_for(X_new, None), raw)


def test_the_blend_uses_the_corrected_probability():
    rng = np.random.default_rng(3)
    X, y = population(rng, 20_000, 0.01)
    taught = y | (rng.random(len(y)) < 0.03)
    learner = OnlineLearner()
    learner.learn(X[taught], y[taught].tolist())
    learner.share = 1.0  # as if its evidence had earned it the full weight
    stage = OnlineStage(MemoryStore(1))
    ensemble = np.full(1000, 0.01)
    parts = [0] * 1000
    raw = stage.blend({0: learner}, parts, X[:1000], ensemble)
    fixed = stage.blend({0: learner}, parts, X[:1000], ensemble, base_rate=0.01)
    assert fixed.mean() < 0.5 * raw.mean()
