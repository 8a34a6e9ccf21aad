"""Work in a child process that a stop ends at once: what the autopilot trains with, so a
SIGTERM during a training of minutes stops it within a second."""

from __future__ import annotations

import os
import threading
import time

import pytest

from fraudstream.scorers.train import TrainingError
from fraudstream.streams.processes import Stopped, run_stoppable


def add(a: int, b: int) -> dict:
    return {"sum": a + b, "pid": os.getpid()}


def refuse(why: str) -> None:
    raise TrainingError(why)


def sleep(seconds: float) -> None:
    time.sleep(seconds)


def leave() -> None:
    os._exit(3)


def test_the_result_comes_back_from_another_process():
    out = run_stoppable(add, (2, 3), threading.Event())
    assert out["sum"] == 5 and out["pid"] != os.getpid()


def test_the_works_error_is_raised_again_with_its_traceback():
    with pytest.raises(TrainingError, match="only 3 fraud labels") as info:
        run_stoppable(refuse, ("only 3 fraud labels",), threading.Event())
    assert any("in refuse" in note for note in info.value.__notes__)


def test_a_stop_ends_the_work_at_once():
    stop = threading.Event()
    threading.Timer(0.5, stop.set).start()
    t0 = time.monotonic()
    with pytest.raises(Stopped):
        run_stoppable(sleep, (60.0,), stop)
    assert time.monotonic() - t0 < 5.0  # not the 60 s of the work


def test_a_process_that_dies_without_a_result_is_an_error_not_a_hang():
    with pytest.raises(RuntimeError, match="exit code 3"):
        run_stoppable(leave, (), threading.Event())
