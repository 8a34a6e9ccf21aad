"""``python -m fraudstream.loadtest``: what its report says about each worker rate (who
decided: the model, the rules, or a fallback by cause; the ratio to the Quix Streams peer),
and the peer itself. No test here runs the benchmark: speed is what it prints, not what a
test asserts."""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections import Counter, defaultdict
from pathlib import Path

import orjson
import pytest

from fraudstream.loadtest.baselines import find_quix_python, run_quix
from fraudstream.loadtest.decided_by import brief, decider, describe, tally
from fraudstream.loadtest.report import _ratios, print_summary, quix_line
from fraudstream.schemas.codec import Codecs
from fraudstream.streams.settings import Settings
from fraudstream.streams.traffic.generator import TrafficGenerator
from fraudstream.streams.traffic.world import GeneratorConfig
from tests.conftest import ROOT, T0_MS, consume_all, produce


def _decision(stage: str, fallback: str | None = None) -> dict:
    """The fields of a decision that say who decided, as the worker's cascade writes them."""
    return {"stage": stage, "fallback": fallback is not None,
            "reasons": ["amount_high"] + ([f"fallback:{fallback}"] if fallback else [])}


# the model scored 3; the deadline passed before the model stage on 2 (stage rules); the
# model timed out on 1 (stage model); one fallback names no cause
DECISIONS = [_decision("model")] * 3 + [_decision("rules", "deadline")] * 2 + [
    _decision("model", "timeout"), {"stage": "model", "fallback": True, "reasons": []}]


def test_counts_the_model_decisions_and_the_fallbacks_by_cause():
    counts = tally(decider(d) for d in DECISIONS)
    assert counts == {"model": 3, "rules": 0, "fallback": 4,
                      "fallback_by_cause": {"deadline": 2, "timeout": 1, "unknown": 1}}
    assert describe(counts) == ("decided by: model 3, fallback 4 (deadline 2, timeout 1, "
                                "unknown 1) of 7")
    assert brief(counts) == "3 model, 4 fb (deadline 2, timeout 1, unknown 1)"


def test_the_rules_deciding_by_design_are_not_counted_as_the_model_or_a_fallback():
    counts = tally(decider(_decision("rules")) for _ in range(5))
    assert counts == {"model": 0, "rules": 5, "fallback": 0, "fallback_by_cause": {}}
    assert describe(counts) == "decided by: model 0, rules 5 (no model), fallback 0 of 5"


def _result(quix: dict, models: str | None) -> dict:
    decided = tally(decider(d) for d in DECISIONS)
    result = {
        "events": 7, "models": models, "budget_ms": 50.0, "broker": "fresh per run",
        "bare_faust": {"rate": 5000.0}, "quix": quix,
        "kafka_loop": {"rate": 40000.0, "rate_until_produced": 45000.0},
        "worker": {"rate": 3000.0, "decided_by": decided},
        "saturation": {"by_budget": None, "lag_only": None}, "steps": [], "latency": [],
        "latency_at_70pct": None, "rss": {"peak_mb": None},
        "loadavg": {"start": (1.0, 1.0, 1.0), "end": (2.0, 2.0, 2.0)},
    }
    result["ratios"] = {"drain": _ratios(3000.0, result)}
    return result


def test_the_drain_line_gives_the_ratio_to_the_quix_peer_and_who_decided(capsys):
    quix = {"rate": 12000.0, "rate_until_processed": 12500.0, "quixstreams": "3.28.1"}
    print_summary(_result(quix, "models/"), "features, rules, model, online")
    out = capsys.readouterr().out
    assert "Quix Streams" in out and "12,000/s" in out
    drain = next(line for line in out.splitlines() if "backlog drain" in line)
    # vs bare Faust, vs Kafka loop, vs Quix
    assert drain.split()[-3:] == ["0.60x", "0.07x", "0.25x"], drain
    after = out.split(drain, 1)[1].splitlines()[1]
    assert "model 3, fallback 4 (deadline 2, timeout 1, unknown 1)" in after, out
    assert "no --models" not in out


