"""The worker's status line and the demo's reading of the worker's own-time histogram."""

from __future__ import annotations

from collections import Counter

import pytest

from fraudstream.streams.demo.summary import histogram_quantile
from fraudstream.streams.pipeline import BatchResult
from fraudstream.streams.worker.status import WorkerStatus


def result(stages: dict[tuple[str, str], int], fallbacks: dict[str, int] | None = None,
           dead: int = 0) -> BatchResult:
    out = BatchResult()
    out.stage_outcomes = Counter(stages)
    out.fallbacks = Counter(fallbacks or {})
    out.dead_letters = [(None, b"x")] * dead
    return out


def test_status_line_gives_rates_shares_fallbacks_and_the_workers_own_time():
    status = WorkerStatus()
    status.since = 100.0
    status.add(100, 5, result({("ensemble", "approve"): 95, ("online", "review"): 2,
                               ("rules", "approve"): 3}, {"degraded": 3}, dead=1), 8.0)
    status.add(100, 5, result({("ensemble", "approve"): 100}), 30.0)
    status.set_lag("transactions", 0, 7)
    status.set_lag("transactions", 1, 5)
    line = status.line(now=110.0)
    assert "status: 20 tx/s, 1.0 labels/s, lag 12" in line
    # 197 of 200 decided by the model; the 3 rules decisions were all fallbacks.
    assert "model 98.5% rules 0.0% fallback 1.5% {'degraded': 3}" in line
    assert "dlq 1" in line
    assert "worker p50 30.0 ms p99 30.0 ms (fetch to acknowledged)" in line


def test_fallbacks_of_every_stage_and_of_the_shadow_are_counted_once():
    status = WorkerStatus()
    status.since = 0.0
    # 10 decided: 6 by the model, 2 by the rules on degraded features, 1 by the rules when the
    # model timed out (stage "model"), 1 by the rules alone; the shadow's own fallbacks
    # are not decisions of the stream.
    status.add(10, 0, result({("ensemble", "approve"): 7, ("rules", "approve"): 3},
                             {"degraded": 2, "timeout": 1, "shadow_skipped": 5}),
               5.0)
    line = status.line(now=1.0)
    assert "model 60.0% rules 10.0% fallback 30.0% {'degraded': 2, 'timeout': 1}" in line


def test_decisions_past_the_budget_are_counted_apart_from_fallbacks():
    status = WorkerStatus()
    status.since = 0.0
    late = result({("ensemble", "approve"): 40})
    late.past_budget, late.past_budget_max_ms = 40, 12.5
    status.add(40, 0, late, 70.0)
    status.add(10, 0, result({("ensemble", "approve"): 10}), 5.0)
    line = status.line(now=1.0)
    assert "model 100.0% rules 0.0% fallback 0.0%" in line
    assert "40 decided past the budget (by up to 12 ms)" in line


def test_an_idle_worker_still_says_so():
    status = WorkerStatus()
    status.since = 0.0
    line = status.line(now=10.0)
    assert line.startswith("status: 0 tx/s, 0.0 labels/s, lag 0 | model - rules - fallback -")
    assert "worker -" in line


def test_histogram_quantile_interpolates_within_the_bucket():
    buckets = [(0.01, 50.0), (0.02, 90.0), (0.05, 100.0), (float("inf"), 100.0)]
    assert histogram_quantile(buckets, 0.5) == pytest.approx(0.01)
    assert histogram_quantile(buckets, 0.7) == pytest.approx(0.015)
    assert histogram_quantile(buckets, 0.99) == pytest.approx(0.047)
    assert histogram_quantile([], 0.5) != histogram_quantile([], 0.5)  # NaN: no data
