"""Rules and blocklists through the control topic: published by the CLI after the same
checks a worker makes, in force on a running worker without a restart, kept by a worker
that restarts, and refused (by the CLI and by the worker) when they cannot be applied."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer

from fraudstream.schemas.control import ControlError, ControlRecord, decode
from fraudstream.scorers.rules import DEFAULT_RULES_PATH, RuleSet
from fraudstream.scorers.rules_file import RulesError, inline_document, read_toml
from fraudstream.streams.control.follow import rules_in_force
from fraudstream.streams.control.topic import publish
from fraudstream.streams.embedded.broker import free_port
from fraudstream.streams.settings import Settings
from fraudstream.streams.topics import assign_all
from tests.conftest import ROOT, T0_MS, produce

PAN = "4111 1111 1111 1111"  # a test card number: it passes the Luhn check


def rules_file(folder: Path, version: str, blocked: list[str]) -> Path:
    """The default rules with another version and a blocklist of ``blocked`` card tokens
    kept in a file next to it, as a fraud team keeps its lists."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "blocked-cards.txt").write_text("# cards confirmed stolen\n"
                                              + "".join(f"{c}\n" for c in blocked))
    text = DEFAULT_RULES_PATH.read_text().replace('version = "', f'version = "{version}"\n'
                                                  '# was: version = "', 1)
    text += ('\n[[rules]]\nid = "R900_OPS_BLOCK"\nkind = "blocklist"\nfield = "card_id"\n'
             'weight = 1.0\nfile = "blocked-cards.txt"\n')
    path = folder / "rules.toml"
    path.write_text(text)
    return path


def test_a_control_record_round_trips_and_an_edited_one_is_refused():
    rec = ControlRecord.make("rules", "v1", {"version": "v1", "rules": []}, "ana@ops",
                             1_796_000_000_000, "new list")
    assert decode(rec.encode()) == rec
    assert rec.state_key() == b"rules"
    assert rec.audit_key().startswith(b"audit/rules/1796000000000/")
    edited = rec.encode().replace(b'"rules":[]', b'"rules":[{}]')
    with pytest.raises(ControlError, match="does not match its sha256"):
        decode(edited)
    for bad in (None, b"{", b"[]", b'{"kind": "model"}'):
        with pytest.raises(ControlError):
            decode(bad)


def test_a_published_document_holds_its_blocklists_and_no_card_number(tmp_path):
    path = rules_file(tmp_path, "2026.12.2", ["card_stolen_7"])
    doc = inline_document(read_toml(path), path.parent)
    rule = next(r for r in doc["rules"] if r["id"] == "R900_OPS_BLOCK")
    assert rule["values"] == ["card_stolen_7"] and "file" not in rule
    assert RuleSet.from_document(doc, "t").version == "2026.12.2"
    with pytest.raises(RulesError, match="inline"):
        RuleSet.from_document(read_toml(path), "t")  # still names its file
    rule["values"].append(PAN)
    with pytest.raises(RulesError, match="raw card number"):
        RuleSet.from_document(doc, "t")


def metric(port: int, series: str) -> float | None:
    """The value of one series on the worker's /metrics (None: not there)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        for line in resp.read().decode().splitlines():
            if line.startswith(series + " "):
                return float(line.rsplit(" ", 1)[1])
    return None


def cli(settings: Settings, *args: str, command: str = "rules"
        ) -> subprocess.CompletedProcess:
    """``fraudstream <command> <args>`` with ``settings``, as an operator runs it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FRAUDSTREAM_")}
    env.update(settings.to_env())
    return subprocess.run([sys.executable, "-m", "fraudstream", command, *args], env=env,
                          cwd=ROOT, capture_output=True, text=True, timeout=60)


