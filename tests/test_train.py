"""fraudstream train on generated history: ONNX matches the native models, the artifact
says what it is, the ensemble beats the rules."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fraudstream.scorers import train as T
from fraudstream.scorers.rules import RuleSet, RulesScorer
from fraudstream.state.features import FEATURE_NAMES, FeatureConfig
from fraudstream.streams.traffic.generator import arrival_events, generate_history
from fraudstream.streams.traffic.history import write_csv
from fraudstream.streams.traffic.world import GeneratorConfig
from tests.conftest import ROOT

START = 1_790_000_000_000


@pytest.fixture(scope="module")
def history() -> list[tuple[str, dict]]:
    txns, labels = generate_history(
        GeneratorConfig(seed=5, n_cards=400, label_delay_days=0.5, label_delay_spread_days=0.2,
                        id_prefix="tr"), START, 8.0, 2500)
    return arrival_events(txns, labels)


def test_onnx_reproduces_both_native_models(history):
    ds = T.build_dataset(history, FeatureConfig())
    config = T.TrainConfig(trees=40)
    for name in T.MODELS:
        model = T._fit(name, ds.X, ds.y, config)
        native = model.predict_proba(ds.X)[:, 1]
        onnx = T.onnx_scores(T.to_onnx(name, model, ds.X.shape[1]), ds.X)
        assert np.max(np.abs(native - onnx)) <= T.ONNX_TOLERANCE
        assert native.std() > 0.01  # the model learned something to compare


def test_the_artifact_describes_itself_and_beats_the_rules(history, tmp_path):
    meta = T.train(history, tmp_path, T.TrainConfig(trees=60), "ab" * 32,
                   RulesScorer(RuleSet.default()))
    target = tmp_path / meta["version"]
    assert {p.name for p in target.iterdir()} == {
        "lightgbm.onnx", "logistic.onnx", "metadata.json", "report.md", "pr_curve.png",
        "score_hist.png", "SHA256SUMS"}
    # SHA256SUMS seals every other file, metadata.json included
    assert sorted(line.split()[1] for line in (target / "SHA256SUMS").read_text()
                  .splitlines()) == sorted(p.name for p in target.iterdir()
                                           if p.name != "SHA256SUMS")
    stored = json.loads((target / "metadata.json").read_text())
    assert stored["feature_names"] == list(FEATURE_NAMES)
    assert set(stored["reference"]["features"]) == set(FEATURE_NAMES)
    assert 0 < stored["thresholds"]["review"] <= stored["thresholds"]["decline"] <= 1
    assert abs(sum(m["weight"] for m in stored["models"]) - 1.0) < 1e-9
    w = stored["windows"]
    assert w["train"]["to"] < w["valid"]["from"] <= w["valid"]["to"] < w["test"]["from"]
    assert sum(v["transactions"] for v in w.values()) == stored["data"]["transactions"]
    test = stored["metrics"]["test"]
    assert set(test) == {"rules", "lightgbm", "logistic", "ensemble", "ensemble+online"}
    assert test["ensemble"]["average_precision"] > test["rules"]["average_precision"]
    assert test["ensemble"]["auc_roc"] > 0.9
    assert "| ensemble |" in (target / "report.md").read_text()


def test_a_model_onnx_cannot_reproduce_is_refused(history, tmp_path, monkeypatch):
    monkeypatch.setattr(T, "ONNX_TOLERANCE", -1.0)  # no difference is small enough
    with pytest.raises(T.TrainingError, match="ONNX Runtime differs"):
        T.train(history, tmp_path, T.TrainConfig(trees=10), "cd" * 32,
                RulesScorer(RuleSet.default()))
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_a_history_without_fraud_in_a_window_is_refused(history, tmp_path):
    genuine = [(k, r) for k, r in history if k == "transaction"]
    with pytest.raises(T.TrainingError, match="no fraud labels"):
        T.train(genuine, tmp_path, T.TrainConfig(trees=10), "ef" * 32,
                RulesScorer(RuleSet.default()))


def test_the_command_trains_from_a_csv(history, tmp_path):
    txns = [r for k, r in history if k == "transaction"]
    labels = [r for k, r in history if k == "label"]
    write_csv(tmp_path / "h.csv", txns, labels)
    out = subprocess.run(
        [sys.executable, "-m", "fraudstream", "train", str(tmp_path / "h.csv"), "--keep-order",
         "--out", str(tmp_path / "models"), "--trees", "30", "--quiet"],
        cwd=ROOT, capture_output=True, text=True, timeout=240, check=True)
    result = json.loads(out.stdout)
    assert Path(result["path"], "metadata.json").exists()
    bad = subprocess.run(
        [sys.executable, "-m", "fraudstream", "train", str(tmp_path / "h.csv"),
         "--map", "card_id=no_such_column"], cwd=ROOT, capture_output=True, text=True,
        timeout=120)
    assert bad.returncode == 2 and "no_such_column" in bad.stderr
