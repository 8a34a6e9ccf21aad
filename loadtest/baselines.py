"""The baselines of ``python -m fraudstream.loadtest``, each a subprocess timed from its first
record to its last on the pre-produced transactions: a bare Faust agent that only consumes
(loadtest/bare_faust.py), a plain confluent-kafka loop (loadtest/baseline_kafka.py), and the
Quix Streams stateful peer (loadtest/quix_peer.py) when quixstreams is installed."""

from __future__ import annotations

import json
import select
import subprocess
import sys
import time
from pathlib import Path

from confluent_kafka.admin import AlterConfigOpType, ConfigEntry, ConfigResource

from fraudstream.loadtest.harness import ROOT, _progress, _spawn
from fraudstream.streams.processes import stop_process
from fraudstream.streams.settings import Settings
from fraudstream.streams.topics import connect, ensure_topics

#: where ``make bench-deps`` puts quixstreams: its own environment, because quixstreams
#: 3.28 requires confluent-kafka < 2.13 and the project pins a later one
QUIX_VENV = ROOT / ".venv-quix"
QUIX_INSTALL = ("make bench-deps (or: python3 -m venv .venv-quix && "
                ".venv-quix/bin/pip install --group bench, in the repository)")
QUIX_PEER = Path(__file__).with_name("quix_peer.py")


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


def find_quix_python(given: Path | None) -> tuple[str | None, str]:
    """(interpreter, its quixstreams version) of the first of ``given``, the
    ``.venv-quix`` environment and this interpreter that imports quixstreams; else
    (None, what was tried)."""
    candidates = [str(given)] if given else [str(QUIX_VENV / "bin" / "python"), sys.executable]
    for python in candidates:
        if not Path(python).exists():
            continue
        try:
            found = subprocess.run(
                [python, "-I", "-W", "ignore", "-c",
                 "import quixstreams; print(quixstreams.__version__)"],
                capture_output=True, text=True, timeout=120)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if found.returncode == 0:
            return python, found.stdout.strip().splitlines()[-1]
    return None, "quixstreams is not importable by " + " or ".join(candidates)


def ensure_retention(settings: Settings, topic: str) -> str | None:
    """Quix Streams sizes the changelog of a stateful step from its input topic's
    ``retention.ms``, read with DescribeConfigs, and fails without it. Apache Kafka
    always reports it; the embedded broker (Tansu) reports only what was set on the
    topic. Sets ``retention.ms=-1`` (keep everything: what Tansu does anyway) when the
    broker reports none, and returns the value now reported."""
    admin = connect(settings.kafka)
    resource = ConfigResource("topic", topic)

    def reported() -> str | None:
        [future] = admin.describe_configs([resource]).values()
        entry = future.result(timeout=30).get("retention.ms")
        return None if entry is None else entry.value

    if (value := reported()) is not None:
        return value
    [future] = admin.incremental_alter_configs([ConfigResource("topic", topic, incremental_configs=[
        ConfigEntry("retention.ms", "-1",
                    incremental_operation=AlterConfigOpType.SET)])]).values()
    future.result(timeout=30)
    return reported()


def run_quix(settings: Settings, workdir: Path, uid: str, events: int, result: dict,
             python: Path | None, enabled: bool = True) -> None:
    """The Quix Streams stateful peer on the same transactions: ``result["quix"]``, or
    ``result["quix"] = {"skipped": why}`` (not installed, turned off, or failed: the
    rest of the benchmark runs on, with no number for it)."""
    if not enabled:
        result["quix"] = {"skipped": "turned off (--no-quix)"}
        return
    interpreter, version = find_quix_python(python)
    if interpreter is None:
        result["quix"] = {"skipped": f"{version}; install it with {QUIX_INSTALL}"}
        _progress(f"peer: Quix Streams skipped: {result['quix']['skipped']}")
        return
    _progress(f"peer: Quix Streams {version} (Avro decode, per-card RocksDB state with "
              "changelog, one output per input)...")
    topic, out_topic = settings.topics.transactions, f"quix-out-{uid}"
    log = workdir / "quix.log"
    try:
        retention = ensure_retention(settings, topic)
        ensure_topics(settings, names=[out_topic])
        peer = _spawn(["-I", str(QUIX_PEER), "--bootstrap", settings.kafka.bootstrap,
                       "--registry-url", settings.codec.registry_url, "--topic", topic,
                       "--out-topic", out_topic, "--count", str(events),
                       "--group", f"quix-{uid}", "--state-dir", str(workdir / "quix-state")],
                      settings, log, python=interpreter)
        try:
            result["quix"] = _json_line(peer, timeout_s=300, what="the Quix Streams peer")
        finally:
            stop_process(peer)
    except Exception as exc:  # a failed peer leaves its baseline out, not the benchmark
        result["quix"] = {"skipped": f"failed: {type(exc).__name__}: {exc} (log: {log})"}
        _progress(f"  Quix Streams peer {result['quix']['skipped']}")
        return
    result["quix"].update(python=interpreter, input_retention_ms=retention)
    _progress(f"  {result['quix']['rate']:,.0f}/s")
