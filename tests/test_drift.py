"""Drift against the model's reference histograms: quiet on the training distribution,
events naming the features that moved when the traffic changes."""

from __future__ import annotations

import numpy as np

from fraudstream.scorers import train as T
from fraudstream.scorers.drift import DriftConfig, DriftMonitor, js_distance, psi
from fraudstream.state.features import FEATURE_NAMES, FeatureConfig
from tests.conftest import _events


def test_psi_and_js_are_zero_for_equal_distributions_and_grow_with_shift():
    p = np.array([0.25, 0.25, 0.25, 0.25])
    assert psi(p, p) == 0.0 and js_distance(p, p) == 0.0
    q = np.array([0.1, 0.2, 0.3, 0.4])
    r = np.array([0.0, 0.0, 0.1, 0.9])
    assert 0 < psi(p, q) < psi(p, r) and 0 < js_distance(p, q) < js_distance(p, r)


def test_drift_events_name_the_moved_features(models_registry):
    model = models_registry.load(models_registry.versions()[0])
    ds = T.build_dataset(_events(5, 8.0, 2500), FeatureConfig())
    # Traffic like the training window's (where the reference comes from), in random order.
    train = T.split_by_time(ds.times, 0.2, 0.2)["train"]
    X = ds.X[np.random.default_rng(0).permutation(train)[:4000]]
    monitor = DriftMonitor(model.version, model.reference, DriftConfig(window=4000))
    quiet = []
    for i in range(0, 4000, 500):
        quiet += monitor.observe(X[i:i + 500], model.predict(X[i:i + 500]), 1_000 + i)
    moved = {e["feature"] for e in quiet if e["statistic"] == "psi"}
    assert len(moved) <= 3, moved  # the same traffic: (almost) nothing drifts
    assert monitor.last[("card_count_1h", "psi")] < 0.2

    shifted = X[:4000].copy()
    amount = [i for i, n in enumerate(FEATURE_NAMES) if n.startswith(("card_sum", "card_max",
                                                                      "card_mean"))]
    shifted[:, amount] *= 20.0  # amounts twenty times larger
    events = []
    for i in range(0, 4000, 500):
        events += monitor.observe(shifted[i:i + 500], model.predict(shifted[i:i + 500]),
                                  10_000 + i)
    psi_events = {e["feature"]: e for e in events if e["statistic"] == "psi"}
    assert {"card_sum_24h", "card_max_30d"} <= set(psi_events)
    e = psi_events["card_sum_24h"]
    assert e["severity"] == "critical" and e["value"] > 2 * e["threshold"]
    assert e["model_version"] == model.version and e["window_count"] == 4000
    assert "card_count_1h" not in psi_events  # counts did not move


def test_batch_binning_counts_what_searchsorted_counts_column_by_column():
    """The monitor bins a batch's columns at once; it must count exactly what one
    searchsorted and bincount per column count, values on edges, outside them, NaN and
    infinities included."""
    from fraudstream.scorers.drift import Binner

    rng = np.random.default_rng(7)
    edges = [np.unique(np.round(rng.normal(size=n), 1)) for n in (2, 5, 11, 21, 3)]
    edges.append(np.array([-np.inf, 0.0, 1.0, np.inf]))
    binner = Binner(edges)
    for batch in (1, 32, 128, 129, 500):
        values = np.round(rng.normal(scale=2.0, size=(batch, len(edges))), 1)
        values[rng.random(values.shape) < 0.05] = np.nan
        values[rng.random(values.shape) < 0.02] = np.inf
        values[rng.random(values.shape) < 0.02] = -np.inf
        got = binner.counts(values)
        for k, e in enumerate(edges):
            bins = np.clip(np.searchsorted(e, values[:, k], side="right") - 1, 0, len(e) - 2)
            want = np.bincount(bins, minlength=len(e) - 1)
            assert got[k].tolist() == want.tolist(), (batch, k)
        # without the last column (the score, when the model did not score)
        fewer = binner.counts(values[:, :-1])
        assert len(fewer) == len(edges) - 1
        assert [c.tolist() for c in fewer] == [c.tolist() for c in got[:-1]]


def test_a_batch_the_model_did_not_score_still_counts_its_features(models_registry):
    """A fallback (timeout, error) leaves no scores: the features' drift is counted all
    the same, and the score's histogram is left alone."""
    model = models_registry.load(models_registry.versions()[0])
    monitor = DriftMonitor(model.version, model.reference, DriftConfig(10_000, 0.2, 0.1))
    X = np.random.default_rng(3).normal(size=(200, len(FEATURE_NAMES))).astype(np.float32)
    for rows in (X[:5], X):  # both ways of binning: few rows, many
        assert monitor.observe(rows, None, 0) == []
    assert monitor.n == 205
    assert all(c.sum() == 205 for c in monitor.counts[:-1])
    assert monitor.counts[-1].sum() == 0
    monitor.observe(X[:40], np.full(40, 0.5), 0)
    assert monitor.counts[-1].sum() == 40
