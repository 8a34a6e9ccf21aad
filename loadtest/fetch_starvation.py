"""``python -m fraudstream.loadtest.fetch_starvation``: does a worker still decide once the embedded
broker holds many record batches in a partition?

The embedded broker (Tansu) lists every stored record batch of a partition on each fetch;
with ~100k batches it answers no fetch within the worker's 10 ms fetch wait (a 400/s soak
got there after about 3 minutes, and the worker stopped deciding, in silence). This
writes ``--batches`` one-record batches to a one-partition ``transactions`` topic on a
fresh broker, commits the worker's group at their end, starts a worker, sends
``--transactions`` new ones, and prints how many were decided and in how long (worker
start included), with the worker's stall and fetch-wait lines. Before the worker raised
its fetch wait on such a starvation (``streams/worker/progress.py``), it decided 0 of 300 in
90 s and logged nothing but "0 tx/s".
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition

from fraudstream.schemas.codec import Codecs, make_registry
from fraudstream.streams.embedded.broker import EmbeddedBroker
from fraudstream.streams.embedded.registry import EmbeddedRegistry
from fraudstream.streams.settings import Settings
from fraudstream.streams.topics import assign_all, ensure_topics
from fraudstream.streams.traffic.generator import TrafficGenerator
from fraudstream.streams.traffic.world import GeneratorConfig

#: Event times of the generated transactions (a fixed instant in the past, as in tests).
T0_MS = 1_767_571_200_000


def decided(settings: Settings, want: int, timeout_s: float) -> int:
    """Decisions on the decisions topic, waiting until ``want`` or the timeout."""
    consumer = Consumer(settings.kafka.consumer_config(f"starvation-reader-{uuid.uuid4()}"))
    assign_all(consumer, [settings.topics.decisions], OFFSET_BEGINNING)
    got = 0
    deadline = time.monotonic() + timeout_s
    try:
        while got < want and time.monotonic() < deadline:
            got += sum(1 for m in consumer.consume(1000, 0.2) if not m.error())
    finally:
        consumer.close()
    return got


def run(batches: int, transactions: int, stall_s: float, timeout_s: float,
        fetch_wait_ms: int = 10) -> tuple[int, int, list[str]]:
    """On a fresh broker: ``batches`` one-record batches, the worker's group committed at
    their end, a worker started, ``transactions`` new ones sent. Returns (decided, sent,
    the worker's stall and fetch-wait log lines)."""
    tmp = Path(tempfile.mkdtemp(prefix="fetch-starvation-"))
    broker = EmbeddedBroker(log_path=tmp / "tansu.log").start()
    registry = EmbeddedRegistry().__enter__()
    uid = uuid.uuid4().hex[:6]
    settings = Settings().replace(
        kafka={"bootstrap": broker.bootstrap, "session_timeout_ms": 6000, "partitions": 1,
               "embedded": True, "fetch_max_wait_ms": fetch_wait_ms},
        codec={"registry_url": registry.url},
        worker={"app_id": f"starvation-{uid}", "data_dir": tmp / "state", "metrics_port": 0,
                "commit_interval_s": 0.5, "stall_s": stall_s},
        scoring={"models_dir": tmp / "no-models"})
    worker = None
    try:
        ensure_topics(settings)
        topic = settings.topics.transactions
        producer = Producer({"bootstrap.servers": broker.bootstrap, "linger.ms": 0,
                             "batch.num.messages": 1})
        start = time.monotonic()
        for i in range(batches):
            producer.produce(topic, key=b"k", value=b"old")
            if i % 500 == 0:
                producer.flush()
        producer.flush()
        print(f"{batches} one-record batches written in {time.monotonic() - start:.0f} s")
        group = Consumer(settings.kafka.consumer_config(settings.worker.app_id))
        group.commit(offsets=[TopicPartition(topic, 0, batches)], asynchronous=False)
        group.close()
        env = {k: v for k, v in os.environ.items() if not k.startswith("FRAUDSTREAM_")}
        env.update(settings.to_env())
        log = tmp / "worker.log"
        with open(log, "wb") as out:
            worker = subprocess.Popen(
                [sys.executable, "-m", "fraudstream", "worker", "--loglevel", "info"],
                env=env, stdout=out, stderr=subprocess.STDOUT)
        codecs = Codecs(make_registry(registry.url), settings.topics)
        gen = TrafficGenerator(GeneratorConfig(seed=3))
        txns = [gen.next_transaction(T0_MS + 5 * i) for i in range(transactions)]
        for t in txns:
            producer.produce(topic, key=t["card_id"].encode(),
                             value=codecs.transaction.encode(t))
        producer.flush()
        start = time.monotonic()
        got = decided(settings, len(txns), timeout_s)
        print(f"decided {got} of {len(txns)} in {time.monotonic() - start:.0f} s "
              f"(worker start included)")
        lines = [line[:300] for line in log.read_text(errors="replace").splitlines()
                 if re.search(r"stalled|fetch wait|stall over", line)]
        return got, len(txns), lines
    finally:
        if worker is not None:
            worker.terminate()
            worker.wait(30)
        broker.stop()
        registry.__exit__(None, None, None)
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", type=int, default=100_000)
    p.add_argument("--transactions", type=int, default=300)
    p.add_argument("--stall-s", type=float, default=60.0)
    p.add_argument("--timeout", type=float, default=90.0)
    args = p.parse_args(argv)
    got, sent, lines = run(args.batches, args.transactions, args.stall_s, args.timeout)
    for line in lines:
        print(line)
    return 0 if got >= sent else 1


if __name__ == "__main__":
    sys.exit(main())
