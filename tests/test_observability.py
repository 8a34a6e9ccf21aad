"""The dashboard and the alert rules, proven on a real Prometheus scraping a real worker.

Prometheus (Debian package) scrapes a worker deciding generated traffic with a trained
model; every dashboard query must return data, and the alerts must go to firing on what
the test provokes: a fallback storm (a budget and a model timeout no model can meet),
drift (amounts twenty times larger than in training), dead letters, and p99 over the
budget (the worker stopped for 2 s while traffic arrives). The rules are the shipped
ones with their windows shortened to fit a test (5m -> 30s, for: -> 0s); the expressions
are unchanged.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
import urllib.parse
import urllib.request
import uuid

import pytest

from fraudstream.scorers.registry import Registry
from fraudstream.streams.embedded.broker import free_port
from fraudstream.streams.processes import die_with_parent, stop_process
from tests.conftest import ROOT, T0_MS, consume_all, produce

pytestmark = pytest.mark.e2e

DEPLOY = ROOT / "deploy"


def test_shipped_rules_and_config_pass_promtool():
    promtool = shutil.which("promtool")
    assert promtool, "make test-deps installs the prometheus package"
    for args in (["check", "rules", str(DEPLOY / "prometheus" / "alerts.yml")],
                 ["check", "config", str(DEPLOY / "prometheus" / "prometheus.yml")]):
        out = subprocess.run([promtool, *args], capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stdout + out.stderr
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "fraudstream.json").read_text())
    assert len(dashboard["panels"]) >= 10


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return json.loads(resp.read())


def _query(base: str, expr: str) -> list:
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    body = _get(url)
    assert body["status"] == "success", body
    return body["data"]["result"]


def start_prometheus(tmp_path, targets: list[str]) -> tuple[subprocess.Popen, str]:
    """A real Prometheus scraping ``targets`` every second with the shipped alert rules,
    their windows shortened to fit a test (5m/10m/30m -> 30s, for: -> 0s); (process, base
    URL), once it is ready."""
    prometheus = shutil.which("prometheus")
    assert prometheus, "make test-deps installs the prometheus package"
    rules = (DEPLOY / "prometheus" / "alerts.yml").read_text()
    rules = re.sub(r"\[(5|10|30)m\]", "[30s]", rules)
    rules = re.sub(r"for: \d+m", "for: 0s", rules)
    (tmp_path / "alerts.yml").write_text(rules)
    (tmp_path / "prometheus.yml").write_text(f"""
global: {{scrape_interval: 1s, evaluation_interval: 1s}}
rule_files: [alerts.yml]
scrape_configs:
  - job_name: fraudstream
    static_configs: [{{targets: {json.dumps(targets)}}}]
