"""One rollout controller, one autopilot, acts among replicas (streams/control/lease.py),
on the embedded broker, with real processes: one holds the lease; it stops or dies
(SIGKILL), a standby takes over."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from fraudstream.streams.autopilot.events import read_events
from fraudstream.streams.embedded.broker import free_ports
from fraudstream.streams.processes import die_with_parent, stop_process
from fraudstream.streams.settings import Settings
from fraudstream.streams.topics import ensure_topics
from tests.conftest import ROOT
from tests.test_canary_e2e import env_of, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.slow]  # 60 s together: make test-slow

SESSION_S = 6.0


def _metric(port: int, name: str) -> float | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
            text = r.read().decode()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(f"{name} "):
            return float(line.split()[1])
    return None


def _held(port: int) -> float | None:
    return _metric(port, "fraudstream_controller_lease_held")


def _started(command: str, settings: Settings, port: int,
             log: Path) -> subprocess.Popen[bytes]:
    """``fraudstream <command>`` (controller, autopilot) with its /metrics on ``port``."""
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, "-m", "fraudstream", command,
                                 "--metrics-port", str(port)], env=env_of(settings), cwd=ROOT,
                                stdout=out, stderr=subprocess.STDOUT, preexec_fn=die_with_parent)


def _controller(settings: Settings, port: int, log: Path) -> subprocess.Popen[bytes]:
    return _started("controller", settings, port, log)


def test_one_controller_acts_and_a_standby_takes_over_when_it_stops_or_dies(
        stack_settings, tmp_path):
    settings = stack_settings.replace(canary={"controller_lease_session_s": SESSION_S})
    ensure_topics(settings)
    ports = free_ports(3)
    logs = [tmp_path / f"controller-{k}.log" for k in range(3)]
    procs = [_controller(settings, ports[k], logs[k]) for k in range(2)]
    try:
        def states() -> list[float | None]:
            return [_held(p) if procs[k].poll() is None else None
                    for k, p in enumerate(ports[:len(procs)])]

        def tails() -> list[str]:
            return [log.read_text(errors="replace")[-1500:] for log in logs if log.exists()]

        wait_until(lambda: sorted(s or 0.0 for s in states()) == [0.0, 1.0], 45,
                   "one controller holds the lease", ())
        time.sleep(SESSION_S)  # and it stays that way: never two acting
        assert sorted(s or 0.0 for s in states()) == [0.0, 1.0], tails()
        holder = states().index(1.0)
        standby = 1 - holder

        # A clean stop hands the lease on at once (it leaves the group).
        stop_process(procs[holder], 15.0)
        started = time.monotonic()
        wait_until(lambda: _held(ports[standby]) == 1.0, 30, "the standby took over", ())
        assert time.monotonic() - started < SESSION_S + 10, tails()
        assert "lease held" in logs[standby].read_text()

        # A third joins as a standby: the holder keeps the lease (sticky assignment).
        procs.append(_controller(settings, ports[2], logs[2]))
        wait_until(lambda: "standing by" in logs[2].read_text(errors="replace")
                   and _held(ports[2]) == 0.0, 45, "the new one stands by", ())
        time.sleep(SESSION_S)  # its join has been through a rebalance
        assert (_held(ports[standby]), _held(ports[2])) == (1.0, 0.0), tails()
        # The holder dies without leaving the group: the standby takes over once the
        # holder's session has run out.
        procs[standby].send_signal(signal.SIGKILL)
        procs[standby].wait(10)
        started = time.monotonic()
        wait_until(lambda: _held(ports[2]) == 1.0, SESSION_S + 30, "the third took over",
                   ())
        assert time.monotonic() - started < SESSION_S + 15, tails()
    finally:
        for p in procs:
            stop_process(p, 15.0)


def test_one_autopilot_acts_and_a_standby_resumes_from_its_events_when_it_dies(
        stack_settings, tmp_path):
    """Two autopilots on one deployment: only the lease holder resumes (its "started"
    event) and acts; killed, the other takes over and resumes from the events."""
    settings = stack_settings.replace(autopilot={"lease_session_s": SESSION_S,
                                                 "models_dir": tmp_path / "challengers",
                                                 "poll_s": 1.0})
    ensure_topics(settings)
    ports = free_ports(2)
    logs = [tmp_path / f"autopilot-{k}.log" for k in range(2)]
    procs = [_started("autopilot", settings, ports[k], logs[k]) for k in range(2)]

    def held(k: int) -> float | None:
        return _metric(ports[k], "fraudstream_autopilot_lease_held")

    def started() -> int:
        return sum(e.kind == "started" for e in read_events(settings))

    try:
        wait_until(lambda: sorted(held(k) or 0.0 for k in range(2)) == [0.0, 1.0], 60,
                   "one autopilot holds the lease", ())
        wait_until(lambda: started() == 1, 30, "the holder resumed", ())
        time.sleep(SESSION_S)
        assert started() == 1  # the standby did not
        holder = [held(k) for k in range(2)].index(1.0)
        procs[holder].send_signal(signal.SIGKILL)
        procs[holder].wait(10)
        wait_until(lambda: held(1 - holder) == 1.0, SESSION_S + 30, "the standby took over",
                   ())
        wait_until(lambda: started() == 2, 30, "it resumed from the events", ())
    finally:
        for p in procs:
            stop_process(p, 15.0)
