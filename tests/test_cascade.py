"""The scoring cascade: rules, then the registry's ONNX ensemble within the budget; a
model that stalls, fails or returns NaN leaves the rules' decision, flagged fallback."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from fraudstream.schemas.codec import Codecs, make_registry
from fraudstream.scorers import train as T
from fraudstream.scorers.artifact import write_sums
from fraudstream.scorers.cascade import ModelStage
from fraudstream.scorers.onnx_model import ArtifactError, ModelScorer
from fraudstream.scorers.registry import ACTIVE, Registry
from fraudstream.scorers.rules import RuleSet, RulesScorer
from fraudstream.state.engine import FeatureEngine, MemoryStore
from fraudstream.state.features import FeatureConfig
from fraudstream.streams.pipeline import Limits, Pipeline, RawRecord
from fraudstream.streams.settings import TopicSettings
from tests.conftest import T0_MS

LIMITS = Limits(max_record_bytes=65536, max_future_ms=300_000, max_amount=1_000_000.0)
NOW = T0_MS


@pytest.fixture
def codecs() -> Codecs:
    return Codecs(make_registry("mock://cascade"), TopicSettings())


def pipeline(codecs: Codecs, stage: ModelStage, budget_ms: float = 50.0) -> Pipeline:
    return Pipeline(codecs, RulesScorer(RuleSet.default()), LIMITS,
                    features=FeatureEngine(FeatureConfig(), MemoryStore()), models=stage,
                    budget_ms=budget_ms)


def records(codecs: Codecs, n: int, card: str = "card_c", start: int = 0) -> list[RawRecord]:
    base = {"customer_id": None, "merchant_id": "m1", "terminal_id": None, "amount": 30.0,
            "currency": "EUR", "mcc": "5411", "country": "FR", "card_country": "FR",
            "lat": None, "lon": None, "device_id": None, "ip": None, "channel": "pos"}
    return [RawRecord("transactions", 0, start + i, card.encode(), codecs.transaction.encode(
        {**base, "transaction_id": f"{card}-{start + i}", "card_id": card,
         "event_time": NOW - 60_000 + i}), NOW) for i in range(n)]


def decisions(codecs: Codecs, result) -> list[dict]:
    return [codecs.decision.decode(v) for _k, v in result.decisions]


def nothing(partition, keys):
    return [None] * len(keys)


class Slow:
    """The real model, made to stall (or fail) on demand: a fault for the cascade."""

    def __init__(self, model: ModelScorer, sleep_s: float = 0.0, fail: bool = False,
                 nan_rows: tuple[int, ...] = ()) -> None:
        self.model, self.sleep_s, self.fail, self.nan_rows = model, sleep_s, fail, nan_rows
        self.version, self.thresholds = model.version, model.thresholds

    def predict(self, X):
        time.sleep(self.sleep_s)
        if self.fail:
            raise RuntimeError("model exploded")
        p = self.model.predict(X)
        p[list(self.nan_rows)] = np.nan
        return p

    def reasons(self, X):
        return self.model.reasons(X)


def test_the_active_model_decides_with_reasons_and_version(models_registry, codecs):
    version = models_registry.versions()[0]
    stage = ModelStage(active=models_registry.load(version))
    out = decisions(codecs, pipeline(codecs, stage).process(records(codecs, 20), nothing))
    assert len(out) == 20
    assert {d["stage"] for d in out} == {"model"} and not any(d["fallback"] for d in out)
    assert {d["model_version"] for d in out} == {version}
    assert all(0.0 <= d["score"] <= 1.0 for d in out)
    assert all(set(d["reasons"]) <= set(T.FEATURE_NAMES) for d in out)
    assert any(d["reasons"] for d in out)
    assert all("model" in d["timings_ms"] for d in out)


def test_a_guardrail_is_a_floor_under_the_model(models_registry, codecs):
    stage = ModelStage(active=models_registry.load(models_registry.versions()[0]))
    [d] = decisions(codecs, pipeline(codecs, stage).process(
        records(codecs, 1, card="card_blocked_demo_0001"), nothing))
    assert d["decision"] == "decline" and d["stage"] == "model"
    assert any(r.startswith("R") for r in d["reasons"])  # the blocklist rule is named


def test_a_stalled_model_leaves_every_event_decided_by_the_budget(models_registry, codecs):
    model = models_registry.load(models_registry.versions()[0])
    stage = ModelStage(active=Slow(model, sleep_s=0.5))
    p = pipeline(codecs, stage, budget_ms=50.0)
    t0 = time.perf_counter()
    out = decisions(codecs, p.process(records(codecs, 30), nothing, arrived=t0))
    took = time.perf_counter() - t0
    assert len(out) == 30 and took < 0.25, took  # not the model's 0.5 s
    assert all(d["fallback"] and d["stage"] == "model" for d in out)
    assert all("fallback:timeout" in d["reasons"] for d in out)
    assert all(d["model_version"].startswith("rules@") for d in out)
    # The stalled call is still running: the next batch falls back at once.
    out = decisions(codecs, p.process(records(codecs, 5, start=30), nothing))
    assert all("fallback:busy" in d["reasons"] for d in out)
    time.sleep(0.5)
    stage.active = model
    out = decisions(codecs, p.process(records(codecs, 5, start=35), nothing))
    assert not any(d["fallback"] for d in out)


def test_a_batch_past_its_budget_is_still_decided_by_a_healthy_model(models_registry,
                                                                       codecs):
    """A backlog: the batch arrived a second ago. The rules would make it no less late,
    only less accurate: the model decides it, and each decision says how late it is."""
    stage = ModelStage(active=models_registry.load(models_registry.versions()[0]))
    out = pipeline(codecs, stage).process(records(codecs, 4), nothing,
                                          arrived=time.perf_counter() - 1.0)
    ds = decisions(codecs, out)
    assert all(d["stage"] == "model" and not d["fallback"] for d in ds)
    assert not out.fallbacks
    assert all(d["late_ms"] >= 950.0 for d in ds)  # 1 s since arrival, 50 ms budget
    assert out.past_budget == 4 and out.past_budget_max_ms >= 950.0
    # within the budget: nothing late
    out = pipeline(codecs, stage).process(records(codecs, 4, start=4), nothing)
    assert [d["late_ms"] for d in decisions(codecs, out)] == [0.0] * 4
    assert out.past_budget == 0


def test_a_stalled_model_on_a_late_batch_is_abandoned_at_the_model_timeout(
        models_registry, codecs):
    """Past its budget, a batch gives the model the model timeout, not the stall."""
    model = models_registry.load(models_registry.versions()[0])
    p = Pipeline(codecs, RulesScorer(RuleSet.default()), LIMITS,
                 features=FeatureEngine(FeatureConfig(), MemoryStore()),
                 models=ModelStage(active=Slow(model, sleep_s=0.5)), budget_ms=50.0,
                 model_timeout_ms=100.0)
    t0 = time.perf_counter()
    out = p.process(records(codecs, 3), nothing, arrived=t0 - 1.0)
    took = time.perf_counter() - t0
    assert 0.1 <= took < 0.4, took
    ds = decisions(codecs, out)
    assert all(d["fallback"] and "fallback:timeout" in d["reasons"] for d in ds)
    assert out.fallbacks == {"timeout": 3}


def test_a_late_batch_larger_than_the_timeout_rows_gets_as_much_time_per_row(
        models_registry, codecs):
    """A backlog's batches hold more rows than FRAUDSTREAM_WORKER_BATCH_MAX; the model
    timeout is for that many rows, so a healthy model is not cut off for the batch's size,
    and a stalled one is still abandoned at the scaled timeout."""
    model = models_registry.load(models_registry.versions()[0])
    slow = Slow(model, sleep_s=0.2)
    p = Pipeline(codecs, RulesScorer(RuleSet.default()), LIMITS,
                 features=FeatureEngine(FeatureConfig(), MemoryStore()),
                 models=ModelStage(active=slow), budget_ms=50.0,
                 model_timeout_ms=100.0, model_timeout_rows=4)
    out = p.process(records(codecs, 4), nothing, arrived=time.perf_counter() - 1.0)
    assert out.fallbacks == {"timeout": 4}  # 0.2 s against 0.1 s for 4 rows
    time.sleep(0.3)  # the abandoned call ends
    out = p.process(records(codecs, 16, start=4), nothing, arrived=time.perf_counter() - 1.0)
    assert not out.fallbacks  # 16 rows get 0.4 s
    assert {d["stage"] for d in decisions(codecs, out)} == {"model"}
    slow.sleep_s = 2.0
    t0 = time.perf_counter()
    out = p.process(records(codecs, 16, start=20), nothing, arrived=t0 - 1.0)
    took = time.perf_counter() - t0
    assert out.fallbacks == {"timeout": 16} and 0.4 <= took < 1.2, took


def test_a_failing_model_and_nan_scores_fall_back_per_event(models_registry, codecs):
    model = models_registry.load(models_registry.versions()[0])
    out = pipeline(codecs, ModelStage(active=Slow(model, fail=True))).process(
        records(codecs, 3), nothing)
    assert out.fallbacks == {"error": 3}
    out = pipeline(codecs, ModelStage(active=Slow(model, nan_rows=(1,)))).process(
        records(codecs, 3), nothing)
    ds = decisions(codecs, out)
    assert [d["fallback"] for d in ds] == [False, True, False]
    assert "fallback:nan" in ds[1]["reasons"] and out.fallbacks == {"nan": 1}


def test_with_no_deadline_the_model_decides_however_slow_and_a_failure_falls_back(
        models_registry, codecs):
    # A replay's budget: the model scores on the calling thread, as long as it takes.
    model = models_registry.load(models_registry.versions()[0])
    slow = pipeline(codecs, ModelStage(active=Slow(model, sleep_s=0.3)), float("inf"))
    out = slow.process(records(codecs, 3), nothing)
    assert out.fallbacks == {} and {d["stage"] for d in decisions(codecs, out)} == {"model"}
    failing = pipeline(codecs, ModelStage(active=Slow(model, fail=True)), float("inf"))
    out = failing.process(records(codecs, 3), nothing)
    assert out.fallbacks == {"error": 3}
    assert all(d["fallback"] and "fallback:error" in d["reasons"]
               for d in decisions(codecs, out))


def test_the_shadow_is_scored_but_never_decides(models_registry, codecs):
    active, shadow = (models_registry.load(v) for v in models_registry.versions())
    out = pipeline(codecs, ModelStage(active=active, shadow=shadow)).process(
        records(codecs, 10), nothing)
    ds = decisions(codecs, out)
    shadows = [codecs.decision.decode(v) for _k, v in out.shadow]
    assert {d["model_version"] for d in ds} == {active.version}
    assert {d["model_version"] for d in shadows} == {shadow.version}
    assert [d["transaction_id"] for d in shadows] == [d["transaction_id"] for d in ds]
    assert {d["stage"] for d in shadows} == {"shadow"}


def test_an_artifact_that_cannot_be_served_is_refused(models_registry, tmp_path):
    good = models_registry.root / models_registry.versions()[0]
    bad = tmp_path / "models"
    for name, damage in (("altered", "onnx"), ("features", "names"), ("broken", "json")):
        target = bad / f"v-{name}"
        shutil.copytree(good, target)
        meta = json.loads((target / "metadata.json").read_text())
        if damage == "onnx":
            (target / "lightgbm.onnx").write_bytes(b"not onnx")
        elif damage == "names":  # trained on other features, and sealed so
            meta["feature_names"] = meta["feature_names"][:-1]
            meta["version"] = target.name
            (target / "metadata.json").write_text(json.dumps(meta))
            write_sums(target)
        else:
            (target / "metadata.json").write_text("{")
    reg = Registry(bad)
    shutil.copytree(good, bad / good.name)
    reg.promote(good.name)
    for version, why in (("v-altered", "sha256"), ("v-features", "retrain"),
                         ("v-broken", "metadata")):
        with pytest.raises(ArtifactError, match=why):
            reg.promote(version)
        assert reg.pointer(ACTIVE) == good.name  # the current model keeps serving


def test_rollback_returns_to_the_previous_version(models_registry, tmp_path):
    root = tmp_path / "models"
    for v in models_registry.versions():
        shutil.copytree(models_registry.root / v, root / v)
    reg = Registry(root)
    first, second = reg.versions()
    reg.promote(first)
    reg.promote(second)
    assert reg.rollback() == first and reg.pointer(ACTIVE) == first


def test_model_files_are_loaded_as_trained(models_registry):
    version = models_registry.versions()[0]
    model = models_registry.load(version)
    assert isinstance(model, ModelScorer) and model.version == version
    assert Path(models_registry.root / version / "report.md").exists()
