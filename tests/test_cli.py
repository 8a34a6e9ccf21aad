"""The commands a user runs first: the embedded broker and the demo, as processes."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from confluent_kafka.admin import AdminClient

from fraudstream.streams.embedded.broker import free_port

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parent.parent


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "fraudstream", *args]


def processes_matching(pattern: str) -> list[int]:
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if re.search(pattern, cmdline):
            found.append(int(pid))
    return found


def alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "State:\tZ" not in status


def test_broker_command_serves_kafka_and_stops_cleanly_on_sigterm():
    port = free_port()
    proc = subprocess.Popen(cli("broker", "--port", str(port)), cwd=ROOT,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert "ready on" in proc.stdout.readline()
        meta = AdminClient({"bootstrap.servers": f"127.0.0.1:{port}"}).list_topics(timeout=10)
        assert meta.brokers
        tansu = processes_matching(rf"tansu.*--listener-url tcp://127\.0\.0\.1:{port}\b")
        assert tansu
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
        assert not [pid for pid in tansu if alive(pid)], "the broker process outlived its command"
    finally:
        if proc.poll() is None:
            proc.kill()


def test_bounded_demo_decides_reports_and_leaves_no_process_behind():
    out = subprocess.run(cli("demo", "--rules-only", "--warmup-days", "0", "--duration", "12",
                             "--rate", "300", "--bad-ratio", "0.05", "--cards", "3000",
                             "--speed", "60"),
                         cwd=ROOT, capture_output=True, text=True, timeout=180,
                         env={**os.environ, "FRAUDSTREAM_WORKER_STATUS_INTERVAL_S": "2"})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    pids = [int(p) for p in re.findall(r"pid (\d+)", out.stdout)]
    assert len(pids) == 3, out.stdout  # broker, worker, producer
    lines = [line for line in out.stdout.splitlines() if " decided: " in line]
    assert lines, out.stdout
    last = lines[-1]
    decided = int(re.search(r"(\d+) decided:", last).group(1))
    dead = int(re.search(r"dlq\s+(\d+)", last).group(1))
    assert decided > 1500 and dead > 50, last
    assert re.search(r"by model 0.0% rules 100.0% fallback 0.0%", last), last
    assert re.search(r"e2e p50\s+\d+ p99\s+\d+ ms", "\n".join(lines)), "no latency printed"
    assert re.search(r"worker p50\s+[\d.]+ p99\s+[\d.]+ ms", "\n".join(lines)), \
        "no worker time printed"
    total = re.search(r"total: (\d+) records out, (\d+) decisions, (\d+) dead letters",
                      out.stdout)
    assert total and int(total.group(1)) == int(total.group(2)) + int(total.group(3))
    sent = re.search(r"producer: sent (\d+) transactions \((\d+) malformed", out.stdout)
    assert sent, out.stdout
    assert int(total.group(1)) == int(sent.group(1)), "every transaction sent came out"
    assert int(total.group(3)) == int(sent.group(2)), "every malformed one is a dead letter"
    assert "worker's last status line:" in out.stdout, "the worker logged no status line"
    assert "stopped broker, registry, worker and producer" in out.stdout
    assert not [pid for pid in pids if alive(pid)], "the demo left processes running"


@pytest.mark.slow  # 25-35 s: make test-slow (CI runs both)
def test_demo_trains_a_model_once_then_decides_with_it(tmp_path):
    """A small world: the first demo trains and caches a model, warms the worker's state
    with history, and the model (not the rules) decides the live traffic."""
    world = ["--cards", "3000", "--rate", "100", "--speed", "600", "--history-days", "3",
             "--label-delay-days", "0.1", "--models-cache", str(tmp_path)]
    out = subprocess.run(cli("demo", *world, "--warmup-days", "0.3", "--duration", "15"),
                         cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "training a model" in out.stderr and "trained and promoted" in out.stdout
    warm = re.search(r"warm-up done: (\d+) transactions decided", out.stdout)
    assert warm and int(warm.group(1)) > 500, out.stdout[-3000:]
    by = re.search(r"decided by model (\d+) \(([\d.]+)%\)", out.stdout)
    assert by and int(by.group(1)) > 800 and float(by.group(2)) > 90.0, out.stdout[-2000:]
    assert "labels read" in out.stdout

    from fraudstream.schemas.fx import Rates
    from fraudstream.scorers.rules import DEFAULT_RULES_PATH
    from fraudstream.streams.demo.model import DemoWorld, ensure_model

    cached = ensure_model(DemoWorld(cards=3000, rate=100, speed=600, history_days=3,
                                    label_delay_days=0.1), tmp_path, DEFAULT_RULES_PATH,
                          Rates.load(), quiet=True)
    assert cached[2] is False, "the second demo must reuse the cached model"


def test_a_killed_demo_takes_its_processes_with_it():
    """Even SIGKILL, which the demo cannot catch, leaves no broker, worker or producer."""
    proc = subprocess.Popen(cli("demo", "--rate", "200", "--rules-only"), cwd=ROOT,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = ""
    while "pid" not in line:
        line = proc.stdout.readline()
        assert line, "the demo ended before starting its processes"
    pids = [int(p) for p in re.findall(r"pid (\d+)", line)]
    assert len(pids) == 3, line
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and any(alive(pid) for pid in pids):
        time.sleep(0.2)
    assert not [pid for pid in pids if alive(pid)]
