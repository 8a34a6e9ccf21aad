"""``python -m loadtest``: how fast one worker decides, next to a bare Faust consumer.

One run, one embedded broker and registry, the same pre-produced generator traffic:

1. **bare Faust**: a Faust agent that only consumes ``--events`` records (loadtest/bare_faust.py);
2. **worker**: ``fraudstream worker`` (rules scorer) decides the same records; its rate is
   measured on the decisions topic, first decision to last (group join excluded);
3. **latency**: the worker keeps running while traffic arrives at ``--latency-ratios`` x its
   measured rate for ``--latency-seconds``; end-to-end latency = decision received minus
   the transaction's Kafka timestamp (carried in the decision as ``source_timestamp``).

Prints a table and writes JSON to ``results/``. Numbers depend on this machine's load:
compare the ratios of one run.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from confluent_kafka import OFFSET_BEGINNING, OFFSET_END, Consumer, Producer

from schemas.codec import Codecs, make_registry
from streams.broker import EmbeddedBroker
from streams.demo import percentile
from streams.generator import GeneratorConfig, TrafficGenerator
from streams.processes import die_with_parent, stop_process
from streams.registry import EmbeddedRegistry
from streams.settings import Settings, TopicSettings
from streams.topics import assign_all, ensure_topics

ROOT = Path(__file__).resolve().parent.parent


def _spawn(args: list[str], settings: Settings, log: Path) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FRAUDSTREAM_")}
    env.update(settings.to_env())
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, *args], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=out, start_new_session=True, preexec_fn=die_with_parent)


def _json_line(proc: subprocess.Popen[bytes], timeout_s: float) -> dict:
    """The first line of ``proc``'s stdout that holds a JSON object."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 1.0)
        if not ready:
            continue
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError("the bare Faust consumer exited without a result")
        start = line.find(b"{")
        if start >= 0:
            return json.loads(line[start:])
    raise TimeoutError("no result from the bare Faust consumer")


