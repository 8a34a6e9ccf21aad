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

from streams.broker import free_port

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parent.parent


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "streams.cli", *args]


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
    out = subprocess.run(cli("demo", "--duration", "12", "--rate", "300", "--bad-ratio", "0.05"),
                         cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    pids = [int(p) for p in re.findall(r"pid (\d+)", out.stdout)]
    assert len(pids) == 3, out.stdout  # broker, worker, producer
    lines = [line for line in out.stdout.splitlines() if "ev/s" in line]
    assert lines, out.stdout
    last = lines[-1]
    decided = int(re.search(r"decisions\s+(\d+)", last).group(1))
    dead = int(re.search(r"dlq\s+(\d+)", last).group(1))
    assert decided > 1500 and dead > 50, last
    assert re.search(r"p99\s+[\d.]+ ms", "\n".join(lines)), "no latency figure printed"
    total = re.search(r"total: (\d+) records out, (\d+) decisions .*, (\d+) dead letters",
                      out.stdout)
    assert total and int(total.group(1)) == int(total.group(2)) + int(total.group(3))
    sent = re.search(r"producer: sent (\d+) transactions \((\d+) malformed\)", out.stdout)
    assert sent, out.stdout
    assert int(total.group(1)) == int(sent.group(1)), "every transaction sent came out"
    assert int(total.group(3)) == int(sent.group(2)), "every malformed one is a dead letter"
    assert "stopped broker, registry, worker and producer" in out.stdout
    assert not [pid for pid in pids if alive(pid)], "the demo left processes running"


def test_a_killed_demo_takes_its_processes_with_it():
    """Even SIGKILL, which the demo cannot catch, leaves no broker, worker or producer."""
    proc = subprocess.Popen(cli("demo", "--rate", "200"), cwd=ROOT, stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    pids = [int(p) for p in re.findall(r"pid (\d+)", line)]
    assert len(pids) == 3, line
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and any(alive(pid) for pid in pids):
        time.sleep(0.2)
    assert not [pid for pid in pids if alive(pid)]
