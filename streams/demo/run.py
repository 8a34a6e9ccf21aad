"""``fraudstream demo``: the whole product on embedded defaults, with a live summary.

1. The model: trained on a generated history of the demo's world the first time (progress
   bar), cached, and promoted (:mod:`fraudstream.streams.demo.model`); ``--rules-only`` skips it.
2. The embedded broker (Tansu, in memory) and Schema Registry, the topics, one worker, and
   the traffic generator with labels flowing back, as child processes.
3. Once a second, a line (:mod:`fraudstream.streams.demo.summary`): rate, decision mix, who decided,
   precision of review and decline once labels arrive, dead letters, the worker's own
   time per batch, and the end-to-end latency; at the end, a summary.

The traffic is sized for a real portfolio: ``--cards`` cards at ``--rate`` transactions a
second with event time ``--speed`` times faster than the wall clock, so a card's genuine
gap is ``cards * speed / rate`` event-seconds (8 h by default). Producers batch for
``--linger-ms``, the worker and the summary fetch with ``--fetch-wait-ms``, and topics have
one partition: the embedded broker walks every record batch of a partition on each fetch
that finds new data, so its cost grows with batches held x fetches, and every partition
adds a stream of both (``docs/performance.md``).

Ctrl-C, SIGTERM or ``--duration`` stops it; every process it started is stopped before
it returns.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fraudstream.schemas.codec import Codecs, make_registry
from fraudstream.schemas.fx import Rates
from fraudstream.streams.demo.model import DemoWorld, default_cache, ensure_model
from fraudstream.streams.demo.summary import Summary
from fraudstream.streams.embedded.broker import EmbeddedBroker
from fraudstream.streams.embedded.registry import EmbeddedRegistry
from fraudstream.streams.processes import StopFlag, die_with_parent, stop_process
from fraudstream.streams.settings import Settings
from fraudstream.streams.topics import ensure_topics
from fraudstream.streams.traffic.generator import DAY_MS


def add_arguments(p: argparse.ArgumentParser) -> None:
    world = DemoWorld()
    p.add_argument("--duration", type=float, default=0, help="seconds; 0 = until Ctrl-C")
    p.add_argument("--rate", type=float, default=world.rate, help="transactions per second")
    p.add_argument("--speed", type=float, default=world.speed,
                   help="event time runs this many times faster than the wall clock")
    p.add_argument("--cards", type=int, default=world.cards, help="card population")
    p.add_argument("--label-delay-days", type=float, default=world.label_delay_days,
                   help="mean delay of a label, in event time")
    p.add_argument("--history-days", type=float, default=world.history_days,
                   help="days of generated history the model is trained on")
    p.add_argument("--warmup-days", type=float, default=1.0,
                   help="days of event time sent first, unpaced, to warm the worker's state")
    p.add_argument("--seed", type=int, default=world.seed)
    p.add_argument("--bad-ratio", type=float, default=0.001,
                   help="share of malformed records sent, to show the DLQ")
    p.add_argument("--linger-ms", type=float, default=100.0,
                   help="producer batching (fewer record batches for the embedded broker)")
    p.add_argument("--partitions", type=int, default=1,
                   help="partitions per topic: on the embedded broker each one adds its own "
                        "stream of record batches to walk on every fetch")
    p.add_argument("--fetch-wait-ms", type=int, default=100,
                   help="the worker's fetch wait: fewer, larger batches in and out (the "
                        "embedded broker always waits this long)")
    p.add_argument("--rules-only", action="store_true", help="no model: decide with rules")
    p.add_argument("--models-cache", type=Path, default=None,
                   help="where trained demo models are kept (default: ~/.cache/fraudstream)")
    p.add_argument("--metrics-port", type=int, default=0,
                   help="the worker's /metrics port (default: a free one)")


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def _spawn(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "fraudstream", *args],
            env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            preexec_fn=die_with_parent,
        )


def _warmup_sent(log: Path) -> int | None:
    for line in _read(log).splitlines():
        if line.startswith("warm-up sent "):
            return int(line.split()[2])
    return None


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return float("nan")


def main(args: argparse.Namespace, settings: Settings) -> int:
    world = DemoWorld(seed=args.seed, rate=args.rate, speed=args.speed, cards=args.cards,
                      label_delay_days=args.label_delay_days, history_days=args.history_days)
    print(f"demo world: {world.cards:,} cards at {world.rate:g} tx/s, event time x{world.speed:g}"
          f" (a card's genuine gap about {world.card_gap_hours:.1f} h), labels after "
          f"{world.label_delay_days:g} days of event time", flush=True)
    models_dir = version = None
    if not args.rules_only:
        try:
            models_dir, version, trained = ensure_model(
                world, args.models_cache or default_cache(), settings.scoring.rules_path,
                Rates.load(settings.worker.rates_path))
        except KeyboardInterrupt:
            print("interrupted while training the demo model; nothing was started",
                  file=sys.stderr)
            return 130
        print(f"model {version} {'trained and ' if trained else ''}promoted (registry "
              f"{models_dir})", flush=True)
    workdir = Path(tempfile.mkdtemp(prefix="fraudstream-demo-"))
    stop = StopFlag()
    broker = EmbeddedBroker(log_path=workdir / "broker.log")
    registry = EmbeddedRegistry()
    worker = producer = None
    summary = None
    code = 0
    rss = float("nan")
    try:
        broker.start()
        registry.start()
        metrics_port = args.metrics_port or _free_port()
        settings = settings.replace(
            kafka={"bootstrap": broker.bootstrap, "session_timeout_ms": 3000, "embedded": True,
                   "fetch_max_wait_ms": args.fetch_wait_ms, "partitions": args.partitions},
            codec={"registry_url": registry.url},
            worker={"data_dir": workdir / "state", "metrics_port": metrics_port},
            scoring={"models_dir": models_dir or workdir / "no-models"},
        )
        ensure_topics(settings)
        env = {k: v for k, v in os.environ.items() if not k.startswith("FRAUDSTREAM_")}
        env.update(settings.to_env())
        worker = _spawn(["worker", "--loglevel", "warning"], env, workdir / "worker.log")
        # Live event time starts far enough back to stay behind the wall clock.
        live_from = int(time.time() * 1000 - (args.duration or 6 * 3600) * args.speed * 1000)
        producer = _spawn(
            ["produce", "--rate", str(args.rate), "--seed", str(args.seed), "--quiet",
             "--traffic-seed", str(args.seed + 1000), "--start-ms", str(live_from),
             "--warmup-days", str(args.warmup_days), "--hold-after-warmup",
             "--bad-ratio", str(args.bad_ratio), "--speed", str(args.speed),
             "--cards", str(args.cards), "--label-delay-days", str(args.label_delay_days),
             "--linger-ms", str(args.linger_ms)]
            + (["--duration", str(args.duration)] if args.duration else []),
            env, workdir / "producer.log",
        )
        print(f"broker {broker.bootstrap} (pid {broker.process.pid if broker.process else '-'})"
              f", registry {registry.url}, worker pid {worker.pid} (/metrics on port "
              f"{metrics_port}), producer pid {producer.pid}; logs in {workdir}", flush=True)
        print("waiting for the worker to join its group... (Ctrl-C to stop)", flush=True)
        horizon = (world.label_delay_days * 2.0) * DAY_MS  # mean + 2 sd (sd = mean / 2)
        # The summary reads with the worker's fetch wait: each fetch costs the embedded
        # broker a walk of every batch it holds, so it must not poll every 10 ms.
        summary = Summary(settings,
                          Codecs(make_registry(registry.url), settings.topics),
                          f"http://127.0.0.1:{metrics_port}/metrics", horizon,
                          settings.scoring.budget_ms, live_from,
                          broker.process.pid if broker.process else None)
        started = time.monotonic()
        last = started
        held = args.warmup_days > 0
        while not stop.set:
            summary.poll(1.0)
            if held:  # live traffic starts once the worker decided all of the warm-up
                sent = _warmup_sent(workdir / "producer.log")
                if sent is not None and summary.warmup >= sent:
                    producer.send_signal(signal.SIGUSR1)
                    held = False
                    print(f"warm-up done: {sent} transactions decided; live traffic starts "
                          "(the summary counts from here)", flush=True)
                    started = time.monotonic()
            got = summary.window.count
            now = time.monotonic()
            print(f"[{now - started:5.0f}s] " + summary.line(now - last), flush=True)
            last = now
            if worker.poll() is not None:
                print(f"worker exited with code {worker.returncode}; see {workdir}/worker.log")
                code = 1
                break
            rss = _rss_mb(worker.pid)
            if args.duration and now - started >= args.duration:
                drained = producer.poll() is not None and got == 0 and summary.total > 0
                if drained or now - started >= args.duration + 30:
                    break
        return code
    finally:
        stop_process(producer)
        stop_process(worker)
        sent = [line for line in _read(workdir / "producer.log").splitlines()
                if line.startswith("sent ")]
        if sent:
            print(f"producer: {sent[-1]}", flush=True)
        status = [line for line in _read(workdir / "worker.log").splitlines()
                  if "status:" in line]
        if status:
            print(f"worker's last status line: {status[-1].split('status:', 1)[1].strip()}")
        if summary is not None:
            print(summary.final(), flush=True)
            print(f"worker RSS at the end: {rss:.0f} MB", flush=True)
            summary.close()
        registry.stop()
        broker.stop()
        shutil.rmtree(workdir / "state", ignore_errors=True)
        print("stopped broker, registry, worker and producer", flush=True)
