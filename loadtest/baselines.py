"""The two baselines of ``python -m fraudstream.loadtest``, each a subprocess timed from its first
record to its last on the pre-produced transactions: a bare Faust agent that only consumes
(loadtest/bare_faust.py) and a plain confluent-kafka loop (loadtest/baseline_kafka.py)."""

from __future__ import annotations

import json
import select
import subprocess
import time
from pathlib import Path

from fraudstream.loadtest.harness import _progress, _spawn
from fraudstream.streams.processes import stop_process
from fraudstream.streams.settings import Settings


def _json_line(proc: subprocess.Popen[bytes], timeout_s: float,
               what: str = "the bare Faust consumer") -> dict:
    """The first line of ``proc``'s stdout that holds a JSON object."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 1.0)
        if not ready:
            continue
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{what} exited without a result")
        start = line.find(b"{")
        if start >= 0:
            return json.loads(line[start:])
    raise TimeoutError(f"no result from {what}")


def run_baselines(settings: Settings, workdir: Path, uid: str, events: int,
                  result: dict) -> None:
    """Both baselines on the ``events`` transactions of ``settings.topics.transactions``:
    ``result["bare_faust"]`` and ``result["kafka_loop"]``."""
    _progress("baseline: bare Faust consumer...")
    bare = _spawn(["-m", "fraudstream.loadtest.bare_faust", "--topic", settings.topics.transactions,
                   "--count", str(events), "--app-id", f"bare-{uid}",
                   "--data-dir", str(workdir / "bare-data")],
                  settings, workdir / "bare.log")
    try:
        result["bare_faust"] = _json_line(bare, timeout_s=300)
    finally:
        stop_process(bare)
    _progress(f"  {result['bare_faust']['rate']:,.0f}/s")

    _progress("baseline: Kafka loop (consume, decode, produce)...")
    loop = _spawn(["-m", "fraudstream.loadtest.baseline_kafka", "--topic",
                   settings.topics.transactions, "--out-topic", f"baseline-out-{uid}",
                   "--count", str(events)],
                  settings, workdir / "baseline_kafka.log")
    try:
        result["kafka_loop"] = _json_line(loop, timeout_s=300, what="the Kafka loop")
    finally:
        stop_process(loop)
    _progress(f"  {result['kafka_loop']['rate']:,.0f}/s")
