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


class Stopped(RuntimeError):
    """Work run by :func:`run_stoppable` was stopped before it ended."""


def run_stoppable(fn: Callable[..., Any], args: tuple[Any, ...], stop: threading.Event,
                  poll_s: float = 0.2) -> Any:
    """``fn(*args)`` in a child process of its own (spawned: no thread of this one is
    copied): its result, or its exception raised again here (the child's traceback among
    its notes). Once ``stop`` is set the child is terminated and :class:`Stopped` raised,
    so a long computation (a training) never holds up a SIGTERM. ``fn``, ``args`` and the
    result must pickle; the memory the work took goes with the child. What this process
    unpickles comes from that child, its own work's result: never a record's bytes from a
    topic."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    receive, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_stoppable_child, args=(send, fn, args), daemon=True,
                       name=f"fraudstream-{getattr(fn, '__name__', 'work')}")
    proc.start()
    send.close()
    what = getattr(fn, "__name__", "the work")
    try:
        while not stop.is_set():
            if receive.poll(poll_s):
                try:
                    ok, value = receive.recv()
                except EOFError:  # the child closed its end without a result
                    break
                if ok:
                    return value
                raise value
            if not proc.is_alive() and not receive.poll(0):
                break
        else:
            raise Stopped(f"{what} was stopped before it ended")
        proc.join()
        raise RuntimeError(f"{what}: its process ended without a result (exit code "
                           f"{proc.exitcode})")
    finally:
        if proc.is_alive():
            proc.terminate()
            proc.join(5.0)
            if proc.is_alive():
                proc.kill()
                proc.join()
        receive.close()


def _stoppable_child(send: Any, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
    import pickle
    import traceback

    die_with_parent()
    try:
        result: tuple[bool, Any] = (True, fn(*args))
    except Exception as exc:  # (a KeyboardInterrupt ends the child: the parent's stop)
        exc.add_note(traceback.format_exc())
        result = (False, exc)
    try:
        send.send(result)
    except (pickle.PicklingError, TypeError, AttributeError) as exc:
        send.send((False, RuntimeError(f"the result could not be sent back: {exc}")))
    finally:
        send.close()
