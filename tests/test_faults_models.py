"""Model artifacts that were altered, or that are degenerate, never decide.

A fault campaign promoted a version whose metadata.json had every ensemble weight set to
0.0: exit code 0, and it approved everything. Here: the whole artifact is sealed
(SHA256SUMS, its digest pinned in the pointer at promotion) and sanity-checked (weights,
thresholds, a probe batch) at promote and at every load by a worker; ``model list``
survives a broken version; and a worker whose ACTIVE version is refused says so in every
decision (``fallback:model_unavailable``) and in its metrics.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from fraudstream.schemas.codec import Codecs, make_registry
from fraudstream.schemas.fx import Rates
from fraudstream.scorers import train as T
from fraudstream.scorers.artifact import SUMS, write_sums
from fraudstream.scorers.cascade import ModelStage
from fraudstream.scorers.onnx_model import ArtifactError
from fraudstream.scorers.registry import ACTIVE, SHADOW, Registry
from fraudstream.streams.embedded.broker import free_port
from fraudstream.streams.settings import TopicSettings
from fraudstream.streams.worker.metrics import WorkerMetrics
from fraudstream.streams.worker.models_watch import UNAVAILABLE, ModelWatcher
from fraudstream.streams.worker.status import WorkerStatus
from tests.conftest import ROOT, T0_MS, consume_all, produce
from tests.test_cascade import decisions, nothing, pipeline, records


@pytest.fixture
def codecs() -> Codecs:
    """Codecs on an in-process registry (the e2e test makes its own on the real one)."""
    return Codecs(make_registry("mock://faults-models"), TopicSettings())


def copy_version(models_registry: Registry, root: Path, index: int = 0) -> str:
    version = models_registry.versions()[index]
    shutil.copytree(models_registry.root / version, root / version)
    return version


def edit_meta(folder: Path, change) -> None:
    meta = json.loads((folder / "metadata.json").read_text())
    change(meta)
    (folder / "metadata.json").write_text(json.dumps(meta, indent=2))


def zero_weights(meta: dict) -> None:
    for m in meta["models"]:
        m["weight"] = 0.0


def cli(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FRAUDSTREAM_")}
    env["FRAUDSTREAM_SCORING_MODELS_DIR"] = str(root)
    return subprocess.run([sys.executable, "-m", "fraudstream", "model", *args], env=env,
                          cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_zeroed_weights_are_refused_at_promote_even_when_resealed(models_registry, tmp_path):
    root = tmp_path / "models"
    good = copy_version(models_registry, root, 0)
    bad = copy_version(models_registry, root, 1)
    assert cli(root, "promote", good).returncode == 0
    edit_meta(root / bad, zero_weights)

    out = cli(root, "promote", bad)
    assert out.returncode == 1 and out.stdout == ""
    assert out.stderr.count("\n") == 1 and "Traceback" not in out.stderr
    assert "metadata.json does not match its sha256 in SHA256SUMS" in out.stderr
    assert Registry(root).pointer(ACTIVE) == good

    # Whoever zeroed the weights also rewrote SHA256SUMS: the sanity check still refuses.
    write_sums(root / bad)
    out = cli(root, "promote", bad)
    assert out.returncode == 1 and "every ensemble weight is 0" in out.stderr, out.stderr
    assert out.stderr.count("\n") == 1
    assert Registry(root).pointer(ACTIVE) == good


def constant_logistic() -> bytes:
    """A logistic regression that learned nothing: 0.5 for every transaction."""
    X = np.zeros((100, 62), dtype=np.float32)
    y = np.array([0, 1] * 50, dtype=np.int8)
    return T.to_onnx("logistic", T._fit("logistic", X, y, T.TrainConfig()), 62)


@pytest.mark.parametrize("damage, why", [
    ("weights_nan", "ensemble weight nan is not a finite number"),
    ("weights_negative", "ensemble weight -0.5 is not a finite number >= 0"),
    ("weights_sum", "ensemble weights sum to 2, not 1"),
    ("review_nan", "review threshold nan is not a number in (0, 1]"),
    ("decline_above_1", "decline threshold 1.5 is not a number in (0, 1]"),
    ("out_of_order", "review threshold 0.9 is above decline threshold 0.2"),
    ("constant_model", "every row of the probe batch scores 0.5"),
    ("probe_scores", "probe batch scores differ from those stored at training"),
])
def test_a_degenerate_model_is_refused_sealed_or_not(models_registry, tmp_path, damage, why):
    root = tmp_path / "models"
    version = copy_version(models_registry, root)
    folder = root / version

    def change(meta: dict) -> None:
        lgb, logistic = meta["models"]
        if damage == "weights_nan":
            lgb["weight"] = float("nan")
        elif damage == "weights_negative":
            lgb["weight"], logistic["weight"] = -0.5, 1.5
        elif damage == "weights_sum":
            lgb["weight"], logistic["weight"] = 1.0, 1.0
        elif damage == "review_nan":
            meta["thresholds"]["review"] = float("nan")
        elif damage == "decline_above_1":
            meta["thresholds"]["decline"] = 1.5
        elif damage == "out_of_order":
            meta["thresholds"] = {"review": 0.9, "decline": 0.2}
        elif damage == "constant_model":
            data = constant_logistic()
            (folder / "logistic.onnx").write_bytes(data)
            logistic["sha256"] = hashlib.sha256(data).hexdigest()
            lgb["weight"], logistic["weight"] = 0.0, 1.0
        elif damage == "probe_scores":
            meta["probe"]["scores"] = [s * 0.5 for s in meta["probe"]["scores"]]

    edit_meta(folder, change)
    write_sums(folder)  # sealed as if it had been trained so
    reg = Registry(root)
    with pytest.raises(ArtifactError) as info:
        reg.promote(version)
    assert why in str(info.value)
    assert reg.pointer(ACTIVE) is None
    if damage == "constant_model":  # the command says the same, in one line
        out = cli(root, "promote", version)
        assert out.returncode == 1 and why in out.stderr and out.stderr.count("\n") == 1


def test_a_new_artifact_is_sealed_and_probed(models_registry):
    folder = models_registry.root / models_registry.versions()[0]
    meta = json.loads((folder / "metadata.json").read_text())
    assert len(set(meta["probe"]["scores"])) > 1 and len(meta["probe"]["rows"]) == 16
    listed = {line.split()[1] for line in (folder / SUMS).read_text().splitlines()}
    assert listed == {p.name for p in folder.iterdir()} - {SUMS}
    model = models_registry.load(folder.name)
    assert model.digest == hashlib.sha256((folder / SUMS).read_bytes()).hexdigest()


def test_model_list_shows_a_broken_version_and_lists_the_rest(models_registry, tmp_path):
    root = tmp_path / "models"
    good = copy_version(models_registry, root, 0)
    unreadable = copy_version(models_registry, root, 1)
    assert cli(root, "promote", good).returncode == 0
    (root / unreadable / "metadata.json").write_text("{ not json")
    (root / "v-empty").mkdir()  # a version folder left half-written

    out = cli(root, "list")
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr
    lines = dict(line.split("\t", 1) for line in out.stdout.splitlines())
    assert set(lines) == {good, unreadable, "v-empty"}
    assert lines[good].startswith("active\t") and "\tok " in lines[good]
    assert "broken: metadata.json does not match its sha256" in lines[unreadable]
    assert "broken: no readable metadata.json" in lines["v-empty"]
    assert "2 version(s) cannot be served" in out.stderr


def test_a_version_changed_after_promotion_is_refused_even_with_new_sums(models_registry,
                                                                          tmp_path):
    root = tmp_path / "models"
    version = copy_version(models_registry, root)
    reg = Registry(root)
    reg.promote(version)
    edit_meta(root / version, lambda m: m["thresholds"].update(review=0.99, decline=0.999))
    write_sums(root / version)  # a valid-looking, re-sealed artifact...
    with pytest.raises(ArtifactError, match="changed since it was promoted"):
        reg.load(version, expect=reg.pinned(ACTIVE)[1])
    # ...and deleting SHA256SUMS does not make it an "old, unsealed" version either
    (root / version / SUMS).unlink()
    with pytest.raises(ArtifactError, match="SHA256SUMS is missing, but the version was "
                                            "promoted sealed"):
        reg.load(version, expect=reg.pinned(ACTIVE)[1])


def test_an_unsealed_version_of_older_code_serves_but_must_be_sealed_to_promote(
        models_registry, tmp_path, caplog):
    root = tmp_path / "models"
    version = copy_version(models_registry, root)
    folder = root / version
    (folder / SUMS).unlink()
    edit_meta(folder, lambda m: m.pop("probe"))  # as older code wrote it
    (root / ACTIVE).write_text(version + "\n")  # promoted by older code: no digest
    reg = Registry(root)

    stage = ModelStage()
    with caplog.at_level(logging.WARNING):
        ModelWatcher(reg, stage).check()
    assert stage.active is not None and stage.active.version == version
    assert stage.unavailable is None
    assert f"{version} has no SHA256SUMS" in caplog.text

    with pytest.raises(ArtifactError, match=f"fraudstream model seal {version}"):
        reg.promote(version)
    out = cli(root, "seal", version)
    assert out.returncode == 0 and out.stdout.startswith(f"sealed: {version} "), out.stderr
    assert cli(root, "seal", version).returncode == 1  # never re-sealed over
    reg.promote(version)
    assert reg.pinned(ACTIVE) == (version, out.stdout.split()[2])

    # the sanity checks hold for unsealed versions too (probe drawn from the reference)
    (folder / SUMS).unlink()
    edit_meta(folder, zero_weights)
    with pytest.raises(ArtifactError, match="every ensemble weight is 0"):
        reg.load(version)


def test_the_worker_refuses_a_tampered_active_version_and_says_so(models_registry, tmp_path,
                                                                    codecs, caplog):
    root = tmp_path / "models"
    first = copy_version(models_registry, root, 0)
    second = copy_version(models_registry, root, 1)
    reg = Registry(root)
    reg.promote(first)
    edit_meta(root / first, zero_weights)  # altered after promotion, before the start
    stage, metrics = ModelStage(), WorkerMetrics()
    watcher = ModelWatcher(reg, stage, metrics)
    with caplog.at_level(logging.ERROR):
        watcher.check()
    assert stage.active is None and stage.unavailable == UNAVAILABLE
    assert f"ACTIVE {first} refused, no model serves" in caplog.text
    assert metrics.registry.get_sample_value(
        "fraudstream_model_refused", {"role": "active", "version": first}) == 1

    out = pipeline(codecs, stage).process(records(codecs, 5), nothing)
    ds = decisions(codecs, out)
    assert all(d["fallback"] and "fallback:model_unavailable" in d["reasons"]
               and d["stage"] == "rules" and d["model_version"].startswith("rules@")
               for d in ds)
    assert out.fallbacks == {UNAVAILABLE: 5}
    status = WorkerStatus()  # the status line counts them as fallbacks, not the rules' own
    status.add(5, 0, out, 1.0)
    assert "model 0.0% rules 0.0% fallback 100.0% {'model_unavailable': 5}" in status.line()

    # a good version promoted: it serves; then a refused one: the good one keeps serving
    reg.promote(second)
    watcher.check()
    assert stage.active.version == second and stage.unavailable is None
    assert metrics.registry.get_sample_value(
        "fraudstream_model_refused", {"role": "active", "version": first}) is None
    (root / ACTIVE).write_text(f"{first} {'0' * 64}\n")
    caplog.clear()
    with caplog.at_level(logging.ERROR):
        watcher.check()
    assert stage.active.version == second and stage.unavailable is None
    assert f"ACTIVE {first} refused, {second} (as loaded) keeps serving" in caplog.text
    assert metrics.registry.get_sample_value(
        "fraudstream_model_refused", {"role": "active", "version": first}) == 1
    out = pipeline(codecs, stage, budget_ms=5000).process(records(codecs, 5, "card_d"), nothing)
    assert {(d["model_version"], d["fallback"]) for d in decisions(codecs, out)} == {
        (second, False)}

    # no ACTIVE pointer at all: the rules decide by design, no fallback
    (root / ACTIVE).unlink()
    (root / SHADOW).unlink(missing_ok=True)
    watcher.check()
    out = pipeline(codecs, stage).process(records(codecs, 5, "card_e"), nothing)
    assert not any(d["fallback"] for d in decisions(codecs, out)) and not out.fallbacks
    assert metrics.registry.get_sample_value(
        "fraudstream_model_refused", {"role": "active", "version": first}) is None


def _metric(port: int, name: str, labels: str) -> float | None:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    for line in text.splitlines():
        if line.startswith(f"{name}{{") and labels in line:
            return float(line.rsplit(" ", 1)[1])
    return None


@pytest.mark.e2e
def test_a_worker_with_a_broken_active_version_flags_every_decision(
        models_registry, stack_settings, start_worker, tmp_path):
    root = tmp_path / "models"
    version = copy_version(models_registry, root)
    Registry(root).promote(version)
    original = (root / version / "metadata.json").read_bytes()
    edit_meta(root / version, zero_weights)
    port = free_port()
    settings = stack_settings.replace(
        worker={"metrics_port": port},
        scoring={"models_dir": root, "reload_interval_s": 0.3, "budget_ms": 2000.0})
    real = Codecs(make_registry(settings.codec.registry_url), settings.topics)
    worker = start_worker(settings)
    base = {"customer_id": None, "merchant_id": "m1", "terminal_id": None, "amount": 30.0,
            "currency": "EUR", "mcc": "5411", "country": "FR", "card_country": "FR",
            "lat": None, "lon": None, "device_id": None, "ip": None, "channel": "pos"}

    def send(start: int, n: int) -> None:
        produce(settings, settings.topics.transactions, [
            (f"card_f{i % 11}".encode(), real.transaction.encode(
                {**base, "transaction_id": f"f-{i}", "card_id": f"card_f{i % 11}",
                 "event_time": T0_MS + i})) for i in range(start, start + n)])

    send(0, 60)
    out = consume_all(settings, settings.topics.decisions, 60, timeout_s=90, settle_s=0.5)
    assert worker.running, worker.tail()
    ds = [real.decision.decode(m.value()) for m in out]
    assert len({d["transaction_id"] for d in ds}) == 60
    assert all(d["fallback"] and "fallback:model_unavailable" in d["reasons"]
               and d["model_version"].startswith("rules@") for d in ds), ds[:2]
    deadline = time.monotonic() + 10  # metrics are updated once the batch is committed
    while _metric(port, "fraudstream_fallbacks_total", 'cause="model_unavailable"') != 60 \
            and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _metric(port, "fraudstream_fallbacks_total", 'cause="model_unavailable"') == 60
    assert _metric(port, "fraudstream_model_refused",
                   f'role="active",version="{version}"') == 1
    log = worker.log.read_text(errors="replace")
    assert f"ACTIVE {version} refused, no model serves" in log
    assert "metadata.json does not match its sha256" in log

    # The files restored: the worker tries the version again by itself and it decides.
    (root / version / "metadata.json").write_bytes(original)
    deadline = time.monotonic() + 30
    while _metric(port, "fraudstream_model_refused", "role=") and time.monotonic() < deadline:
        time.sleep(0.2)
    send(60, 40)
    out = consume_all(settings, settings.topics.decisions, 100, timeout_s=60, settle_s=0.5)
    late = [real.decision.decode(m.value()) for m in out
            if int(m.key().decode().split("-")[1]) >= 60]
    assert len(late) == 40 and {(d["model_version"], d["fallback"]) for d in late} == {
        (version, False)}, worker.tail()


def test_the_refused_model_alert_fires_on_the_gauge(tmp_path):
    """The shipped rule, unit-tested by promtool on a series like the worker's gauge."""
    promtool = shutil.which("promtool")
    assert promtool, "make test-deps installs the prometheus package"
    shutil.copy(ROOT / "deploy" / "prometheus" / "alerts.yml", tmp_path / "alerts.yml")
    (tmp_path / "test.yml").write_text("""
rule_files: [alerts.yml]
evaluation_interval: 15s
tests:
  - interval: 15s
    input_series:
      - series: 'fraudstream_model_refused{instance="w1", role="active", version="v1"}'
        values: '1x10'
    alert_rule_test:
      - eval_time: 2m
        alertname: FraudstreamModelRefused
        exp_alerts:
          - exp_labels: {severity: warning, instance: w1, role: active, version: v1}
            exp_annotations:
              summary: SUMMARY
""".replace("SUMMARY", json.dumps(
        "Worker w1 refused the active model v1 (altered or degenerate; reason in its log): "
        "the previous model, or the rules, decide instead.")))
    out = subprocess.run([promtool, "test", "rules", "test.yml"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stdout + out.stderr


def test_a_model_trained_with_other_feature_settings_is_flagged_at_load(
        models_registry, tmp_path, caplog):
    """Served features must be computed as the training history's were: a worker whose
    label delay or allowed lateness differs says so when it loads the version."""
    root = tmp_path / "models"
    version = copy_version(models_registry, root)
    reg = Registry(root)
    reg.promote(version)
    trained = json.loads((root / version / "metadata.json").read_text())["config"]
    same = (trained["label_delay_ms"], trained["allowed_lateness_ms"])
    with caplog.at_level(logging.WARNING):
        ModelWatcher(reg, ModelStage(), features=same).check()
    assert "trained on features computed with other settings" not in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        ModelWatcher(reg, ModelStage(), features=(7 * 86_400_000, same[1])).check()
    assert f"{version} was trained on features computed with other settings" in caplog.text
    assert "FRAUDSTREAM_FEATURES_LABEL_DELAY_S=604800 here" in caplog.text


def promoted_copy(models_registry: Path, tmp_path: Path
                  ) -> tuple[Registry, str, tuple[int, int], dict]:
    """A copy of the trained version, promoted: its registry, version, the feature settings
    it was trained with (label delay, lateness) and its metadata."""
    root = tmp_path / "models"
    version = copy_version(models_registry, root)
    reg = Registry(root)
    reg.promote(version)
    meta = json.loads((root / version / "metadata.json").read_text())
    return reg, version, (meta["config"]["label_delay_ms"],
                          meta["config"]["allowed_lateness_ms"]), meta


def test_a_model_trained_with_a_rates_table_that_moved_materially_is_flagged_at_load(
        models_registry, tmp_path, caplog):
    """Amounts are features: a worker whose rates table gives another reference currency,
    or moved a currency by more than 10%, names it when it loads the version. A newer
    table with the day's small moves (tables are replaced daily) says nothing."""
    reg, version, same, meta = promoted_copy(models_registry, tmp_path)
    trained = Rates.load()
    assert meta["rates"]["version"] == trained.version

    def table(version: str, reference: str = trained.reference, **moved: float) -> Rates:
        units = {**trained.units_per_ref, **moved}
        if reference != trained.reference:
            units = {c: u / units[reference] for c, u in units.items()}
        return Rates(version, reference, units)

    ngn, usd = trained.units_per_ref["NGN"], trained.units_per_ref["USD"]
    for serving, said in (
            (trained, None),
            (table("next-day", NGN=ngn * 1.02, USD=usd * 0.99), None),
            (table("devalued", NGN=ngn * 1.6), "1 rates moved by more than 10% (NGN 60%)"),
            (table("in-dollars", reference="USD"), "amounts in USD here (table in-dollars), "
                                                   f"in {trained.reference} in training")):
        caplog.clear()
        metrics = WorkerMetrics()
        with caplog.at_level(logging.WARNING):
            ModelWatcher(reg, ModelStage(), metrics, features=same, rates=serving).check()
        flagged = metrics.registry.get_sample_value(
            "fraudstream_model_trained_otherwise", {"role": "active", "version": version})
        if said is None:
            assert "in training" not in caplog.text, serving.version
            assert flagged is None
        else:
            assert f"{version} was trained on features computed with other settings" \
                in caplog.text
            assert said in caplog.text, caplog.text
            assert flagged == 1.0  # what the FraudstreamModelTrainedOtherwise alert reads


def test_a_rates_table_published_while_a_model_serves_is_checked_against_its_training(
        models_registry, tmp_path, caplog):
    """A table put in force without a restart (``fraudstream rates publish``) is checked as
    one read at start: flagged once it moved materially from the training's, cleared when a
    table close to it comes back."""
    reg, version, same, meta = promoted_copy(models_registry, tmp_path)
    trained = Rates.load()
    metrics = WorkerMetrics()
    watcher = ModelWatcher(reg, ModelStage(), metrics, features=same, rates=trained)
    watcher.check()

    def flagged() -> float | None:
        return metrics.registry.get_sample_value(
            "fraudstream_model_trained_otherwise", {"role": "active", "version": version})

    assert flagged() is None
    ngn = trained.units_per_ref["NGN"]
    with caplog.at_level(logging.WARNING):
        watcher.rates_changed(Rates("devalued", trained.reference,
                                    {**trained.units_per_ref, "NGN": ngn * 1.6}))
    assert "1 rates moved by more than 10% (NGN 60%)" in caplog.text
    assert flagged() == 1.0
    watcher.rates_changed(Rates("next-day", trained.reference,
                                {**trained.units_per_ref, "NGN": ngn * 1.02}))
    assert flagged() is None
