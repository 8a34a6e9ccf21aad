"""/healthz and /readyz: the checks (pure), and a real worker whose batch loop is wedged."""

from __future__ import annotations

import os
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, Counter

from fraudstream.streams.embedded.broker import free_port
from fraudstream.streams.health import Probes, serve
from fraudstream.streams.worker.probes import Heartbeat, add_worker_checks
from fraudstream.streams.worker.progress import Stall
from tests.conftest import ROOT, WorkerProcess, consume_all, produce
from tests.test_e2e import encoded, generated


def _get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_the_endpoints_answer_with_every_failing_check_named():
    registry = CollectorRegistry()
    Counter("fraudstream_things", "Things.", registry=registry).inc()
    probes = Probes()
    broken = {"on": False}
    probes.live.append(("loop", lambda: "no heartbeat for 40 s" if broken["on"] else None))
    probes.ready.append(("model", lambda: "ACTIVE version v3 not loaded"))
    probes.ready.append(("state", lambda: 1 / 0))  # a check that raises fails, it is named
    port = serve(registry, 0, "127.0.0.1", probes)

    assert _get(port, "/healthz") == (200, "ok\n")
    broken["on"] = True
    assert _get(port, "/healthz") == (503, "loop: no heartbeat for 40 s\n")
    status, body = _get(port, "/readyz")
    assert status == 503
    assert body.splitlines() == ["model: ACTIVE version v3 not loaded",
                                 "state: check failed: ZeroDivisionError: division by zero"]
    status, body = _get(port, "/metrics")
    assert status == 200 and "fraudstream_things_total 1.0" in body


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _worker_parts(clock: _Clock) -> SimpleNamespace:
    completed = threading.Event()
    return SimpleNamespace(
        app=SimpleNamespace(rebalancing=False, in_recovery=False,
                            tables=SimpleNamespace(recovery=SimpleNamespace(completed=completed))),
        heartbeat=Heartbeat(clock=clock),
        watchdog=SimpleNamespace(tracker=SimpleNamespace(busy_since=None), stalled=[]),
        restoring=SimpleNamespace(running=False),
        replica=SimpleNamespace(ready=threading.Event(), applied=0),
        watcher=SimpleNamespace(stage=SimpleNamespace(active=None),
                                registry=SimpleNamespace(pinned=lambda _name: None),
                                refused={}))


def _failing(checks: list[tuple[str, Any]]) -> list[str]:
    return [line.split(":")[0] for line in Probes.run(checks)]


def test_liveness_fails_on_a_silent_loop_a_batch_in_hand_or_a_stalled_partition():
    clock = _Clock()
    w = _worker_parts(clock)
    probes = Probes()
    add_worker_checks(probes, w.app, w.heartbeat, w.watchdog, w.restoring, w.replica,
                      w.watcher, liveness_s=30.0, clock=clock)
    assert _failing(probes.live) == []
    clock.now += 29.0
    assert _failing(probes.live) == []  # within the bound
    clock.now += 2.0
    assert _failing(probes.live) == ["event_loop"]
    w.heartbeat.beat()
    w.watchdog.tracker.busy_since = clock.now - 31.0
    assert _failing(probes.live) == ["batch"]
    w.watchdog.tracker.busy_since = None
    w.watchdog.stalled = [Stall("transactions", 2, 100, 250, 61.0)]
    assert Probes.run(probes.live) == [
        "progress: transactions[2] next offset 100, end 250, nothing handled for 61 s"]


def test_readiness_waits_for_assignment_state_replica_and_the_intended_model():
    clock = _Clock()
    w = _worker_parts(clock)
    probes = Probes()
    add_worker_checks(probes, w.app, w.heartbeat, w.watchdog, w.restoring, w.replica,
                      w.watcher, liveness_s=30.0, clock=clock)
    w.restoring.running = True
    assert _failing(probes.ready) == ["assignment", "state", "replica"]
    w.app.tables.recovery.completed.set()
    w.restoring.running = False
    w.replica.ready.set()
    assert _failing(probes.ready) == []  # no model set: the rules decide by choice
    w.watcher.registry.pinned = lambda _name: ("v3", None)
    w.watcher.refused = {"ACTIVE": "v3"}
    assert Probes.run(probes.ready) == ["model: ACTIVE version v3 not loaded"]
    w.watcher.stage.active = SimpleNamespace(version="v2")  # the previous one serves
    assert _failing(probes.ready) == []
    w.app.rebalancing = True
    assert _failing(probes.ready) == ["assignment"]


