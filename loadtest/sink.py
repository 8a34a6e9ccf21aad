"""``python -m fraudstream.loadtest.sink``: what the worker's producer path costs per record.

One batch's writes as the worker's commit sends them: ``--changelog`` records of
``--value-bytes`` to the state changelog's partitions (with their offsets kept, as
:class:`fraudstream.streams.worker.table_state.FaustTableState` needs them), then
``--decisions`` records published to another topic, each step waiting for the broker's
acknowledgements. Three producers, alternated round by round on one embedded broker:

- ``librdkafka``: ``Producer.produce`` in a loop with an empty delivery callback, and
  ``flush``: the floor;
- ``sink``: :class:`fraudstream.streams.worker.delivery.KafkaSink` alone;
- ``sink+renewing``: the sink with its
  :class:`fraudstream.streams.worker.renewing_producer.RenewingProducer`, as the worker
  runs it.

Per producer it prints the medians over ``--rounds`` of: the process's CPU time per record
(librdkafka's threads included), the CPU time of the sending thread per record (the
delivery callbacks run on the flushing thread, not in it), and the wall time per batch.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from fraudstream.loadtest.harness import write_result

ROOT = Path(__file__).resolve().parent.parent


class _Librdkafka:
    """The floor: one produce call per record, an empty callback, one flush per step."""

    def __init__(self, config: dict[str, Any]) -> None:
        from fraudstream.streams.worker.delivery import KafkaSink

        self.producer = KafkaSink(config).producer  # the sink's configuration

    async def send(self, records: list[tuple[str, int, bytes, bytes]]) -> None:
        produce = self.producer.produce

        def report(_err: Any, _msg: Any) -> None:
            return None

        for topic, partition, key, value in records:
            produce(topic, value, key, partition, report)
        await asyncio.get_running_loop().run_in_executor(None, self.producer.flush, 60)

    async def publish(self, batches: list[tuple[str, list[tuple[bytes, bytes]]]]) -> None:
        await self.send([(topic, -1, key, value) for topic, recs in batches
                         for key, value in recs])


def run(args: argparse.Namespace) -> dict[str, Any]:
    from confluent_kafka.admin import AdminClient, NewTopic

    from fraudstream.streams.embedded.broker import EmbeddedBroker
    from fraudstream.streams.worker import renewing_producer
    from fraudstream.streams.worker.delivery import KafkaSink

    rng = random_bytes(args.value_bytes)
    changelog = [("state-changelog", i % args.partitions, b"c|card_%08d" % i, rng(i))
                 for i in range(args.changelog)]
    decisions = [(b"txn-%08d" % i, rng(i)[:300]) for i in range(args.decisions)]
    n = args.changelog + args.decisions
    with tempfile.TemporaryDirectory() as tmp, \
            EmbeddedBroker(log_path=Path(tmp) / "broker.log") as broker:
        admin = AdminClient({"bootstrap.servers": broker.bootstrap})
        for fut in admin.create_topics([NewTopic(t, args.partitions, 1) for t in
                                        ("state-changelog", "decisions")]).values():
            fut.result(15)
        config = {"bootstrap.servers": broker.bootstrap}
        renewing = KafkaSink(config)
        renewing_producer.install(renewing, config, 10.0)
        producers: dict[str, Any] = {"librdkafka": _Librdkafka(config),
                                     "sink": KafkaSink(config), "sink+renewing": renewing}
        loop = asyncio.new_event_loop()
        rounds: dict[str, list[tuple[float, float, float]]] = {k: [] for k in producers}
        for r in range(args.rounds + 1):  # the first round warms up and is left out
            order = list(producers.items())
            for name, producer in (order if r % 2 else order[::-1]):
                c0, t0, w0 = time.process_time(), time.thread_time(), time.perf_counter()
                loop.run_until_complete(producer.send(changelog))
                loop.run_until_complete(producer.publish([("decisions", decisions)]))
                if r:
                    rounds[name].append(((time.process_time() - c0) / n * 1e6,
                                         (time.thread_time() - t0) / n * 1e6,
                                         (time.perf_counter() - w0) * 1e3))
        loop.close()
    result: dict[str, Any] = {"changelog": args.changelog, "decisions": args.decisions,
                              "value_bytes": args.value_bytes, "rounds": args.rounds}
    for name, values in rounds.items():
        cpu, thread, wall = (statistics.median(v[i] for v in values) for i in range(3))
        result[name] = {"process_cpu_us_per_record": cpu,
                        "sending_thread_cpu_us_per_record": thread, "wall_ms_per_batch": wall}
        print(f"{name:14s} process CPU {cpu:5.2f} µs/record, sending thread {thread:5.2f} "
              f"µs/record, {wall:5.1f} ms per batch of {n}", file=sys.stderr)
    return result


def random_bytes(size: int) -> Any:
    pool = [os.urandom(size // 8 or 1) * 8 for _ in range(64)]
    return lambda i: pool[i % len(pool)][:size]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fraudstream.loadtest.sink",
                                description=__doc__.split("\n")[0])
    p.add_argument("--changelog", type=int, default=1500,
                   help="changelog records per batch (a batch of ~470 transactions writes "
                   "~1,400: card, merchant, device and IP records and dedupe entries)")
    p.add_argument("--decisions", type=int, default=500)
    p.add_argument("--value-bytes", type=int, default=800)
    p.add_argument("--partitions", type=int, default=4)
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--out", type=Path, default=ROOT / "results")
    args = p.parse_args(argv)
    write_result(args.out, "sink", run(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
