"""``fraudstream demo``: the whole service on embedded defaults, with a live summary.

Starts the embedded broker (Tansu, in memory) and Schema Registry, creates the topics,
starts one worker and the traffic generator as child processes, and prints once a second:
events/s, decisions by outcome, DLQ count and p50/p99 decision latency (transaction's
Kafka timestamp to decision received). Ctrl-C, SIGTERM or ``--duration`` stops it; every
process it started is stopped before it returns.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from confluent_kafka import OFFSET_BEGINNING, Consumer

from schemas.codec import Codecs, DecodeError, make_registry
from streams.broker import EmbeddedBroker
from streams.processes import StopFlag, die_with_parent, stop_process
from streams.registry import EmbeddedRegistry
from streams.settings import Settings
from streams.topics import assign_all, ensure_topics


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class Summary:
    """Reads ``decisions`` and the DLQ from the start and keeps the running numbers."""

    def __init__(self, settings: Settings, codecs: Codecs) -> None:
        self.codecs = codecs
        self.decisions_topic = settings.topics.decisions
        self.consumer = Consumer(settings.kafka.consumer_config("fraudstream-demo-summary"))
        assign_all(self.consumer, [settings.topics.decisions, settings.topics.dlq],
                   OFFSET_BEGINNING)
        self.outcomes: Counter[str] = Counter()
        self.dlq = 0
        self.total = 0
        self.window: list[float] = []  # latencies (ms) since the last report
        self.window_count = 0

    def poll(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            # consume() waits for its whole count or the timeout: keep the timeout short
            # so that the latency measured is the pipeline's, not this loop's
            for msg in self.consumer.consume(1000, min(left, 0.005)):
                if msg.error():
                    continue
                now_ms = time.time() * 1000.0
                self.total += 1
                self.window_count += 1
                if msg.topic() != self.decisions_topic:
                    self.dlq += 1
                    continue
                try:
                    decision = self.codecs.decision.decode(msg.value())
                except DecodeError:
                    continue
                self.outcomes[decision["decision"]] += 1
                ts = decision["source_timestamp"]
                self.window.append(now_ms - ts.timestamp() * 1000.0)

    def line(self, interval: float) -> str:
        rate = self.window_count / interval if interval > 0 else 0.0
        if self.window:
            latency = (f"latency p50 {percentile(self.window, 0.5):6.1f} ms "
                       f"p99 {percentile(self.window, 0.99):6.1f} ms")
        else:
            latency = "latency -"
        self.window, self.window_count = [], 0
        mix = " ".join(f"{k}={self.outcomes[k]}" for k in ("approve", "review", "decline"))
        return (f"{rate:7.0f} ev/s | decisions {sum(self.outcomes.values()):>8} ({mix}) | "
                f"dlq {self.dlq:>6} | {latency}")

    def close(self) -> None:
        self.consumer.close()


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def _spawn(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "streams.cli", *args],
            env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            preexec_fn=die_with_parent,
        )


def main(args: argparse.Namespace, settings: Settings) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="fraudstream-demo-"))
    stop = StopFlag()
    broker = EmbeddedBroker(log_path=workdir / "broker.log")
    registry = EmbeddedRegistry()
    worker = producer = None
    summary = None
    try:
        broker.start()
        registry.start()
        settings = settings.replace(
            kafka={"bootstrap": broker.bootstrap, "session_timeout_ms": 6000, "embedded": True},
            codec={"registry_url": registry.url},
            worker={"data_dir": workdir / "state"},
        )
        ensure_topics(settings)
        env = {k: v for k, v in os.environ.items() if not k.startswith("FRAUDSTREAM_")}
        env.update(settings.to_env())
        worker = _spawn(["worker", "--loglevel", "warning"], env, workdir / "worker.log")
        producer = _spawn(
            ["produce", "--rate", str(args.rate), "--seed", str(args.seed), "--quiet",
             "--bad-ratio", str(args.bad_ratio), "--time-compression", "86400"]
            + (["--duration", str(args.duration)] if args.duration else []),
            env, workdir / "producer.log",
        )
        print(f"broker {broker.bootstrap} (pid {broker.process.pid if broker.process else '-'})"
              f", registry {registry.url}, worker pid {worker.pid}, producer pid "
              f"{producer.pid}; logs in {workdir}", flush=True)
        print("waiting for the worker to join its group... (Ctrl-C to stop)", flush=True)
        summary = Summary(settings, Codecs(make_registry(registry.url), settings.topics))
        started = time.monotonic()
        last = started
        while not stop.set:
            summary.poll(1.0)
            got = summary.window_count
            now = time.monotonic()
            print(f"[{now - started:5.0f}s] " + summary.line(now - last), flush=True)
            last = now
            if worker.poll() is not None:
                print(f"worker exited with code {worker.returncode}; see {workdir}/worker.log")
                return 1
            if args.duration and now - started >= args.duration:
                drained = producer.poll() is not None and got == 0 and summary.total > 0
                if drained or now - started >= args.duration + 30:
                    break
        return 0
    finally:
        stop_process(producer)
        stop_process(worker)
        sent = [line for line in _read(workdir / "producer.log").splitlines()
                if line.startswith("sent ")]
        if sent:
            print(f"producer: {sent[-1]}", flush=True)
        if summary is not None:
            print(f"total: {summary.total} records out, "
                  f"{sum(summary.outcomes.values())} decisions {dict(summary.outcomes)}, "
                  f"{summary.dlq} dead letters", flush=True)
            summary.close()
        registry.stop()
        broker.stop()
        shutil.rmtree(workdir / "state", ignore_errors=True)
        print("stopped broker, registry, worker and producer", flush=True)