def test_a_run_without_quixstreams_says_so_and_how_to_install_it(tmp_path, capsys):
    """No quixstreams: no number for the peer, no crash, a note with the install command;
    the drain has no Quix ratio."""
    python = tmp_path / "python"
    python.write_text("#!/bin/sh\nexit 1\n")
    python.chmod(0o755)
    assert find_quix_python(python)[0] is None
    result: dict = {}
    run_quix(Settings(), tmp_path, "u", 7, result, python)
    assert "rate" not in result["quix"]
    assert "make bench-deps" in result["quix"]["skipped"]
    print_summary(_result(result["quix"], None), "features, rules")
    out = capsys.readouterr().out
    assert "skipped: quixstreams is not importable" in quix_line(result["quix"])
    assert quix_line(result["quix"]) in out
    drain = next(line for line in out.splitlines() if "backlog drain" in line)
    assert drain.split()[-1] == "-", drain
    assert "no --models: the rules decide every transaction" in out


def test_help_names_the_peer_and_the_model_options():
    out = subprocess.run([sys.executable, "-m", "fraudstream.loadtest", "--help"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120, check=True).stdout
    for flag in ("--quick", "--models", "--quix", "--no-quix", "--quix-python", "--events"):
        assert flag in out, flag


@pytest.mark.e2e
@pytest.mark.slow  # 25-35 s: make test-slow (CI runs both)
def test_the_quix_peer_keeps_a_count_per_card_on_the_embedded_broker(
        stack_settings: Settings, codecs: Codecs, tmp_path: Path):
    """The peer runs on Tansu (which reports no retention.ms unless it was set) and does
    the stateful job: each card's last output counts all of that card's transactions."""
    python, _version = find_quix_python(None)
    if python is None:
        pytest.skip("quixstreams is not installed: make bench-deps")
    gen = TrafficGenerator(GeneratorConfig(seed=5, id_prefix=f"q{uuid.uuid4().hex[:6]}"))
    txns = [gen.next_transaction(T0_MS + i * 1000) for i in range(300)]
    produce(stack_settings, stack_settings.topics.transactions,
            [(t["card_id"].encode(), codecs.transaction.encode(t)) for t in txns])
    uid = uuid.uuid4().hex[:6]
    result: dict = {}
    run_quix(stack_settings, tmp_path, uid, len(txns), result, None)
    quix = result["quix"]
    assert quix.get("events") == 300 and quix["rate"] > 0, quix
    assert quix["until"] == "final commit"
    assert quix["input_retention_ms"] is not None
    out = consume_all(stack_settings, f"quix-out-{uid}", expected=300)
    assert len(out) == 300
    last: dict[bytes, int] = defaultdict(int)
    for msg in out:
        last[msg.key()] = max(last[msg.key()], orjson.loads(msg.value())["count"])
    assert last == Counter(t["card_id"].encode() for t in txns)


def test_a_run_is_split_in_thirds_by_send_time_to_show_its_history():
    from fraudstream.loadtest.live import _by_third

    start = 1_000.0
    sent = [start + i * 0.1 for i in range(300)]  # one send every 0.1 s over a 30 s run
    # the last third: batches of 80 ms, decisions 0.5 s late
    lat = [500.0 if i >= 200 else 50.0 for i in range(300)]
    batch = [80.0 if i >= 200 else 10.0 + i % 3 for i in range(300)]
    got = _by_third(sent, lat, batch, start, 30.0)
    assert got["worker_batch_p99_by_third_ms"][:2] == [12.0, 12.0]
    assert got["worker_batch_p99_by_third_ms"][2] == 80.0
    assert [round(v) for v in got["p50_by_third_ms"]] == [50, 50, 500]
    # a record sent at the very end (or a hair before the start) counts in its edge third
    edge = _by_third([start + 30.0, start - 0.001], [1000.0, 1.0], [5.0, 7.0], start, 30.0)
    assert edge["worker_batch_p99_by_third_ms"] == [7.0, None, 5.0]
