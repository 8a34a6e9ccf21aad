"""Child processes and signals, the same way everywhere: the demo, the embedded broker,
the benchmark and the tests start children that must never outlive them."""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import threading
from collections.abc import Callable
from typing import Any

PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """``preexec_fn`` for a child: Linux sends it SIGTERM when its parent dies, so a
    killed demo, test run or benchmark never leaves an orphan behind."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:  # not Linux/glibc: the parent's own stop() still applies
        pass


def stop_process(proc: subprocess.Popen[bytes] | None, timeout_s: float = 20.0) -> None:
    """SIGTERM, wait up to ``timeout_s``, then SIGKILL its whole process group."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


class StopFlag:
    """Set by SIGINT or SIGTERM: long loops check it and stop cleanly."""

    def __init__(self) -> None:
        self.set = False
        signal.signal(signal.SIGINT, self._on_signal)
        signal.signal(signal.SIGTERM, self._on_signal)

    def _on_signal(self, _signum: int, _frame: object) -> None:
        self.set = True


def serve_until_signalled(registry: Any, port: int,
                          run: Callable[[threading.Event], None]) -> int:
    """A long-lived process (the rollout controller, the autopilot): its /metrics served
    from ``registry`` on ``port``, then ``run(stop)`` until SIGINT or SIGTERM sets
    ``stop``; warnings logged with their time."""
    import logging

    from fraudstream.streams.health import serve

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    serve(registry, port)  # /metrics, and /healthz and /readyz: 200 while it serves
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    run(stop)
    return 0
