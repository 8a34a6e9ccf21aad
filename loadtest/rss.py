"""The RSS of each worker of ``python -m fraudstream.loadtest``, sampled from /proc while it
runs."""

from __future__ import annotations

import threading
import time

from fraudstream.loadtest.proc import tree_rss_kb

RSS_EVERY_S = 0.5


class RssSampler(threading.Thread):
    """Samples a process tree's RSS every ``RSS_EVERY_S`` until stopped. ``label`` names
    the worker (the run it served); ``marks`` are (wall clock, label) of events in its life."""

    def __init__(self, pid: int, label: str) -> None:
        super().__init__(name="rss-sampler", daemon=True)
        self.pid, self.label = pid, label
        self.started_at = time.time()
        self.samples: list[tuple[float, int]] = []  # (wall clock, kB)
        self.marks: list[tuple[float, str]] = []
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            kb = tree_rss_kb(self.pid)
            if kb:
                self.samples.append((time.time(), kb))
            self.done.wait(RSS_EVERY_S)

    def stop(self) -> None:
        self.done.set()
        if self.is_alive():
            self.join(5)

    def report(self) -> dict:
        """Peak and end, the series (seconds since the worker started, MB) and the marks."""
        mb = [kb / 1024 for _t, kb in self.samples]
        return {"worker": self.label, "peak_mb": max(mb, default=None),
                "end_mb": mb[-1] if mb else None, "samples": len(mb),
                "series_mb": [[round(t - self.started_at, 1), round(kb / 1024, 1)]
                              for t, kb in self.samples],
                "marks": [[round(t - self.started_at, 1), m] for t, m in self.marks]}


def rss_report(samplers: list[RssSampler]) -> dict:
    """Every worker's RSS, and the highest peak over them: which worker, its end."""
    workers = [s.report() for s in samplers]
    peak = max((w for w in workers if w["peak_mb"] is not None),
               key=lambda w: w["peak_mb"], default=None)
    return {"peak_mb": peak and peak["peak_mb"], "end_mb": peak and peak["end_mb"],
            "peak_worker": peak and peak["worker"], "every_s": RSS_EVERY_S,
            "workers": workers}