@pytest.mark.e2e
def test_published_rules_apply_without_a_restart_and_survive_one(stack_settings,
                                                                  start_worker, codecs,
                                                                  tmp_path):
    port = free_port()
    settings = stack_settings.replace(worker={"metrics_port": port})
    card = f"card_ops_{uuid.uuid4().hex[:6]}"
    count = iter(range(10_000))
    reader = Consumer(settings.kafka.consumer_config("tests-control-reader"))
    assign_all(reader, [settings.topics.decisions], OFFSET_BEGINNING)
    decided: dict[str, dict] = {}

    def wait_decided(timeout_s: float = 30.0) -> dict:
        """One more transaction of the card, and its decision."""
        i = next(count)
        tid = f"ctl-{card}-{i}"
        txn = {"transaction_id": tid, "event_time": T0_MS + i * 1000, "card_id": card,
               "customer_id": None, "merchant_id": "m_ops", "terminal_id": None,
               "amount": 12.5, "currency": "EUR", "mcc": "5411", "country": "FR",
               "card_country": "FR", "lat": None, "lon": None, "device_id": None,
               "ip": None, "channel": "pos"}
        produce(settings, settings.topics.transactions,
                [(card.encode(), codecs.transaction.encode(txn))])
        deadline = time.monotonic() + timeout_s
        while tid not in decided:
            assert time.monotonic() < deadline, f"{tid} not decided"
            for m in reader.consume(1000, 0.2):
                if not m.error():
                    d = codecs.decision.decode(m.value())
                    decided[d["transaction_id"]] = d
        return decided[tid]

    worker = start_worker(settings)
    first = wait_decided()
    default_version = RuleSet.default().version
    assert first["rules_version"] == default_version
    assert "R900_OPS_BLOCK" not in first["reasons"]

    # A fraud analyst blocks the card: the CLI checks the file, inlines the list, publishes.
    path = rules_file(tmp_path / "ops", "2026.12.2-ops", [card])
    published = time.monotonic()
    out = cli(settings, "publish", str(path), "--reason", "card reported stolen",
              "--by", "ana@fraud-ops")
    assert out.returncode == 0, out.stderr
    assert "rules 2026.12.2-ops" in out.stdout
    deadline = time.monotonic() + 20
    while True:
        d = wait_decided()
        if d["rules_version"] == "2026.12.2-ops":
            break
        assert time.monotonic() < deadline, worker.tail()
        time.sleep(0.5)
    took = time.monotonic() - published
    assert d["decision"] == "decline" and "R900_OPS_BLOCK" in d["reasons"], d
    assert took < 20 and worker.running
    assert metric(port, 'fraudstream_rules_info{version="2026.12.2-ops"}') == 1.0
    assert metric(port, f'fraudstream_rules_info{{version="{default_version}"}}') is None

    # Published by hand, past the CLI: a list holding a card number. The worker refuses it.
    bad = ControlRecord.make("rules", "2026.12.3-bad", inline_document(
        read_toml(rules_file(tmp_path / "bad", "2026.12.3-bad", [PAN])), tmp_path / "bad"),
        "script@ops", T0_MS, "by hand")
    publish(settings, bad)
    deadline = time.monotonic() + 20
    while "control: refused the rules" not in worker.log.read_text():
        assert time.monotonic() < deadline, worker.tail()
        time.sleep(0.5)
    assert "raw card number" in worker.log.read_text()
    assert wait_decided()["rules_version"] == "2026.12.2-ops"
    assert PAN not in worker.log.read_text()
    assert metric(port, 'fraudstream_control_refused_total{kind="rules"}') == 1.0
    # What a replay decides with: the rules in force, not the file's or the refused ones.
    assert rules_in_force(settings).ruleset.version == "2026.12.2-ops"

    # A restarted worker starts with the rules in force, not its file's.
    assert worker.stop() == 0
    worker = start_worker(settings)
    d = wait_decided(timeout_s=60)
    assert d["rules_version"] == "2026.12.2-ops" and d["decision"] == "decline", worker.tail()

    # The CLI refuses what a worker would, and writes nothing; history lists what was.
    out = cli(settings, "publish", str(rules_file(tmp_path / "pan", "x", [PAN])),
              "--reason", "oops")
    assert out.returncode == 2 and "raw card number" in out.stderr, out.stderr
    assert PAN not in out.stderr
    (tmp_path / "broken.toml").write_text('version = "z"\n[thresholds]\nreview = 2\n')
    out = cli(settings, "publish", str(tmp_path / "broken.toml"), "--reason", "oops")
    assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
    out = cli(settings, "history")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert len(lines) == 2 and "2026.12.2-ops" in lines[0] and "ana@fraud-ops" in lines[0]
    assert "card reported stolen" in lines[0] and "2026.12.3-bad" in lines[1]
    reader.close()
