"""Where the live runs of ``python -m fraudstream.loadtest`` go: each on a fresh broker and worker
(the default), or all on the backlog drain's (``--shared-broker``); and their timeline."""

from __future__ import annotations

import random
import subprocess
import time
from pathlib import Path

from fraudstream.loadtest.harness import _progress, _spawn, pre_produce, read_decisions
from fraudstream.loadtest.live import LiveTraffic
from fraudstream.loadtest.rss import RssSampler
from fraudstream.schemas.codec import Codecs
from fraudstream.streams.embedded.broker import EmbeddedBroker, free_port
from fraudstream.streams.processes import stop_process
from fraudstream.streams.settings import Settings
from fraudstream.streams.topics import ensure_topics
from fraudstream.streams.traffic.generator import TrafficGenerator

WARMUP = 50  # transactions a fresh worker must decide before its run starts


def warm_up(settings: Settings, codecs: Codecs, worker: subprocess.Popen[bytes], seed: int,
            timeout_s: float) -> dict:
    """Sends ``WARMUP`` transactions and waits for their decisions: then the worker has
    joined its group and decided a batch on every partition. Measured by nothing else."""
    start = time.monotonic()
    pre_produce(settings, codecs, WARMUP, seed)
    got = read_decisions(settings, codecs,
                         lambda out: len(out) >= WARMUP or worker.poll() is not None, timeout_s)
    if worker.poll() is not None:
        raise RuntimeError(f"the worker exited with code {worker.returncode} while warming up")
    if len(got) < WARMUP:
        raise TimeoutError(f"{len(got)} of {WARMUP} warm-up decisions in {timeout_s:g}s")
    return {"transactions": WARMUP, "seconds": time.monotonic() - start}


class Runs:
    """Where the live runs (steps, 70% run, ratio runs) go. ``run()`` takes the arguments
    of :meth:`LiveTraffic.run`; ``segments`` are the LiveTraffic used, in order (one per
    broker); ``samplers`` the RSS samplers of the workers this object started."""

    fresh = False

    def __init__(self) -> None:
        self.segments: list[LiveTraffic] = []
        self.samplers: list[RssSampler] = []

    def run(self, label: str, short: str, kind: str, rate: float, seconds: float,
            drain_timeout: float) -> dict:
        raise NotImplementedError

    def close(self) -> None:
        """Stops whatever is still running."""


class SharedRuns(Runs):
    """``--shared-broker``: every run on the backlog drain's broker and worker."""

    def __init__(self, live: LiveTraffic, rss: RssSampler) -> None:
        super().__init__()
        self.live, self.rss = live, rss
        self.segments.append(live)
        rss.label = f"{rss.label} and every live run"

    def run(self, label: str, short: str, kind: str, rate: float, seconds: float,
            drain_timeout: float) -> dict:
        result = self.live.run(label, short, kind, rate, seconds, drain_timeout)
        self.rss.marks.append((self.live.t0 + result["start_s"], short))
        result.update(fresh_broker=False, segment=1)
        return result

    def close(self) -> None:
        self.live.close()


class FreshRuns(Runs):
    """The default: each run on its own fresh broker (same topic names, created anew) and
    its own fresh worker (new app id and group, empty data dir; same models and batch max),
    ready once ``WARMUP`` transactions got decisions; both stopped after the run's drain."""

    fresh = True

    def __init__(self, base: Settings, codecs: Codecs, rng: random.Random,
                 gen: TrafficGenerator, workdir: Path, seed: int) -> None:
        super().__init__()
        self.base, self.codecs, self.rng, self.gen = base, codecs, rng, gen
        self.workdir, self.seed = workdir, seed
        self.count = 0

    def run(self, label: str, short: str, kind: str, rate: float, seconds: float,
            drain_timeout: float) -> dict:
        self.count += 1
        k, began = self.count, time.monotonic()
        with EmbeddedBroker(log_path=self.workdir / f"broker-{k}.log") as broker:
            assert broker.process is not None
            settings = self.base.replace(
                kafka={"bootstrap": broker.bootstrap},
                worker={"app_id": f"{self.base.worker.app_id}-{k}",
                        "data_dir": self.workdir / f"state-{k}", "metrics_port": free_port()})
            ensure_topics(settings)
            worker = _spawn(["-m", "fraudstream", "worker", "--loglevel", "info"], settings,
                            self.workdir / f"worker-{k}.log")
            rss = RssSampler(worker.pid, label)
            self.samplers.append(rss)
            rss.start()
            live: LiveTraffic | None = None
            try:
                warm = warm_up(settings, self.codecs, worker, self.seed + 1000 + k, 180)
                ready_s = time.monotonic() - began
                _progress(f"  fresh broker and worker ready in {ready_s:.1f}s "
                          f"({WARMUP} warm-up decisions, not measured)")
                live = LiveTraffic(settings, self.codecs, self.rng, self.gen, worker,
                                   broker.process.pid)
                result = live.run(label, short, kind, rate, seconds, drain_timeout)
                rss.marks.append((live.t0 + result["start_s"], short))
            finally:
                if live is not None:
                    live.close()
                    self.segments.append(live)
                rss.stop()
                stop_process(worker)
        result.update(fresh_broker=True, segment=len(self.segments), ready_s=ready_s,
                      warm_up=warm, app_id=settings.worker.app_id)
        return result


def timeline(segments: list[LiveTraffic]) -> tuple[list[dict], list[dict], list[dict]]:
    """The per-second buckets and the runs (start_s, end_s) of every segment, placed end to
    end: each segment's times counted from its own start, plus the length of those before
    it (re-based; with one segment, seconds since it started). Also, per segment, its
    wall-clock start and its offset."""
    buckets: list[dict] = []
    runs: list[dict] = []
    segs: list[dict] = []
    offset = 0
    for i, live in enumerate(segments, 1):
        own = live.buckets() if live.runs else []
        buckets += [b | {"t": b["t"] + offset, "segment": i} for b in own]
        runs += [r | {"start_s": r["start_s"] + offset, "end_s": r["end_s"] + offset}
                 for r in live.runs]
        segs.append({"segment": i, "t0": live.t0, "offset_s": offset,
                     "runs": [r["label"] for r in live.runs]})
        offset += len(own)
    return buckets, runs, segs