# ----------------------------------------------------------------- a real, wedged worker

#: Runs the worker with its batch step patched to wedge once ``WEDGE_FILE`` exists: "await"
#: waits forever inside the batch (the event loop runs on), "block" blocks the event loop.
WEDGED_WORKER = """
import asyncio, os, sys, time
from fraudstream.streams.worker import delivery
wedge, how = os.environ["WEDGE_FILE"], os.environ["WEDGE_HOW"]
commit = delivery.BatchCommitter.commit
async def wedged(self, result):
    if os.path.exists(wedge):
        if how == "block":
            time.sleep(3600)
        await asyncio.Event().wait()
    return await commit(self, result)
delivery.BatchCommitter.commit = wedged
from fraudstream.streams.cli.main import main
sys.exit(main(["worker", "--loglevel", "info"]))
"""


class _WedgedWorker(WorkerProcess):
    def __init__(self, settings: Any, log: Path, script: Path, env: dict[str, str]) -> None:
        super().__init__(settings, log)
        self.script, self.extra = script, env

    def start(self) -> _WedgedWorker:
        import subprocess

        from fraudstream.streams.processes import die_with_parent

        env = {k: v for k, v in os.environ.items() if not k.startswith("FRAUDSTREAM_")}
        env.update(self.settings.to_env())
        env.update(self.extra)
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen([sys.executable, str(self.script)], env=env,
                                         stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
                                         start_new_session=True, preexec_fn=die_with_parent)
        return self


def _until(port: int, path: str, status: int, timeout_s: float) -> tuple[float, str]:
    t0 = time.monotonic()
    got: tuple[int, str] = (0, "")
    while time.monotonic() - t0 < timeout_s:
        try:
            got = _get(port, path)
        except OSError as exc:  # not listening yet; or no answer while blocked
            got = (0, str(exc))
        if got[0] == status:
            return time.monotonic() - t0, got[1]
        time.sleep(0.25)
    raise AssertionError(f"{path} never answered {status} in {timeout_s} s: last {got}")


@pytest.mark.parametrize("how", ["await", "block"])
def test_healthz_fails_when_the_batch_loop_is_wedged(stack_settings, codecs, tmp_path, how):
    port = free_port()
    settings = stack_settings.replace(worker={"metrics_port": port, "metrics_address":
                                              "127.0.0.1", "liveness_s": 3.0})
    script = tmp_path / "wedged_worker.py"
    script.write_text(WEDGED_WORKER)
    wedge = tmp_path / "wedge"
    worker = _WedgedWorker(settings, tmp_path / "worker.log", script,
                           {"WEDGE_FILE": str(wedge), "WEDGE_HOW": how}).start()
    try:
        _until(port, "/readyz", 200, 90)
        assert _get(port, "/healthz") == (200, "ok\n")
        txns = generated(4)
        topic = settings.topics.transactions
        produce(settings, topic, encoded(codecs, txns[:2]))
        assert len(consume_all(settings, settings.topics.decisions, 2, 30)) == 2
        time.sleep(4.0)  # idle longer than the liveness bound: an idle worker is live
        assert _get(port, "/healthz") == (200, "ok\n")

        wedge.touch()
        produce(settings, topic, encoded(codecs, txns[2:]))
        took, body = _until(port, "/healthz", 503, 30)
        expected = "batch: one batch in hand" if how == "await" else "event_loop: no heartbeat"
        assert expected in body, body
        assert took < 3.0 + 10.0, took
    finally:
        worker.kill()