""")
    port = free_port()
    prom = subprocess.Popen(
        [prometheus, f"--config.file={tmp_path / 'prometheus.yml'}",
         f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=open(tmp_path / "prometheus.log", "wb"),  # noqa: SIM115
        preexec_fn=die_with_parent)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(f"{base}/-/ready", timeout=2)
            return prom, base
        except OSError:
            if time.monotonic() > deadline:
                stop_process(prom, 10.0)
                raise AssertionError((tmp_path / "prometheus.log").read_text()) from None
            time.sleep(0.3)


def panels(dashboard: dict, row: str | None = None) -> list[dict]:
    """The panels of the row whose title starts with ``row``; with None, those above the
    first row (the rows below have data only while a rollout runs, or with the
    autopilot: their own suites check them)."""
    groups: dict[str | None, list[dict]] = {None: []}
    current: str | None = None
    for p in dashboard["panels"]:
        if p["type"] == "row":
            current = p["title"]
            groups[current] = []
        else:
            groups[current].append(p)
    if row is None:
        return groups[None]
    return next(g for title, g in groups.items() if title and title.startswith(row))


@pytest.mark.slow  # 31 s: make test-slow (CI runs both)
def test_dashboard_queries_return_data_and_alerts_fire(
        models_registry, stack_settings, start_worker, codecs, tmp_path):
    root = tmp_path / "models"
    version = models_registry.versions()[0]
    shutil.copytree(models_registry.root / version, root / version)
    Registry(root).promote(version)
    metrics_port = free_port()
    settings = stack_settings.replace(
        worker={"metrics_port": metrics_port},
        scoring={"models_dir": root, "budget_ms": 0.001, "model_timeout_ms": 0.0,
                 "drift_window": 200})
    worker = start_worker(settings)

    prom, base = start_prometheus(tmp_path, [f"127.0.0.1:{metrics_port}"])
    try:
        # ~25 s of traffic: amounts 20x the training ones (drift), a few bad records
        # (dead letters, 2.4%), labels for some decided transactions (the online learner).
        now = T0_MS
        sent = 0
        prev: list[dict] = []
        for k in range(25):
            batch = []
            for i in range(80):
                n = sent + i
                batch.append({
                    "transaction_id": f"obs-{uuid.uuid4().hex[:6]}-{n}",
                    "event_time": now + n, "card_id": f"card_obs{n % 97}",
                    "customer_id": None, "merchant_id": f"m{n % 13}", "terminal_id": None,
                    "amount": 20.0 * (5 + n % 300), "currency": "EUR", "mcc": "5411",
                    "country": "FR", "card_country": "FR", "lat": None, "lon": None,
                    "device_id": None, "ip": None, "channel": "pos"})
            records = [(t["card_id"].encode(), codecs.transaction.encode(t)) for t in batch]
            produce(settings, settings.topics.transactions,
                    records + [(b"x", b"garbage"), (b"y", b"\xff")])
            if k >= 2:
                produce(settings, settings.topics.labels, [
                    (t["card_id"].encode(), codecs.label.encode({
                        "transaction_id": t["transaction_id"], "card_id": t["card_id"],
                        "merchant_id": t["merchant_id"], "is_fraud": i % 4 == 0,
                        "fraud_type": None, "source": "chargeback",
                        "event_time": t["event_time"], "label_time": now}))
                    for i, t in enumerate(prev)])
            prev = batch
            sent += len(batch)
            if k == 21:
                # A stalled worker (stopped for 2 s while traffic arrives): the decisions
                # of those seconds come late, p99 goes over the budget.
                assert worker.proc is not None
                os.kill(worker.proc.pid, signal.SIGSTOP)
                time.sleep(2.0)
                os.kill(worker.proc.pid, signal.SIGCONT)
            time.sleep(1.0)
        consume_all(settings, settings.topics.decisions, sent, timeout_s=60, settle_s=0)
        assert worker.running, worker.tail()
        time.sleep(3)

        dashboard = json.loads((DEPLOY / "grafana" / "dashboards" /
                                "fraudstream.json").read_text())
        empty = []
        for panel in panels(dashboard):  # the rows below: the canary and autopilot suites
            for target in panel["targets"]:
                expr = target["expr"].replace("$__rate_interval", "15s")
                if not _query(base, expr):
                    empty.append((panel["title"], expr))
        assert empty == [], empty

        # Every alert expression evaluates; the provoked ones fire.
        deadline = time.monotonic() + 30
        while True:
            firing = {a["labels"]["alertname"] for a in _get(f"{base}/api/v1/alerts")
                      ["data"]["alerts"] if a["state"] == "firing"}
            if {"FraudstreamFallbackRateHigh", "FraudstreamSevereDrift",
                "FraudstreamLatencyOverBudget"} <= firing or \
                    time.monotonic() > deadline:
                break
            time.sleep(1)
        assert {"FraudstreamFallbackRateHigh", "FraudstreamSevereDrift",
                "FraudstreamDeadLetterRateHigh", "FraudstreamLatencyOverBudget"} <= firing, (
            firing, _query(base, "sum(rate(fraudstream_dead_letters_total[30s]))"),
            _query(base, "sum(rate(fraudstream_transactions_total[30s]))"))
        assert "FraudstreamWorkerDown" not in firing
        groups = _get(f"{base}/api/v1/rules")["data"]["groups"]
        health = {r["name"]: r["health"] for g in groups for r in g["rules"]}
        assert set(health.values()) == {"ok"}, health
    finally:
        stop_process(prom, 10.0)
