"""The entity replica (streams/worker/replica.py) at scale, on a fresh embedded broker.

    python -m fraudstream.loadtest.replica [--entities 1000000] [--partitions 6]
        [--cards 200000] [--rate 2000] [--live-s 20]

It writes a state changelog as workers would leave it: ``--entities`` merchants, devices
and IPs (2% merchants, each with a partial in every partition, about 1.4 KB each; the
rest devices and IPs, one partial each, about 260 B), and ``--cards`` card records (which
the replica reads past). Then a fresh process (its RSS is the replica's and the
interpreter's alone) starts a replica on it and reports:

- catch-up: seconds to read the changelog to its end, records per second;
- RSS after catching up, and its peak;
- a read: the multi-get of one batch's foreign partials (500 transactions: a merchant,
  a device and an IP each, in every other partition), microseconds per key;
- live: ``--rate`` entity writes per second for ``--live-s`` seconds, produced in batches
  every 50 ms as a worker flushes them; the delay from each batch's append to applied
  (p50, p99, max), and the RSS at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic

from fraudstream.state.records import entity_record

TOPIC = "bench-state-changelog"


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _merchant(i: int) -> bytes:
    return entity_record(i, -1, 1e12, [1e12 - k for k in range(20)],
                         [[h, 5, 50.0] for h in range(24)], [[d, 40, 400.0] for d in range(30)],
                         [[d, 1] for d in range(5)], [[k, 1e12] for k in range(10)])


def _small(i: int) -> bytes:
    return entity_record(i, -1, 1e12, [1e12], [[h, 1, 10.0] for h in range(3)],
                         [[d, 1, 10.0] for d in range(3)], [], [[k, 1e12] for k in range(4)])


def _card() -> bytes:
    return bytes(512)


def load(bootstrap: str, entities: int, cards: int, partitions: int) -> dict[str, int]:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    for fut in admin.create_topics([NewTopic(TOPIC, partitions, 1)]).values():
        fut.result(30)
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 50,
                         "batch.num.messages": 10_000, "queue.buffering.max.kbytes": 262144})
    merchants = entities // 50
    big, small, card = _merchant(0), _small(0), _card()
    sent = {"records": 0, "bytes": 0}

    def send(key: bytes, value: bytes, p: int) -> None:
        while True:
            try:
                producer.produce(TOPIC, key=key, value=value, partition=p)
                break
            except BufferError:
                producer.poll(0.1)
        sent["records"] += 1
        sent["bytes"] += len(value)

    for m in range(merchants):
        for p in range(partitions):
            send(b"m|merchant_%07d" % m, big, p)
    rest = entities - merchants
    for i in range(rest):
        send((b"d|device_%07d" if i % 2 else b"i|ip_%07d") % i, small, i % partitions)
    for c in range(cards):
        send(b"c|card_%07d" % c, card, c % partitions)
    producer.flush(600)
    return {**sent, "merchants": merchants, "devices_and_ips": rest}


def child(bootstrap: str, path: str, partitions: int, entities: int, live_s: float) -> None:
    """The replica alone in a process: catch up, read, then tail live writes."""
    from fraudstream.streams.worker.replica import EntityReplica

    delays: list[float] = []
    rss0 = _status_kb("VmRSS")
    replica = EntityReplica(Path(path), {"bootstrap.servers": bootstrap,
                                         "group.id": "bench-replica",
                                         "enable.auto.commit": False,
                                         "fetch.wait.max.ms": 100},
                            TOPIC, partitions, cache_mb=64, on_delay=delays.append)
    t0 = time.perf_counter()
    replica.start()
    replica.ready.wait()
    took = time.perf_counter() - t0
    out = {"catch_up_s": round(took, 2), "records_applied": replica.applied,
           "rss_start_mb": round(rss0 / 1024, 1),
           "rss_caught_up_mb": round(_status_kb("VmRSS") / 1024, 1),
           "rss_peak_mb": round(_status_kb("VmHWM") / 1024, 1)}
    rng = random.Random(7)
    merchants = entities // 50
    per_key = []
    for _ in range(20):
        keys = []
        for _t in range(500):
            own = rng.randrange(partitions)
            m = b"m|merchant_%07d" % rng.randrange(merchants)
            i = rng.randrange(entities - merchants)
            d = (b"d|device_%07d" if i % 2 else b"i|ip_%07d") % i
            keys += [(q, m) for q in range(partitions) if q != own]
            keys += [(q, d) for q in range(partitions) if q != own]
        t = time.perf_counter()
        got = replica.read(keys)
        per_key.append((time.perf_counter() - t) / len(keys) * 1e6)
        assert any(got), "no key found: the replica is empty"
    out["read_us_per_key_median"] = round(statistics.median(per_key), 2)
    out["keys_per_batch"] = len(keys)
    print(json.dumps({"phase": "ready", **out}), flush=True)
    delays.clear()
    time.sleep(live_s)
    d = sorted(delays)
    live = {"batches_applied": len(d)}
    if d:
        live.update({"delay_p50_ms": round(d[len(d) // 2] * 1000, 1),
                     "delay_p99_ms": round(d[min(len(d) - 1, int(len(d) * 0.99))] * 1000, 1),
                     "delay_max_ms": round(d[-1] * 1000, 1)})
    live["rss_end_mb"] = round(_status_kb("VmRSS") / 1024, 1)
    print(json.dumps({"phase": "live", **live}), flush=True)
    replica.stop()


def live_writes(bootstrap: str, rate: float, seconds: float, partitions: int) -> int:
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5})
    value = _small(1)
    per_tick = max(1, int(rate * 0.05))
    n, t_end = 0, time.monotonic() + seconds
    while time.monotonic() < t_end:
        for _ in range(per_tick):
            producer.produce(TOPIC, key=b"d|live_%07d" % (n % 50_000), value=value,
                             partition=n % partitions)
            n += 1
        producer.flush(10)
        time.sleep(0.05)
    return n


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fraudstream.loadtest.replica")
    ap.add_argument("--entities", type=int, default=1_000_000)
    ap.add_argument("--cards", type=int, default=200_000)
    ap.add_argument("--partitions", type=int, default=6)
    ap.add_argument("--rate", type=float, default=2000.0)
    ap.add_argument("--live-s", type=float, default=20.0)
    ap.add_argument("--child", nargs=2, metavar=("BOOTSTRAP", "PATH"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(args.child[0], args.child[1], args.partitions, args.entities, args.live_s)
        return 0
    from fraudstream.streams.embedded.broker import EmbeddedBroker

    with tempfile.TemporaryDirectory() as tmp, \
            EmbeddedBroker(log_path=Path(tmp) / "broker.log") as broker:
        t0 = time.perf_counter()
        loaded = load(broker.bootstrap, args.entities, args.cards, args.partitions)
        print(json.dumps({"phase": "loaded", "seconds": round(time.perf_counter() - t0, 1),
                          **loaded}), flush=True)
        proc = subprocess.Popen(
            [sys.executable, "-m", "fraudstream.loadtest.replica", "--entities",
             str(args.entities), "--partitions", str(args.partitions), "--live-s",
             str(args.live_s), "--child", broker.bootstrap, os.path.join(tmp, "replica")],
            stdout=subprocess.PIPE, text=True)
        assert proc.stdout is not None
        ready = proc.stdout.readline()
        print(ready.strip(), flush=True)
        sent = live_writes(broker.bootstrap, args.rate, args.live_s - 2, args.partitions)
        print(proc.stdout.readline().strip().replace('"live"', f'"live", "sent": {sent}'),
              flush=True)
        proc.wait(60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
