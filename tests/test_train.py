"""fraudstream train on generated history: ONNX matches the native models, the artifact
says what it is, the ensemble beats the rules."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest

from fraudstream.scorers import train as T
from fraudstream.scorers import windows as W
from fraudstream.scorers.metrics import card_precision_at_k
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
    # a stationary stream: the online learner must not cost the ensemble's precision
    assert (test["ensemble+online"]["average_precision"]
            >= test["ensemble"]["average_precision"] - 0.005)
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
    partial = subprocess.run(
        [sys.executable, "-m", "fraudstream", "train", str(tmp_path / "h.csv"),
         "--train-to", "2026-09-25", "--test-from", "2026-09-27"], cwd=ROOT,
        capture_output=True, text=True, timeout=120)
    assert partial.returncode == 2 and "need --valid-from, --valid-to too" in partial.stderr


DAY = 86_400_000


def test_explicit_windows_are_the_protocol(history, tmp_path):
    """Warm-up read for features only, train / valid / test where asked, the models fit on
    labels known before the test window, the protocol and its warning in the artifact."""
    windows = W.Windows(train_from=START + DAY, train_to=START + 4 * DAY,
                        valid_from=START + 4 * DAY, valid_to=START + 5 * DAY,
                        test_from=START + 6 * DAY, warmup_from=START + DAY // 2)
    meta = T.train(history, tmp_path, T.TrainConfig(trees=30, windows=windows), "ef" * 32,
                   RulesScorer(RuleSet.default()))
    w = meta["windows"]

    def ms(iso: str) -> int:
        return int(datetime.fromisoformat(iso).timestamp() * 1000)

    assert START + DAY <= ms(w["train"]["from"]) and ms(w["train"]["to"]) < START + 4 * DAY
    assert START + 4 * DAY <= ms(w["valid"]["from"]) and ms(w["valid"]["to"]) < START + 5 * DAY
    assert START + 6 * DAY <= ms(w["test"]["from"])
    in_windows = sum(v["transactions"] for v in w.values())
    read = sum(1 for k, r in history if k == "transaction" and r["event_time"] >= START + DAY // 2)
    between = sum(1 for k, r in history if k == "transaction"
                  and (START + DAY // 2 <= r["event_time"] < START + DAY
                       or START + 5 * DAY <= r["event_time"] < START + 6 * DAY))
    assert in_windows == meta["data"]["transactions"] == read - between
    # labels of the valid window's last hours arrive after the test starts: not learned
    assert w["valid"]["fraud_learned"] <= w["valid"]["fraud"]
    assert w["train"]["fraud_learned"] == w["train"]["fraud"]  # all known by then
    p = meta["protocol"]
    assert p["windows"] == "explicit" and p["warnings"] == []
    assert ms(p["labels_learned_before"]) == START + 6 * DAY
    assert 0.2 < p["label_delay_median_days"] < 0.8  # the generator's 0.5 +- 0.2 days
    assert "learned only from labels known before" in (
        tmp_path / meta["version"] / "report.md").read_text()


def test_a_test_window_inside_the_label_delay_is_flagged(history, tmp_path):
    windows = W.Windows(train_to=START + 4 * DAY, valid_from=START + 4 * DAY,
                        valid_to=START + 6 * DAY, test_from=START + 6 * DAY)
    meta = T.train(history, tmp_path, T.TrainConfig(trees=20, windows=windows), "ef" * 32,
                   RulesScorer(RuleSet.default()))
    [warning] = meta["protocol"]["warnings"]
    assert "less than the label delay" in warning
    assert "**Warning:**" in (tmp_path / meta["version"] / "report.md").read_text()


def test_windows_out_of_order_or_incomplete_are_refused():
    with pytest.raises(W.WindowError, match="--valid-from must come after --train-to"):
        W.Windows(train_to=2 * DAY, valid_from=DAY, valid_to=3 * DAY, test_from=4 * DAY)
    with pytest.raises(W.WindowError, match="--test-to must come after --test-from"):
        W.Windows(train_to=DAY, valid_from=DAY, valid_to=2 * DAY, test_from=3 * DAY,
                  test_to=3 * DAY)
    with pytest.raises(W.WindowError, match="--valid-to, --test-from"):
        W.from_flags(None, None, DAY, DAY, None, None, None)
    assert W.from_flags(None, None, None, None, None, None, None) is None


def test_card_precision_leaves_out_cards_already_known_compromised():
    """Day 1: the top card is a fraud already known since day 0, a second one is new. An
    analyst only gains from the new one."""
    cards = ["known", "new", "other"]
    times = np.array([DAY + 10, DAY + 20, DAY + 30])
    y = np.array([1, 1, 0])
    score = np.array([0.99, 0.9, 0.1])
    assert card_precision_at_k(cards, times, y, score, k=2) == 1.0
    assert card_precision_at_k(cards, times, y, score, k=2, known={"known": DAY - 1}) == 0.5
    # known only later that day: still counted that day
    assert card_precision_at_k(cards, times, y, score, k=2, known={"known": DAY + 5}) == 1.0


def test_a_sampled_training_window_keeps_what_the_models_and_measures_need(history, tmp_path):
    # A long window trained with a share of its unlabelled transactions: every labelled
    # one kept, validation and test whole, the drift reference and the class balance
    # those of the whole window, the models about as good.
    labelled = {rec["transaction_id"] for kind, rec in history if kind == "label"}
    span = 8 * 86_400_000
    until = START + int(span * 0.55)  # inside the training window (the first 60%)
    rules = RulesScorer(RuleSet.default())
    full = T.train(history, tmp_path / "full", T.TrainConfig(trees=60), "ab" * 32, rules)
    config = T.TrainConfig(trees=60, genuine_sample=0.25, sample_until_ms=until)
    with pytest.raises(T.TrainingError, match="labelled"):
        T.train(history, tmp_path / "x", config, "ab" * 32, rules)
    sampled = T.train(history, tmp_path / "sampled", config, "ab" * 32, rules,
                      labelled=labelled)

    s = sampled["sampling"]
    assert full["sampling"] is None and s["genuine_share"] == 0.25
    # about three in four of the unlabelled transactions before `until` left out
    before = sum(1 for kind, rec in history if kind == "transaction"
                 and rec["event_time"] < until and rec["transaction_id"] not in labelled)
    assert 0.7 * before < s["sampled_out"] < 0.8 * before
    assert s["rows_kept"] + s["sampled_out"] == full["data"]["transactions"]
    assert sampled["data"]["transactions"] == full["data"]["transactions"]
    for name in ("valid", "test"):  # whole
        assert sampled["windows"][name] == full["windows"][name]
    assert sampled["windows"]["train"]["fraud_learned"] == \
        full["windows"]["train"]["fraud_learned"]
    # the fraud rate and the drift reference as the whole window gives them
    assert sampled["data"]["fraud_rate"] == pytest.approx(full["data"]["fraud_rate"],
                                                          rel=0.1)
    for feature in ("card_count_24h", "merchant_count_7d", "hour_of_day"):
        a = np.asarray(full["reference"]["features"][feature]["proportions"])
        b = np.asarray(sampled["reference"]["features"][feature]["proportions"])
        if len(a) == len(b):
            assert np.max(np.abs(a - b)) < 0.05, feature
    # the models: about as good on the same test window
    f, t = full["metrics"]["test"]["ensemble"], sampled["metrics"]["test"]["ensemble"]
    assert t["auc_roc"] > f["auc_roc"] - 0.02
    assert t["average_precision"] > f["average_precision"] - 0.05
    # a share out of (0, 1] is refused
    with pytest.raises(ValueError, match="share"):
        T.train(history, tmp_path / "y", T.TrainConfig(genuine_sample=0.0,
                                                       sample_until_ms=until),
                "ab" * 32, rules, labelled=labelled)
