"""Canary rollouts on the embedded stack, real processes: two workers with their own data
dirs and models folders, ``fraudstream controller``, the ``model`` CLI and a Prometheus
scraping them all, under steady traffic. A good canary goes 10% -> 50% -> champion on its
own, each card on one variant per step, and a worker killed mid-rollout comes back on the
current step; a canary that declines everything and one that breaks the latency gate are
rolled back by the controller, and then no card is served by them; the dashboard's canary
row has data and the rollback alert fires."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer

from fraudstream.schemas.control import ControlRecord
from fraudstream.scorers.artifact import write_sums
from fraudstream.scorers.canary import in_canary
from fraudstream.scorers.registry import Registry
from fraudstream.streams.control.rollout import epoch_ms
from fraudstream.streams.control.topic import publish
from fraudstream.streams.embedded.broker import free_ports
from fraudstream.streams.processes import stop_process
from fraudstream.streams.settings import Settings
from fraudstream.streams.topics import assign_all
from tests.conftest import DAY_MS, ROOT, T0_MS, _events
from tests.test_control_models import model_cli, wait_for
from tests.test_observability import _get, _query, panels, start_prometheus

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

CARDS = 2000


def env_of(settings: Settings) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FRAUDSTREAM_")}
    env.update(settings.to_env())
    return env


@pytest.fixture(scope="module")
def versions(models_registry, tmp_path_factory) -> tuple[Path, str, str, str, str]:
    """(folder, champion, good, declines, slow): the champion (the first version of the
    session's registry); a retrain of its data with another seed (good); one that declines
    everything (its thresholds set near 0, then sealed: a mis-set threshold); and one of
    10,000 trees (slow)."""
    from fraudstream.scorers import train as T
    from fraudstream.scorers.rules import RuleSet, RulesScorer

    root = tmp_path_factory.mktemp("canary-models")
    champion = models_registry.versions()[0]
    shutil.copytree(models_registry.root / champion, root / champion)
    made = []
    for trees, seed in ((40, 11), (40, 12), (10_000, 13)):
        time.sleep(1.0)  # versions are named by the second
        before = set(Registry(root).versions())
        T.train(_events(5, 8.0, 2500), root, T.TrainConfig(trees=trees, seed=seed),
                "05" * 32, RulesScorer(RuleSet.default()))
        made.append((set(Registry(root).versions()) - before).pop())
    good, declines, slow = made
    meta = root / declines / "metadata.json"
    doc = json.loads(meta.read_text())
    doc["thresholds"] = {"review": 1e-6, "decline": 1e-6}
    meta.write_text(json.dumps(doc))
    (root / declines / "SHA256SUMS").unlink()
    write_sums(root / declines)
    Registry(root).load(declines, sealed=True)  # it loads: only its decisions are wrong
    return root, champion, good, declines, slow


def topic_records(settings: Settings, codecs, txns: list[dict], labels: list[dict]
                  ) -> list[tuple[int, str, bytes, bytes]]:
    """A generated history as records for the topics, transactions at their event time
    and labels at their label time: (time, topic, key, value), in time order."""
    topics = settings.topics
    return sorted(
        [(t["event_time"], topics.transactions, t["card_id"].encode(),
          codecs.transaction.encode(t)) for t in txns]
        + [(lab["label_time"], topics.labels, lab["card_id"].encode(),
            codecs.label.encode(lab)) for lab in labels], key=lambda r: r[0])


class PacedProducer:
    """``records`` produced in the background, ``per_tick`` of them every ``tick_s``."""

    def __init__(self, settings: Settings, records: list[tuple[int, str, bytes, bytes]],
                 per_tick: int, tick_s: float) -> None:
        self.settings, self.records, self.sent = settings, records, 0
        self.per_tick, self.tick_s = per_tick, tick_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._produce, daemon=True)
        self._thread.start()

    def _produce(self) -> None:
        from confluent_kafka import Producer

        producer = Producer({**self.settings.kafka.client_config(), "linger.ms": 5})
        for i in range(0, len(self.records), self.per_tick):
            if self._stop.is_set():
                break
            for _t, topic, key, value in self.records[i:i + self.per_tick]:
                producer.produce(topic, key=key, value=value)
            producer.flush(30)
            self.sent = i + self.per_tick
            self._stop.wait(self.tick_s)
        producer.flush(30)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)


class Traffic:
    """A generated history (the world the versions were trained on, other traffic), produced
    in the background at about 500 transactions a second with its labels, and every
    decision read."""

    def __init__(self, settings: Settings, codecs) -> None:
        from fraudstream.streams.traffic.generator import generate_history
        from fraudstream.streams.traffic.world import GeneratorConfig

        self.settings, self.codecs = settings, codecs
        txns, labels = generate_history(
            GeneratorConfig(seed=5, traffic_seed=9, n_cards=CARDS, label_delay_days=0.5,
                            label_delay_spread_days=0.2, id_prefix="cn"),
            T0_MS - 11 * DAY_MS, 10.0, 12_500)
        self.producer = PacedProducer(settings, topic_records(settings, codecs, txns, labels),
                                      200, 0.4)
        self.decisions: list[dict] = []
        self._stop = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        reader = Consumer(self.settings.kafka.consumer_config("tests-canary-reader"))
        assign_all(reader, [self.settings.topics.decisions], OFFSET_BEGINNING)
        while not self._stop.is_set():
            for m in reader.consume(1000, 0.2):
                if not m.error():
                    self.decisions.append(self.codecs.decision.decode(m.value()))
        reader.close()

    def since(self, t_ms: int) -> list[dict]:
        return [d for d in list(self.decisions) if epoch_ms(d["decided_at"]) >= t_ms]

    def stop(self) -> None:
        self.producer.stop()
        self._stop.set()
        self._reader.join(10)


def rolled_back(log: Path) -> str:
    """The controller's last "rolled back" line."""
    lines = [line for line in log.read_text().splitlines() if " rolled back at " in line]
    return lines[-1] if lines else ""


def now_ms() -> int:
    return int(time.time() * 1000)


def wait_until(check, timeout_s: float, what: str, logs=()) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, (what, [w.tail() for w in logs])
        time.sleep(0.5)


def test_canary_rollouts_promote_a_good_version_and_roll_back_bad_ones(
        versions, stack_settings, start_worker, codecs, tmp_path):
    trainer, first, second, declines, slow = versions
    base = stack_settings.replace(scoring={"budget_ms": 10_000.0, "online": False})
    ports = free_ports(3)  # two workers, the controller
    settings_of = [base.replace(worker={"data_dir": tmp_path / f"state-{k}",
                                        "metrics_port": ports[k]},
                                scoring={"models_dir": tmp_path / f"models-{k}"})
                   for k in (0, 1)]
    workers = [start_worker(s) for s in settings_of]
    for w in workers:
        wait_for(w.log, "Worker]: Ready", 60)
    trainer_settings = base.replace(scoring={"models_dir": trainer})
    out = model_cli(trainer_settings, "publish", first, "--reason", "champion")
    assert out.returncode == 0, out.stderr
    controller_log = tmp_path / "controller.log"
    with open(controller_log, "w") as log_file:
        controller = subprocess.Popen([sys.executable, "-m", "fraudstream", "controller",
                                       "--metrics-port", str(ports[2])],
                                      env=env_of(base), cwd=ROOT, stdout=log_file,
                                      stderr=subprocess.STDOUT)
    prom, prom_url = start_prometheus(tmp_path, [f"127.0.0.1:{p}" for p in ports])
    traffic = Traffic(base, codecs)
    try:
        wait_until(lambda: {d["model_version"] for d in traffic.decisions[-300:]} == {first},
                   60, "the champion serves", workers)
        gates = ["--gate", "min_decisions=100"]

        # 1. A good canary: 10% then 50% then promoted, with no command after the first.
        started = now_ms()
        out = model_cli(trainer_settings, "canary", second, "--steps", "10:12,50:45,100",
                        *gates, "--reason", "challenger from the November retrain")
        assert out.returncode == 0, out.stderr
        wait_for(controller_log, "now 50% of cards", 90)
        at_50 = now_ms()
        step1 = [d for d in traffic.since(started) if epoch_ms(d["decided_at"]) < at_50 - 2000
                 and d["variant"] is not None]
        by_card: dict[str, set[str]] = defaultdict(set)
        for d in step1:
            by_card[d["card_id"]].add(d["variant"])
            assert d["variant"] == ("canary" if in_canary([d["card_id"]], 0.1)[0]
                                    else "champion"), d
            assert d["model_version"] == (second if d["variant"] == "canary" else first)
        assert all(len(v) == 1 for v in by_card.values())  # no card flips inside a step
        cards = sum(v == {"canary"} for v in by_card.values()) / len(by_card)
        share = sum(d["variant"] == "canary" for d in step1) / len(step1)
        # The share of n cards in a 10% split has sd sqrt(0.09 / n): 4 sd is the tolerance
        # (0.032 at 1,400 cards, the usual count); the share of decisions varies more
        # (cards buy at different rates): twice that.
        tolerance = 4 * (0.09 / len(by_card)) ** 0.5
        print(f"step 1: {len(step1)} decisions on {len(by_card)} cards; canary share of "
              f"cards {cards:.4f}, of decisions {share:.4f} (tolerance {tolerance:.3f})")
        assert len(by_card) > 300, len(by_card)
        assert abs(cards - 0.1) < tolerance, (cards, len(by_card))
        assert abs(share - 0.1) < 2 * tolerance, (share, len(by_card))

        # A worker killed mid-rollout comes back on the current step (50%).
        workers[1].proc.kill()
        workers[1].proc.wait()
        workers[1] = start_worker(settings_of[1])
        wait_for(workers[1].log, "step 2 of 3, 50% of cards", 60)
        wait_for(workers[1].log, "Worker]: Ready", 60)
        back = now_ms()
        wait_until(lambda: len(traffic.since(back + 3000)) > 600, 60, "traffic after restart",
                   workers)
        later = [d for d in traffic.since(back + 3000) if d["variant"] is not None]
        assert later and all(d["variant"] == ("canary" if in_canary([d["card_id"]], 0.5)[0]
                                              else "champion") for d in later)

        wait_for(controller_log, "every step passed: promoted", 90)
        promoted = now_ms()
        wait_until(lambda: len(traffic.since(promoted + 4000)) > 300, 60, "after promotion")
        wait_until(lambda: {(d["model_version"], d["variant"])
                            for d in traffic.since(now_ms() - 1000)} == {(second, None)},
                   30, "the canary is the champion", workers)

        # 2. and 3. A canary that declines everything, and one too slow: rolled back. The
        # slow one's scores differ too; its other gates are opened so that the latency gate
        # (which waits for min_batches) is the one that judges it.
        only_latency = ["--gate", "max_psi=1000", "--gate", "max_rate_delta=1"]
        for k, (bad, gate, extra) in enumerate(((declines, "decline_rate", []),
                                                (slow, "latency", only_latency))):
            out = model_cli(trainer_settings, "canary", bad, "--steps", "10:120,100", *gates,
                            *extra, "--reason", f"a bad one ({gate})")
            assert out.returncode == 0, out.stderr
            wait_for(controller_log, f"{bad}@", 30)
            wait_until(lambda b=bad: f"{b}@" in rolled_back(controller_log), 90,
                       "rolled back", workers)
            assert f"{gate} fail" in rolled_back(controller_log), rolled_back(controller_log)
            for w in workers:
                wait_for(w.log, f"on {bad} (champion {second})", 30)
            for w in workers:  # the rollback applied: "rolled_back, step 1 of 2, 0%"
                wait_until(lambda w=w, k=k: w.log.read_text().count("rolled_back") > k, 30,
                           "rollback applied", workers)
            applied = now_ms()
            wait_until(lambda t=applied: len(traffic.since(t + 1500)) > 400, 60, "traffic")
            after = traffic.since(applied + 1500)
            assert {d["model_version"] for d in after} == {second}
            assert {d["variant"] for d in after} == {None}
            status = model_cli(trainer_settings, "canary", "--status")
            assert "rolled_back" in status.stdout and f"{gate} fail" in status.stdout, status

        # A rollout published by hand that a worker cannot apply (shares that shrink) is
        # refused by every worker, which serves the champion to every card.
        publish(base, ControlRecord.make("canary", declines, {
            "rollout": "by-hand", "version": declines, "champion": second,
            "steps": [{"share": 0.5, "duration_s": 1}, {"share": 0.2, "duration_s": 1},
                      {"share": 1.0, "duration_s": 0}],
            "step": 0, "step_started_at": now_ms(), "status": "running"}, "script@ops",
            now_ms(), "by hand"))
        for w in workers:
            wait_for(w.log, "control: refused the rollout", 30)
        refused = now_ms()
        wait_until(lambda: len(traffic.since(refused + 1500)) > 300, 60, "traffic")
        assert {d["variant"] for d in traffic.since(refused + 1500)} == {None}
        assert "shares must grow" in workers[0].log.read_text()
        status = model_cli(trainer_settings, "canary", "--status")
        assert status.returncode == 0 and "cannot be applied" in status.stderr, status

        history = model_cli(trainer_settings, "history").stdout
        assert history.count("\tcanary\t") >= 6 and "controller" in history

        # Grafana's canary row has data on a real Prometheus; the rollback alert fires.
        row = panels(json.loads((ROOT / "deploy" / "grafana" / "dashboards" /
                                 "fraudstream.json").read_text()), "Canary")
        assert len(row) >= 6
        empty = [(p["title"], t["expr"]) for p in row for t in p["targets"]
                 if not _query(prom_url, t["expr"].replace("$__rate_interval", "1m"))]
        assert empty == [], empty
        wait_until(lambda: "FraudstreamCanaryRolledBack" in {
            a["labels"]["alertname"] for a in _get(f"{prom_url}/api/v1/alerts")["data"][
                "alerts"] if a["state"] == "firing"}, 30, "the rollback alert fires")
    finally:
        traffic.stop()
        controller.terminate()
        controller.wait(10)
        stop_process(prom, 10.0)
    print(controller_log.read_text())
