"""Model versions through the control topic: published once, fetched by every worker from
the artifacts topic into its own models folder (no shared folder), served within seconds,
kept by a worker that restarts with an empty folder; what cannot be served is refused."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer

from fraudstream.schemas.control import ControlRecord
from fraudstream.scorers.registry import Registry
from fraudstream.scorers.rules import RuleSet
from fraudstream.streams.control.topic import latest, publish
from fraudstream.streams.settings import Settings
from fraudstream.streams.topics import assign_all
from tests.conftest import ROOT, T0_MS, produce

pytestmark = pytest.mark.e2e


def model_cli(settings: Settings, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FRAUDSTREAM_")}
    env.update(settings.to_env())
    return subprocess.run([sys.executable, "-m", "fraudstream", "model", *args], env=env,
                          cwd=ROOT, capture_output=True, text=True, timeout=120)


def wait_for(log: Path, text: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while text not in (log.read_text(errors="replace") if log.exists() else ""):
        assert time.monotonic() < deadline, f"{text!r} not in {log}"
        time.sleep(0.3)


@pytest.mark.slow  # 24 s: make test-slow (CI runs both)
def test_two_workers_without_a_shared_folder_serve_a_published_version(
        models_registry, stack_settings, start_worker, codecs, tmp_path):
    trainer = tmp_path / "trainer"  # where the version was trained: no worker reads it
    for v in models_registry.versions():
        shutil.copytree(models_registry.root / v, trainer / v)
    first, second = Registry(trainer).versions()
    base = stack_settings.replace(scoring={"budget_ms": 10_000.0, "online": False})
    workers = [start_worker(base.replace(worker={"data_dir": tmp_path / f"state-{k}"},
                                         scoring={"models_dir": tmp_path / f"models-{k}"}))
               for k in (0, 1)]
    for w in workers:
        wait_for(w.log, "Worker]: Ready", 60)
    reader = Consumer(base.kafka.consumer_config("tests-models-reader"))
    assign_all(reader, [base.topics.decisions], OFFSET_BEGINNING)
    decided: dict[str, dict] = {}
    count = iter(range(100_000))

    def round_of(n: int = 30, timeout_s: float = 60.0) -> list[dict]:
        """``n`` transactions on ``n`` cards (every partition), and their decisions."""
        ids, records = [], []
        for _ in range(n):
            i = next(count)
            card = f"card_m{i % n}"
            txn = {"transaction_id": f"mdl-{i}", "event_time": T0_MS + i * 1000,
                   "card_id": card, "customer_id": None, "merchant_id": "m1",
                   "terminal_id": None, "amount": 40.0, "currency": "EUR", "mcc": "5411",
                   "country": "FR", "card_country": "FR", "lat": None, "lon": None,
                   "device_id": None, "ip": None, "channel": "ecom"}
            ids.append(txn["transaction_id"])
            records.append((card.encode(), codecs.transaction.encode(txn)))
        produce(base, base.topics.transactions, records)
        deadline = time.monotonic() + timeout_s
        while not all(t in decided for t in ids):
            assert time.monotonic() < deadline, [w.tail() for w in workers]
            for m in reader.consume(1000, 0.2):
                if not m.error():
                    d = codecs.decision.decode(m.value())
                    decided[d["transaction_id"]] = d
        return [decided[t] for t in ids]

    assert {d["model_version"] for d in round_of()} == {f"rules@{RuleSet.default().version}"}

    trainer_settings = base.replace(scoring={"models_dir": trainer})
    published = time.monotonic()
    out = model_cli(trainer_settings, "publish", first, "--reason", "first champion",
                    "--by", "ml@team")
    assert out.returncode == 0, out.stderr
    while {d["model_version"] for d in round_of()} != {first}:
        assert time.monotonic() - published < 30, [w.tail() for w in workers]
    took = time.monotonic() - published
    for k, w in enumerate(workers):
        assert f"models: active {first}" in w.log.read_text()
        assert (tmp_path / f"models-{k}" / first / "SHA256SUMS").exists()
    assert took < 30

    # Published by hand, past the CLI: a version whose files were never sent. Refused.
    publish(base, ControlRecord.make("model", "v-missing", {"active": "v-missing",
                                                            "shadow": None},
                                     "script@ops", T0_MS, "by hand"))
    for w in workers:
        wait_for(w.log, "control: refused the model state", 30)
        assert "v-missing: no manifest" in w.log.read_text()
    assert {d["model_version"] for d in round_of()} == {first}

    # A version altered after training is refused by the CLI, and nothing is published.
    (trainer / second / "metadata.json").write_text(
        (trainer / second / "metadata.json").read_text().replace('"trees"', '"treez"'))
    out = model_cli(trainer_settings, "publish", second, "--reason", "tampered")
    assert out.returncode == 1 and second in out.stderr, out.stderr

    # A worker restarted on an empty models folder starts with the version in force.
    assert workers[1].stop() == 0
    fresh = tmp_path / "models-fresh"
    workers[1] = start_worker(base.replace(worker={"data_dir": tmp_path / "state-1"},
                                           scoring={"models_dir": fresh}))
    wait_for(workers[1].log, f"models: active {first}", 60)
    assert {d["model_version"] for d in round_of(timeout_s=90)} == {first}
    assert Registry(fresh).versions() == [first]

    out = model_cli(trainer_settings, "history")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert len(lines) == 2 and first in lines[0] and "ml@team" in lines[0]
    assert "v-missing" in lines[1]
    reader.close()
    print(f"published version served by both workers {took:.1f} s after the command "
          "started")


def test_a_new_champion_is_refused_while_a_rollout_is_judged_against_the_old_one(
        models_registry, stack_settings):
    """A canary's gates compare its version with the champion it started against: `model
    publish` of another active version during the rollout is refused (abort first); a
    shadow, which the gates do not read, may change."""
    settings = stack_settings.replace(scoring={"models_dir": models_registry.root})
    first, second = models_registry.versions()[:2]
    out = model_cli(settings, "publish", first, "--reason", "champion")
    assert out.returncode == 0, out.stderr
    out = model_cli(settings, "canary", second, "--reason", "try the new one")
    assert out.returncode == 0, out.stderr

    out = model_cli(settings, "publish", second, "--reason", "skip the canary")
    assert out.returncode == 2, out.stdout + out.stderr
    assert f"of {second} against {first} is running" in out.stderr
    assert "abort it first" in out.stderr
    state = latest(settings, "model")
    assert state is not None and state.document["active"] == first
    out = model_cli(settings, "publish", second, "--shadow", "--reason", "watch it too")
    assert out.returncode == 0, out.stderr

    out = model_cli(settings, "canary", "--abort", "--reason", "replaced by hand")
    assert out.returncode == 0, out.stderr
    out = model_cli(settings, "publish", second, "--reason", "by hand, after the abort")
    assert out.returncode == 0, out.stderr
    state = latest(settings, "model")
    assert state is not None and state.document["active"] == second


@pytest.mark.slow  # 30 s: make test-slow (CI runs both)
def test_promote_shadow_and_rollback_change_the_published_state_once_there_is_one(
        models_registry, stack_settings, tmp_path):
    """A folder's pointers are undone by the published model state at its worker's next
    start: once one is published, `promote`, `shadow` and `rollback` publish their change
    (with a reason), and `rollback` goes back in the published history."""
    first, second = models_registry.versions()[:2]
    local = tmp_path / "ops-laptop"  # the operator's folder holds only the second version
    shutil.copytree(models_registry.root / second, local / second)
    ops = stack_settings.replace(scoring={"models_dir": local})
    trainer = stack_settings.replace(scoring={"models_dir": models_registry.root})

    # Nothing published yet: the folder is the state, as on a single machine.
    out = model_cli(ops, "promote", second)
    assert out.returncode == 0 and Registry(local).pointer("ACTIVE") == second, out.stderr
    assert latest(ops, "model") is None

    out = model_cli(trainer, "publish", first, "--reason", "champion", "--by", "ml@team")
    assert out.returncode == 0, out.stderr
    out = model_cli(ops, "promote", second)
    assert out.returncode == 2 and "--reason" in out.stderr, out.stderr
    assert latest(ops, "model").document == {"active": first, "shadow": None}

    out = model_cli(ops, "promote", second, "--reason", "better AP", "--by", "ana@ops")
    assert out.returncode == 0, out.stderr
    assert latest(ops, "model").document == {"active": second, "shadow": None}
    out = model_cli(ops, "shadow", first, "--reason", "keep watching it")
    assert out.returncode == 0, out.stderr  # not in this folder: on the artifacts topic
    assert latest(ops, "model").document == {"active": second, "shadow": first}
    out = model_cli(ops, "shadow", "--off", "--reason", "enough")
    assert out.returncode == 0, out.stderr
    assert latest(ops, "model").document == {"active": second, "shadow": None}

    out = model_cli(ops, "rollback", "--reason", "declines doubled", "--by", "sre@ops")
    assert out.returncode == 0, out.stderr
    assert latest(ops, "model").document == {"active": first, "shadow": None}
    assert latest(ops, "model").published_by == "sre@ops"
    out = model_cli(ops, "rollback", "--reason", "it was the merchant, not the model")
    assert out.returncode == 0, out.stderr
    assert latest(ops, "model").document["active"] == second
    # The folder was never the state: its pointer is what the first promote left.
    assert Registry(local).pointer("ACTIVE") == second and \
        Registry(local).pointer("SHADOW") is None
    out = model_cli(ops, "history")
    assert [line.split("\t")[5] for line in out.stdout.splitlines()] == [
        "champion", "better AP", "keep watching it", "enough", "declines doubled",
        "it was the merchant, not the model"]
