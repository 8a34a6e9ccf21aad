"""Backlog drain of ``python -m fraudstream.loadtest``: ``fraudstream worker`` decides the
pre-produced transactions; its rate is taken on the decisions topic, first decision to
last (group join excluded)."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from fraudstream.loadtest.decided_by import decider, describe, tally
from fraudstream.loadtest.harness import _progress, _spawn, read_decisions
from fraudstream.loadtest.rss import RssSampler
from fraudstream.schemas.codec import Codecs
from fraudstream.streams.processes import stop_process
from fraudstream.streams.settings import Settings


@contextmanager
def backlog_drain(settings: Settings, codecs: Codecs, workdir: Path, events: int,
                  samplers: list[RssSampler], result: dict
                  ) -> Iterator[tuple[subprocess.Popen[bytes], RssSampler]]:
    """Starts the worker, waits for its decisions of the ``events`` pre-produced
    transactions (``result["worker"]``: its rate, and who decided: the model, the rules,
    or a fallback by cause), then yields the worker and its RSS sampler
    (``--shared-broker`` runs live traffic on them) and stops the worker."""
    _progress("worker: backlog drain...")
    worker = _spawn(["-m", "fraudstream", "worker", "--loglevel", "info"], settings,
                    workdir / "worker.log")
    rss = RssSampler(worker.pid, "backlog drain")
    samplers.append(rss)
    rss.start()
    try:
        got = read_decisions(settings, codecs, lambda out: len(out) >= events, 300)
        times = [t for t, _ in got]
        rate = (len(times) - 1) / (times[-1] - times[0])
        decided = tally(decider(d) for _, d in got)
        late = [d.get("late_ms") or 0.0 for _, d in got]  # absent before late_ms existed
        result["worker"] = {"events": len(got), "seconds": times[-1] - times[0],
                            "rate": rate, "decided_by": decided,
                            "past_budget": sum(1 for x in late if x > 0),
                            "late_ms_max": max(late, default=0.0)}
        rss.marks.append((times[0], "drain"))
        quix = result.get("quix", {}).get("rate")
        vs = f" = {rate / quix:.2f}x the Quix peer" if quix else ""
        _progress(f"  {rate:,.0f}/s{vs}; {describe(decided)}")
        yield worker, rss
    finally:
        rss.stop()
        stop_process(worker)
