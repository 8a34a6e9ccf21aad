"""``fraudstream tail`` as an export tool: run as a user runs it (``python -m fraudstream
tail ...``) on the embedded broker, over decisions produced with fixed Kafka timestamps
(never the wall clock), one a minute from 2026-01-05T00:00:00Z on three partitions."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import orjson
import pytest
from confluent_kafka import Producer

from fraudstream.schemas.codec import Codecs, schema_text
from fraudstream.streams.cli.tail import (
    DEFAULT_IDLE_S,
    FOLLOW_COUNT,
    Plan,
    TailError,
    csv_cell,
    parse_time,
    plain,
)
from fraudstream.streams.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
BASE = datetime(2026, 1, 5, tzinfo=UTC)
BASE_MS = 1_767_571_200_000  # 2026-01-05T00:00:00Z
MINUTE = 60_000
N = 60  # decisions: number i has Kafka timestamp BASE + i minutes, partition i % 3
PAN = "4111111111111111"  # a test card number, in decision 12's card_id
BAD_AT = BASE_MS + 30 * MINUTE + 30_000  # an undecodable record on partition 1, in range
FIELDS = [f["name"] for f in json.loads(schema_text("decision"))["fields"]]


def _decision(i: int) -> dict:
    return {
        "transaction_id": f"t-{i:03d}",
        "card_id": PAN if i == 12 else f"card-{i % 7}",
        "decision": ("approve", "review", "decline")[i % 3],
        "score": i / 100,
        "reasons": ["velocity_1h", f"rule-{i}"],
        "model_version": "rules@1",
        "stage": "rules",
        "fallback": i % 5 == 0,
        "timings_ms": {"rules": 0.25, "total": 1.5},
        "event_time": datetime.fromtimestamp((BASE_MS + i * MINUTE - 1000) / 1000, UTC),
        "source_timestamp": datetime.fromtimestamp((BASE_MS + i * MINUTE - 500) / 1000, UTC),
        "decided_at": datetime.fromtimestamp((BASE_MS + i * MINUTE) / 1000, UTC),
    }


@pytest.fixture
def decisions(stack_settings: Settings, codecs: Codecs) -> str:
    """The decisions topic with the N decisions and one undecodable record."""
    topic = stack_settings.topics.decisions
    producer = Producer(stack_settings.kafka.client_config())
    for i in range(N):
        ts = BASE_MS + i * MINUTE
        if ts > BAD_AT and ts - MINUTE <= BAD_AT:
            producer.produce(topic, key=b"bad", value=b"not avro", partition=1, timestamp=BAD_AT)
        producer.produce(topic, key=f"t-{i:03d}".encode(), value=codecs.decision.encode(
            _decision(i)), partition=i % 3, timestamp=ts)
    assert producer.flush(30) == 0
    return topic


def _env(settings: Settings) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FRAUDSTREAM_")}
    env.update(settings.to_env())
    return env


def tail(settings: Settings, *args: str, timeout: float = 60.0
         ) -> tuple[subprocess.CompletedProcess[str], float]:
    env = _env(settings)
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "fraudstream", "tail", *args], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=timeout)
    return out, time.monotonic() - t0


def summary(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith("fraudstream tail ")]
    assert len(lines) == 1, stderr
    return lines[0]


@pytest.mark.e2e
def test_csv_export_of_a_time_range_ends_at_to(stack_settings, decisions, tmp_path):
    out_file = tmp_path / "decisions.csv"
    out, seconds = tail(stack_settings, decisions, "--format", "csv", "--out", str(out_file),
                        "--from", "2026-01-05T00:10:00Z", "--to", "2026-01-05T01:40:00+01:00",
                        "--until-idle", "30")
    assert out.returncode == 0, out.stderr
    # every partition has a record past --to: the export ends there, not after the idle wait
    assert seconds < 30, out.stderr
    line = summary(out.stderr)
    assert "30 records written to" in line and "ended: every partition reached --to" in line
    assert re.search(r"partition 0: 10, 1: 10, 2: 10\)", line), line
    assert "1 undecodable" in line
    bad = [x for x in out.stderr.splitlines() if x.startswith("undecodable record")]
    assert len(bad) == 1 and "partition 1 offset" in bad[0], out.stderr

    text = out_file.read_text()
    assert PAN not in text
    assert out.stdout == ""
    rows = list(csv.reader(io.StringIO(text)))
    assert rows[0] == FIELDS
    records = [dict(zip(FIELDS, row, strict=True)) for row in rows[1:]]
    ids = [r["transaction_id"] for r in records]
    assert sorted(ids) == [f"t-{i:03d}" for i in range(10, 40)]  # each once, in range only
    for r in records:
        i = int(r["transaction_id"][2:])
        want = _decision(i)
        assert json.loads(r["reasons"]) == want["reasons"]
        assert json.loads(r["timings_ms"]) == want["timings_ms"]
        assert datetime.fromisoformat(r["decided_at"]) == want["decided_at"]
        assert r["decided_at"].endswith("+00:00")
        assert float(r["score"]) == want["score"]
        assert r["fallback"] == ("true" if want["fallback"] else "false")
        if i == 12:
            assert r["card_id"] == "************1111"
        else:
            assert r["card_id"] == want["card_id"]


@pytest.mark.e2e
def test_jsonl_export_from_a_time_ends_after_the_default_idle_wait(stack_settings, decisions):
    out, seconds = tail(stack_settings, decisions, "--from", f"@{BASE_MS + 50 * MINUTE}")
    assert out.returncode == 0, out.stderr
    assert DEFAULT_IDLE_S <= seconds < DEFAULT_IDLE_S + 30, seconds
    line = summary(out.stderr)
    assert f"ended: no record for {DEFAULT_IDLE_S:g} s" in line
    records = [orjson.loads(x) for x in out.stdout.splitlines()]
    assert sorted(r["transaction_id"] for r in records) == [f"t-{i:03d}" for i in range(50, N)]
    assert "10 records written to stdout" in line and "0 undecodable" in line
    r = next(r for r in records if r["transaction_id"] == "t-051")
    assert r["timings_ms"] == {"rules": 0.25, "total": 1.5}
    assert r["decided_at"] == "2026-01-05T00:51:00+00:00"


@pytest.mark.e2e
def test_jsonl_export_of_the_whole_topic_keeps_undecodable_records(stack_settings, decisions):
    out, seconds = tail(stack_settings, decisions, "--from-beginning", "--until-idle", "1.5")
    assert out.returncode == 0, out.stderr
    assert seconds < 30
    lines = [orjson.loads(x) for x in out.stdout.splitlines()]
    bad = [x for x in lines if "undecodable" in x]
    assert len(bad) == 1 and bad[0]["partition"] == 1 and isinstance(bad[0]["offset"], int)
    assert "Avro" in bad[0]["undecodable"]
    ids = sorted(x["transaction_id"] for x in lines if "undecodable" not in x)
    assert ids == [f"t-{i:03d}" for i in range(N)]
    assert PAN not in out.stdout
    line = summary(out.stderr)
    assert f"{N} records written" in line and "1 undecodable" in line
    assert "ended: no record for 1.5 s" in line


@pytest.mark.e2e
def test_follow_mode_stops_after_count(stack_settings, decisions):
    out, _ = tail(stack_settings, decisions, "--from-beginning", "--count", "4")
    assert out.returncode == 0, out.stderr
    assert len(out.stdout.splitlines()) == 4
    assert "ended: --count 4 reached" in summary(out.stderr)


@pytest.mark.e2e
def test_sigterm_stops_an_export_with_its_records_written_and_a_summary(
        stack_settings, decisions, tmp_path):
    out_file = tmp_path / "all.jsonl"
    proc = subprocess.Popen(
        [sys.executable, "-m", "fraudstream", "tail", decisions, "--from-beginning",
         "--until-idle", "120", "--out", str(out_file)],
        cwd=ROOT, env=_env(stack_settings), stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        # the output is flushed after each poll: wait for the whole topic to be there
        while time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)
            if out_file.exists() and out_file.read_text().count("\n") == N + 1:
                break
        assert proc.poll() is None, "it should wait 120 s for more records"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "ended: SIGTERM" in summary(err)
    lines = out_file.read_text().splitlines()
    assert len(lines) == N + 1 and f"{N} records written" in summary(err)


def test_times_are_iso_8601_with_a_zone_or_epoch_millis():
    assert parse_time("2026-01-05T00:00:00Z") == BASE_MS
    assert parse_time("2026-01-05T01:00:00+01:00") == BASE_MS
    assert parse_time(f"@{BASE_MS}") == BASE_MS
    for bad in ("2026-01-05T00:00:00", "yesterday", str(BASE_MS)):
        with pytest.raises(TailError):
            parse_time(bad)


def _plan(**kw) -> Plan:
    import argparse

    args = {"start": None, "end": None, "until_idle": None, "count": None,
            "from_beginning": False, **kw}
    return Plan.from_args(argparse.Namespace(**args))


def test_follow_mode_stays_as_it_was_and_a_range_exports_until_idle():
    follow = _plan(from_beginning=True)
    assert (follow.export, follow.count, follow.idle_s) == (False, FOLLOW_COUNT, None)
    ranged = _plan(start="2026-01-05T00:00:00Z")
    assert (ranged.export, ranged.count, ranged.idle_s) == (True, 0, DEFAULT_IDLE_S)
    assert _plan(from_beginning=True, until_idle=2.0).idle_s == 2.0
    for bad in ({"start": "@10", "from_beginning": True}, {"start": "@10", "end": "@10"},
                {"until_idle": 0.0}):
        with pytest.raises(TailError):
            _plan(**bad)


def test_csv_cells_and_masking():
    rec = plain({"t": BASE, "b": b"card 4111 1111 1111 1111", "m": {"a": 1.5}, "n": None,
                 "ok": True, "s": PAN})
    assert rec["t"] == "2026-01-05T00:00:00+00:00"
    assert rec["b"] == "card **** **** **** 1111" and rec["s"] == "************1111"
    assert [csv_cell(rec[k]) for k in ("m", "n", "ok")] == ['{"a":1.5}', "", "true"]