def pre_produce(settings: Settings, codecs: Codecs, n: int, seed: int) -> None:
    gen = TrafficGenerator(GeneratorConfig(seed=seed, id_prefix=f"b{uuid.uuid4().hex[:6]}"))
    producer = Producer({**settings.kafka.client_config(), "linger.ms": 20})
    now = int(time.time() * 1000)
    topic = settings.topics.transactions
    for i in range(n):
        txn = gen.next_transaction(now + i // 50)
        while True:
            try:
                producer.produce(topic, key=txn["card_id"].encode(),
                                 value=codecs.transaction.encode(txn))
                break
            except BufferError:
                producer.poll(0.05)
    assert producer.flush(60) == 0


def read_decisions(settings: Settings, codecs: Codecs, stop: Callable[[list], bool],
                   timeout_s: float, from_end: threading.Event | None = None,
                   ) -> list[tuple[float, dict]]:
    """(receive time, decision) until ``stop(received)`` says so or the timeout. With
    ``from_end``, reading starts at the current end and the event is set once it does."""
    consumer = Consumer(settings.kafka.consumer_config(f"bench-{uuid.uuid4().hex[:6]}"))
    assign_all(consumer, [settings.topics.decisions],
               OFFSET_END if from_end is not None else OFFSET_BEGINNING)
    if from_end is not None:
        consumer.consume(1, 0.5)  # resolves the end offsets before anything is produced
        from_end.set()
    out: list[tuple[float, dict]] = []
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline and not stop(out):
            # consume() waits for its whole count or the timeout: a short timeout keeps
            # this reader from adding latency of its own
            for msg in consumer.consume(1000, 0.005):
                if not msg.error():
                    out.append((time.time(), codecs.decision.decode(msg.value())))
    finally:
        consumer.close()
    return out


def paced_produce(settings: Settings, codecs: Codecs, rate: float, seconds: float,
                  seed: int) -> int:
    gen = TrafficGenerator(GeneratorConfig(seed=seed, id_prefix=f"l{uuid.uuid4().hex[:6]}"))
    producer = Producer({**settings.kafka.client_config(), "linger.ms": 5})
    start = time.monotonic()
    sent = 0
    topic = settings.topics.transactions
    while (elapsed := time.monotonic() - start) < seconds:
        due = int(elapsed * rate)
        while sent < due:
            txn = gen.next_transaction(int(time.time() * 1000))
            producer.produce(topic, key=txn["card_id"].encode(),
                             value=codecs.transaction.encode(txn))
            sent += 1
        producer.poll(0)
        time.sleep(0.001)
    producer.flush(30)
    return sent


def measure_latency(settings: Settings, codecs: Codecs, rate: float, seconds: float,
                    seed: int) -> dict:
    """Paced traffic while a reader takes decisions as they arrive: latency = receive
    time - source_timestamp (the transaction's Kafka timestamp)."""
    sent_box: list[int] = []
    got: list[tuple[float, dict]] = []
    ready = threading.Event()

    def _read() -> None:
        got.extend(read_decisions(
            settings, codecs, lambda out: bool(sent_box) and len(out) >= sent_box[0],
            seconds + 120, from_end=ready,
        ))

    reader = threading.Thread(target=_read)
    reader.start()
    ready.wait(30)
    t_start = time.time()
    sent_box.append(paced_produce(settings, codecs, rate, seconds, seed))
    reader.join()
    # the embedded broker's end offset can lie inside the last batch: skip older records
    fresh = [(t, d) for t, d in got if d["source_timestamp"].timestamp() >= t_start - 0.001]
    latencies = [(t - d["source_timestamp"].timestamp()) * 1000.0 for t, d in fresh]
    # where the time went: Kafka timestamp -> decided (in the worker), decided -> received
    decided = [(d["decided_at"] - d["source_timestamp"]).total_seconds() * 1000.0
               for _t, d in fresh]
    return {
        "rate": rate, "sent": sent_box[0], "measured": len(latencies),
        "to_decided_p50_ms": percentile(decided, 0.50),
        "to_decided_p99_ms": percentile(decided, 0.99),
        "p50_ms": percentile(latencies, 0.50), "p90_ms": percentile(latencies, 0.90),
        "p99_ms": percentile(latencies, 0.99), "max_ms": max(latencies),
        "mean_ms": statistics.fmean(latencies),
    }


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest", description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=50_000)
    parser.add_argument("--latency-ratios", type=lambda v: [float(x) for x in v.split(",")],
                        default=[0.25, 0.5], help="latency runs at these x saturation")
    parser.add_argument("--latency-seconds", type=float, default=30.0)
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--results", type=Path, default=ROOT / "results")
    parser.add_argument("--batch-max", type=int, default=500,
                        help="FRAUDSTREAM_WORKER_BATCH_MAX of the worker")
    parser.add_argument("--models", type=Path, default=None,
                        help="a model registry with an ACTIVE version (the full cascade); "
                             "default: the rules alone")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="fraudstream-bench-"))
    args.results.mkdir(parents=True, exist_ok=True)
    result: dict = {"events": args.events, "partitions": args.partitions,
                    "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    with EmbeddedBroker(log_path=workdir / "broker.log") as broker, EmbeddedRegistry() as reg:
        uid = uuid.uuid4().hex[:6]
        settings = Settings(topics=TopicSettings(
            **{k: f"{v}-{uid}" for k, v in vars(TopicSettings()).items()}
        )).replace(
            kafka={"bootstrap": broker.bootstrap, "session_timeout_ms": 6000,
                   "partitions": args.partitions, "embedded": True},
            codec={"registry_url": reg.url},
            worker={"app_id": f"bench-{uid}", "data_dir": workdir / "state",
                    "batch_max": args.batch_max},
            scoring={"models_dir": args.models or workdir / "no-models"},
        )
        result["models"] = str(args.models) if args.models else None
        ensure_topics(settings)
        codecs = Codecs(make_registry(reg.url), settings.topics)
        print(f"producing {args.events} generated transactions...", flush=True)
        pre_produce(settings, codecs, args.events, args.seed)

        print("bare Faust consumer...", flush=True)
        bare = _spawn(["-m", "loadtest.bare_faust", "--topic", settings.topics.transactions,
                       "--count", str(args.events), "--app-id", f"bare-{uid}"],
                      settings, workdir / "bare.log")
        try:
            result["bare_faust"] = _json_line(bare, timeout_s=300)
        finally:
            stop_process(bare)

        print("worker...", flush=True)
        worker = _spawn(["-m", "streams.cli", "worker", "--loglevel", "info"], settings,
                        workdir / "worker.log")
        try:
            got = read_decisions(settings, codecs, lambda out: len(out) >= args.events, 300)
            times = [t for t, _ in got]
            rate = (len(times) - 1) / (times[-1] - times[0])
            result["worker"] = {"events": len(got), "seconds": times[-1] - times[0],
                                "rate": rate}
            result["latency"] = []
            for ratio in args.latency_ratios:
                target = rate * ratio
                print(f"latency at {target:.0f}/s ({ratio:.2f}x) for "
                      f"{args.latency_seconds:.0f}s...", flush=True)
                result["latency"].append(measure_latency(
                    settings, codecs, target, args.latency_seconds, args.seed + 1
                ) | {"ratio": ratio})
        finally:
            stop_process(worker)
    b, w = result["bare_faust"], result["worker"]
    result["worker_over_bare"] = w["rate"] / b["rate"]
    print()
    print(f"bare Faust consume      {b['rate']:>9,.0f} events/s")
    what = "features, rules, model, online" if args.models else "features, rules"
    print(f"worker ({what})  {w['rate']:>9,.0f} events/s   "
          f"({result['worker_over_bare']:.2f}x bare Faust)")
    for lt in result["latency"]:
        print(f"end-to-end latency at {lt['rate']:>7,.0f}/s ({lt['ratio']:.2f}x, "
              f"{lt['measured']} decisions): p50 {lt['p50_ms']:.1f} ms, "
              f"p90 {lt['p90_ms']:.1f} ms, p99 {lt['p99_ms']:.1f} ms "
              f"(until decided: p50 {lt['to_decided_p50_ms']:.1f}, "
              f"p99 {lt['to_decided_p99_ms']:.1f})")
    out = args.results / f"bench-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(result, indent=2))
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
