"""``python -m fraudstream.loadtest.features``: what the velocity features cost, per backend.

``cost``: the same generated traffic (``--days`` of ``--per-day`` transactions over
``--cards`` cards, in micro-batches of ``--batch``) through
:class:`fraudstream.state.engine.FeatureEngine`
with each backend:

- ``memory``: a dict (the offline builder's store): the cost of the feature code alone;
- ``rocksdb``: the worker's Faust table (RocksDB store) read and written as the worker
  does; the changelog produce to the embedded broker is timed apart (``flush``), as it
  is shared with the dedupe entries in the worker's commit;
- ``redis``: a real redis-server (started here unless ``--redis-url``), one MGET and one
  pipelined write per batch.

Per backend it prints the median over batches of the CPU time per event of computing
(read, features, encode, local write) and of the flush, and the state bytes per card.

``scale``: a worker holding ``--cards`` cards (1M by default): the changelog of a filled
state table is produced to the embedded broker, then a real worker is started on a fresh
data directory (recovery from the changelog) and again on the kept one (a restart). It
prints the recovery times (first decision after start, minus that of a worker with empty
state), the RocksDB bytes per card and the worker's RSS.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
import zlib
from pathlib import Path
from typing import Any

from fraudstream.loadtest.harness import fresh_stack, write_result
from fraudstream.loadtest.proc import rss_file_kb, rss_kb
from fraudstream.schemas.fx import Rates
from fraudstream.schemas.validate import validate_history_transaction
from fraudstream.state.engine import FeatureEngine, MemoryStore, TxnEvent
from fraudstream.state.features import FeatureConfig
from fraudstream.streams.settings import FeatureSettings
from fraudstream.streams.traffic.generator import DAY_MS, generate_history
from fraudstream.streams.traffic.world import GeneratorConfig

ROOT = Path(__file__).resolve().parent.parent


#: Where ``cost`` histories start: fixed, so two runs cost the same events (the windows'
#: bucket edges, days and hours fall alike), whatever the date.
START_MS = 1_788_220_800_000  # 2026-09-01 UTC


def _history(args: argparse.Namespace, start: int | None = None) -> list[dict[str, Any]]:
    """Generated transactions as the validator returns them (amounts in EUR too), from
    ``start`` (default: ``days + 1`` days before now, for traffic a live worker decides)."""
    if start is None:
        start = int(time.time() * 1000) - int((args.days + 1) * DAY_MS)
    txns, _labels = generate_history(
        GeneratorConfig(seed=args.seed, n_cards=args.cards, id_prefix="bench"), start,
        args.days, args.per_day)
    rates = Rates.load()
    return [validate_history_transaction(t, rates) for t in txns]


def _partition(card_id: str, partitions: int) -> int:
    return zlib.crc32(card_id.encode()) % partitions


def _run(store: Any, txns: list[dict[str, Any]], batch: int, partitions: int,
         warm: float = 1 / 3) -> dict[str, Any]:
    """Median µs/event of process+write and of flush, after a warm-up third: CPU time of
    this thread (background threads of librdkafka and RocksDB excluded), and wall time."""
    return _run_many([store], txns, batch, partitions, warm)[0]


def _run_many(stores: list[Any], txns: list[dict[str, Any]], batch: int, partitions: int,
              warm: float = 1 / 3) -> list[dict[str, Any]]:
    """:func:`_run` for several stores in one process, each batch through each store in
    turn (the first one alternating): the machine's noise falls on all of them alike.
    With two, ``ratio`` is the median over batches of the second's time over the
    first's."""
    engines = [FeatureEngine(FeatureConfig(), store) for store in stores]
    refreshes = [getattr(store, "refresh", None) for store in stores]
    digests = [hashlib.sha256() for _ in stores]  # backends must agree bit for bit
    times: list[dict[str, list[float]]] = [
        {"compute": [], "wall": [], "flush": []} for _ in stores]
    loop = asyncio.new_event_loop()
    for n, i in enumerate(range(0, len(txns), batch)):
        chunk = txns[i:i + batch]
        events = [TxnEvent(_partition(t["card_id"], partitions), i + j, t)
                  for j, t in enumerate(chunk)]
        order = range(len(stores)) if n % 2 == 0 else reversed(range(len(stores)))
        for k in order:
            store, engine, refresh = stores[k], engines[k], refreshes[k]
            w0, t0 = time.perf_counter(), time.thread_time()
            if refresh:
                refresh()
            out = engine.process(events)
            store.write(out.writes)
            digests[k].update(out.matrix.tobytes())
            w1, t1 = time.perf_counter(), time.thread_time()
            loop.run_until_complete(store.flush())
            t2 = time.thread_time()
            if i >= len(txns) * warm:
                times[k]["compute"].append((t1 - t0) / len(chunk) * 1e6)
                times[k]["wall"].append((w1 - w0) / len(chunk) * 1e6)
                times[k]["flush"].append((t2 - t1) / len(chunk) * 1e6)
    loop.close()
    results: list[dict[str, Any]] = [
        {"compute_us_per_event": statistics.median(t["compute"]),
         "compute_wall_us_per_event": statistics.median(t["wall"]),
         "flush_us_per_event": statistics.median(t["flush"]), "batches": len(t["compute"]),
         "features_sha256": d.hexdigest()} for t, d in zip(times, digests, strict=True)]
    if len(stores) == 2:
        results[1]["ratio"] = statistics.median(
            b / a for a, b in zip(times[0]["compute"], times[1]["compute"], strict=True))
    return results


def _card_bytes(store: Any, cards: list[str], partitions: int) -> float:
    keys = [(_partition(c, partitions), b"c|" + c.encode()) for c in cards]
    sizes = [len(v) for v in store.read(keys) if v]
    return statistics.mean(sizes) if sizes else 0.0


def cost(args: argparse.Namespace) -> dict[str, Any]:
    txns = _history(args, START_MS)
    if args.gc_gen0:  # the collector as the worker tunes it (streams/worker/app.py tune_gc)
        from fraudstream.streams.worker.app import tune_gc

        tune_gc(args.gc_gen0)
    cards = sorted({t["card_id"] for t in txns})
    print(f"{len(txns)} transactions, {len(cards)} cards, batches of {args.batch}, "
          f"{args.repeat} rounds", file=sys.stderr)
    results: dict[str, Any] = {"events": len(txns), "cards": len(cards), "batch": args.batch,
                               "rounds": {b: [] for b in (
                                   ["rocksdb-all", "rocksdb"] if args.paired
                                   else args.backends)}}
    partitions = args.partitions
    for _round in range(args.repeat):  # backends interleaved: the machine's noise is shared
        if args.paired:  # one process, batches alternated: rocksdb-all, then rocksdb
            with tempfile.TemporaryDirectory() as tmp:
                every, held = _rocksdb_costs(txns, cards, args, Path(tmp), [False, True])
            results["rounds"]["rocksdb-all"].append(every)
            results["rounds"]["rocksdb"].append(held)
            continue
        for backend in args.backends:
            with tempfile.TemporaryDirectory() as tmp:
                if backend == "memory":
                    store: Any = MemoryStore(partitions)
                    r = _run(store, txns, args.batch, partitions)
                    r["card_bytes"] = _card_bytes(store, cards, partitions)
                elif backend in ("rocksdb", "rocksdb-all"):
                    r = _rocksdb_cost(txns, cards, args, Path(tmp),
                                      presence=backend == "rocksdb")
                else:
                    r = _redis_cost(txns, cards, args, Path(tmp))
            results["rounds"][backend].append(r)
    digests = {x["features_sha256"] for rounds in results["rounds"].values() for x in rounds}
    results["features_equal"] = len(digests) == 1
    for backend, rounds in results["rounds"].items():
        r = {k: statistics.median(x[k] for x in rounds) for k in rounds[0]
             if k != "features_sha256"}
        results[backend] = r
        each = ", ".join(f"{x['compute_us_per_event']:.0f}" for x in rounds)
        print(f"{backend:8s} features {r['compute_us_per_event']:7.1f} µs/event CPU "
              f"({r['compute_wall_us_per_event']:.1f} wall), "
              f"flush {r['flush_us_per_event']:6.1f} µs/event, "
              f"{r['card_bytes']:.0f} bytes/card record"
              + (f", cache hits {r['cache_hit_rate']:.0%}" if "cache_hit_rate" in r else "")
              + f"  (medians of {each})",
              file=sys.stderr)
    if args.paired:
        ratios = [x["ratio"] for x in results["rounds"]["rocksdb"]]
        results["presence_ratio"] = statistics.median(ratios)
        print(f"rocksdb over rocksdb-all, per batch in one process: median "
              f"{results['presence_ratio']:.3f} (rounds: "
              + ", ".join(f"{r:.3f}" for r in ratios) + ")", file=sys.stderr)
    print("feature matrices " + ("equal in every backend and round" if
                                 results["features_equal"] else
                                 f"DIFFER: {len(digests)} different ones"), file=sys.stderr)
    return results


def _rocksdb_cost(txns: list[dict[str, Any]], cards: list[str], args: argparse.Namespace,
                  tmp: Path, presence: bool = True) -> dict[str, Any]:
    """The worker's store; ``presence`` False (backend ``rocksdb-all``): a device's and an
    IP's partials read from every partition, as before the presence index."""
    return _rocksdb_costs(txns, cards, args, tmp, [presence])[0]


def _rocksdb_costs(txns: list[dict[str, Any]], cards: list[str], args: argparse.Namespace,
                   tmp: Path, presences: list[bool]) -> list[dict[str, Any]]:
    """:func:`_rocksdb_cost` for stores of each ``presences`` setting, batches alternated
    in one process (a table each, one app, one broker)."""
    import faust
    from confluent_kafka.admin import AdminClient, NewTopic

    from fraudstream.streams.embedded.broker import EmbeddedBroker
    from fraudstream.streams.settings import Settings
    from fraudstream.streams.worker.delivery import KafkaSink
    from fraudstream.streams.worker.feature_store import TableFeatureStore
    from fraudstream.streams.worker.table_state import FaustTableState, rocksdb_options

    with EmbeddedBroker(log_path=tmp / "tansu.log") as broker:
        uid = uuid.uuid4().hex[:8]
        app = faust.App(f"bench-{uid}", broker=f"kafka://{broker.bootstrap}",
                        store="rocksdb://", datadir=str(tmp / "faust"))
        sink = KafkaSink({"bootstrap.servers": broker.bootstrap})
        admin = AdminClient({"bootstrap.servers": broker.bootstrap})
        tables, stores = [], []
        for k, presence in enumerate(presences):
            table = app.Table(f"state{k}", default=None, key_type=bytes, value_type=bytes,
                              partitions=args.partitions,
                              options=rocksdb_options(Settings.from_env().worker))
            for fut in admin.create_topics([NewTopic(table.changelog_topic.get_topic_name(),
                                                     args.partitions, 1)]).values():
                fut.result(15)
            state = FaustTableState(table, f"transactions-{uid}-{k}", sink, end_marker=True)
            tables.append(table)
            stores.append(TableFeatureStore(state, owned=lambda: range(args.partitions),
                                            cache_mb=args.cache_mb, presence=presence))
        results = _run_many(stores, txns, args.batch, args.partitions)
        for store, out in zip(stores, results, strict=True):
            reads = store.cache_hits + store.cache_misses
            out["cache_hit_rate"] = store.cache_hits / reads if reads else 0.0
            out["card_bytes"] = _card_bytes(store, cards, args.partitions)
        for table in tables:
            for db in table.data._dbs.values():
                db.close()
        sink.producer.flush(5)
        return results


def _redis_cost(txns: list[dict[str, Any]], cards: list[str], args: argparse.Namespace,
                tmp: Path) -> dict[str, Any]:
    from fraudstream.streams.embedded.broker import free_port
    from fraudstream.streams.processes import die_with_parent, stop_process
    from fraudstream.streams.worker.redis_store import RedisStore

    proc = None
    url = args.redis_url
    if not url:
        port = free_port()
        proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                                 "--save", "", "--appendonly", "no"],
                                stdout=subprocess.DEVNULL, preexec_fn=die_with_parent)
        url = f"redis://127.0.0.1:{port}/0"
        time.sleep(0.5)
    try:
        store = RedisStore(url, f"bench-{uuid.uuid4().hex[:6]}", args.partitions,
                           timeout_ms=2000)
        out = _run(store, txns, args.batch, args.partitions)
        out["card_bytes"] = _card_bytes(store, cards, args.partitions)
        return out
    finally:
        if proc is not None:
            stop_process(proc, 5.0)


# ---------------------------------------------------------------------------- scale

def scale(args: argparse.Namespace) -> dict[str, Any]:
    from confluent_kafka import Producer

    from fraudstream.state.records import sections
    from fraudstream.streams.embedded.broker import EmbeddedBroker
    from fraudstream.streams.embedded.registry import EmbeddedRegistry

    # Realistic card records: those of a generated history, reused across card ids.
    small = argparse.Namespace(**{**vars(args), "cards": 2000})
    store = MemoryStore(1)
    engine = FeatureEngine(FeatureConfig(), store)
    txns = _history(small)
    for i in range(0, len(txns), 500):
        out = engine.process([TxnEvent(0, i + j, t) for j, t in enumerate(txns[i:i + 500])])
        store.write(out.writes)
    templates = [v for (_p, k), v in store.data.items() if k.startswith(b"c|")]
    card_bytes = statistics.mean(len(t) for t in templates)
    sections(templates[0])  # they are readable records
    print(f"{len(templates)} template card records, mean {card_bytes:.0f} bytes",
          file=sys.stderr)

    work = Path(tempfile.mkdtemp(prefix="fraudstream-scale-"))
    result: dict[str, Any] = {"cards": args.cards, "record_bytes": card_bytes}
    try:
        with EmbeddedBroker(log_path=work / "tansu.log") as broker, EmbeddedRegistry() as reg:
            stack = fresh_stack(broker, reg, work, "scale", args.partitions)
            uid, settings, codecs = stack.uid, stack.settings, stack.codecs
            # Baseline: a worker with empty state, to its first decision.
            base = _time_to_first_decision(settings.replace(
                worker={"app_id": f"scale-empty-{uid}", "data_dir": work / "empty"}),
                codecs, work / "empty.log")
            print(f"empty state: first decision after {base['seconds']:.1f} s", file=sys.stderr)
            changelog = f"{settings.worker.app_id}-state-changelog"
            _fill_changelog(settings, changelog, templates, args.cards, Producer)
            fresh = _time_to_first_decision(settings, codecs, work / "fresh.log")
            disk = _du(settings.worker.data_dir)
            print(f"{args.cards} cards, fresh data dir: first decision after "
                  f"{fresh['seconds']:.1f} s, RSS {fresh['rss_mb']:.0f} MB "
                  f"({fresh['rss_file_mb']:.0f} MB of it mapped files), RocksDB "
                  f"{disk / args.cards:.0f} bytes/card", file=sys.stderr)
            kept = _time_to_first_decision(settings, codecs, work / "restart.log",
                                           traffic=args.traffic, cards=args.cards)
            print(f"restart with the data dir kept: first decision after "
                  f"{kept['seconds']:.1f} s, RSS {kept['rss_mb']:.0f} MB "
                  f"({kept['rss_file_mb']:.0f} MB mapped files); after "
                  f"{kept.get('traffic', 0)} transactions on random cards "
                  f"({kept.get('traffic_rate', 0):.0f}/s) RSS "
                  f"{kept.get('rss_after_traffic_mb', 0):.0f} MB "
                  f"({kept.get('rss_file_after_traffic_mb', 0):.0f} MB mapped files)",
                  file=sys.stderr)
            result.update({
                "empty_state": base, "fresh_recovery": fresh, "restart": kept,
                "recovery_s_fresh": fresh["seconds"] - base["seconds"],
                "recovery_s_restart": kept["seconds"] - base["seconds"],
                "rocksdb_bytes_per_card": disk / args.cards,
            })
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return result


def _fill_changelog(settings: Any, changelog: str, templates: list[bytes], n: int,
                    producer_cls: Any) -> None:
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient(settings.kafka.client_config())
    for fut in admin.create_topics([NewTopic(changelog, settings.kafka.partitions,
                                             1)]).values():
        fut.result(15)
    producer = producer_cls({**settings.kafka.client_config(), "linger.ms": 50,
                             "compression.type": "lz4", "queue.buffering.max.messages": 500_000})
    rng = random.Random(1)
    t0 = time.monotonic()
    parts = settings.kafka.partitions
    for i in range(n):
        key = b"c|card_%08d" % i
        while True:
            try:
                producer.produce(changelog, key=key, value=rng.choice(templates),
                                 partition=i % parts)
                break
            except BufferError:
                producer.poll(0.05)
    producer.flush(120)
    for p in range(parts):  # the worker's end marker, in a batch of its own (embedded broker)
        producer.produce(changelog, key=b"\x00fraudstream:end-marker", value=None, partition=p)
    producer.flush(120)
    print(f"{n} card records in the changelog in {time.monotonic() - t0:.1f} s",
          file=sys.stderr)


def _time_to_first_decision(settings: Any, codecs: Any, log: Path, traffic: int = 0,
                            cards: int = 1) -> dict[str, float]:
    """Start a worker, send one transaction, wait for its decision; seconds and RSS. Then
    ``traffic`` transactions on random cards among ``cards``: the RSS after them."""
    from confluent_kafka import OFFSET_END, Consumer, Producer

    from fraudstream.streams.processes import die_with_parent, stop_process
    from fraudstream.streams.topics import assign_all

    env = {k: v for k, v in os.environ.items() if not k.startswith("FRAUDSTREAM_")}
    env.update(settings.to_env())
    consumer = Consumer(settings.kafka.consumer_config(f"probe-{uuid.uuid4().hex[:6]}"))
    assign_all(consumer, [settings.topics.decisions], OFFSET_END)
    consumer.consume(1, 1.0)
    txn_id = f"probe-{uuid.uuid4().hex[:8]}"
    now = int(time.time() * 1000)
    probe = {"transaction_id": txn_id, "event_time": now, "card_id": "card_00000007",
             "customer_id": None, "merchant_id": "m1", "terminal_id": None, "amount": 10.0,
             "currency": "EUR", "mcc": "5411", "country": "FR", "card_country": "FR",
             "lat": None, "lon": None, "device_id": None, "ip": None, "channel": "pos"}
    producer = Producer(settings.kafka.client_config())
    t0 = time.monotonic()
    with open(log, "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "fraudstream", "worker"], env=env,
                                cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, preexec_fn=die_with_parent)
    producer.produce(settings.topics.transactions, key=b"card_00000007",
                     value=codecs.transaction.encode(probe))
    producer.flush(10)
    seconds = None
    try:
        while time.monotonic() - t0 < 600 and proc.poll() is None:
            for m in consumer.consume(100, 0.2):
                if not m.error() and m.key() == txn_id.encode():
                    seconds = time.monotonic() - t0
            if seconds is not None:
                break
        if seconds is None:
            raise RuntimeError(f"no decision from the worker; see {log}")
        time.sleep(2.0)
        result = {"seconds": seconds, "rss_mb": rss_kb(proc.pid) / 1024.0,
                  "rss_file_mb": rss_file_kb(proc.pid) / 1024.0}
        if traffic:
            rng = random.Random(7)
            t1 = time.monotonic()
            for i in range(traffic):
                card = f"card_{rng.randrange(cards):08d}"
                value = codecs.transaction.encode({**probe, "transaction_id": f"{txn_id}-{i}",
                                                   "card_id": card,
                                                   "amount": 5.0 + rng.random() * 100})
                while True:
                    try:
                        producer.produce(settings.topics.transactions, key=card.encode(),
                                         value=value)
                        break
                    except BufferError:
                        producer.poll(0.05)
            producer.flush(60)
            seen = 0
            while seen < traffic and time.monotonic() - t1 < 300 and proc.poll() is None:
                seen += sum(1 for m in consumer.consume(1000, 0.5) if not m.error())
            result["traffic"] = seen
            result["traffic_rate"] = seen / (time.monotonic() - t1)
            result["rss_after_traffic_mb"] = rss_kb(proc.pid) / 1024.0
            result["rss_file_after_traffic_mb"] = rss_file_kb(proc.pid) / 1024.0
    finally:
        stop_process(proc, 30.0)
        consumer.close()
    return result


def _du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fraudstream.loadtest.features",
                                description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="mode", required=True)
    c = sub.add_parser("cost", help="feature cost per event, per backend")
    c.add_argument("--backends", nargs="+", default=["memory", "rocksdb", "redis"],
                   choices=["memory", "rocksdb", "rocksdb-all", "redis"],
                   help="rocksdb-all: RocksDB reading a device's and an IP's partials from "
                   "every partition (FRAUDSTREAM_FEATURES_PRESENCE=false)")
    c.add_argument("--paired", action="store_true",
                   help="rocksdb and rocksdb-all in one process, batches alternated, and "
                   "their per-batch time ratio (--backends ignored)")
    c.add_argument("--redis-url", default="")
    c.add_argument("--repeat", type=int, default=3, help="rounds over the backends")
    c.add_argument("--cache-mb", type=float, default=FeatureSettings().cache_mb,
                   help="the RocksDB backend's record cache (FRAUDSTREAM_FEATURES_CACHE_MB)")
    c.add_argument("--gc-gen0", type=int, default=0,
                   help="tune the garbage collector as the worker does with this gen0 "
                   "threshold (FRAUDSTREAM_WORKER_GC_GEN0_THRESHOLD; 0: Python's defaults)")
    s = sub.add_parser("scale", help="1M cards: bytes per card, RSS, recovery time")
    s.add_argument("--traffic", type=int, default=50_000,
                   help="transactions on random cards after the restart, for the RSS")
    for q in (c, s):
        q.add_argument("--cards", type=int, default=2000 if q is c else 1_000_000)
        q.add_argument("--days", type=float, default=3.0)
        q.add_argument("--per-day", type=int, default=20_000)
        q.add_argument("--batch", type=int, default=500)
        q.add_argument("--partitions", type=int, default=4)
        q.add_argument("--seed", type=int, default=1)
        q.add_argument("--out", type=Path, default=ROOT / "results")
    args = p.parse_args(argv)
    result = cost(args) if args.mode == "cost" else scale(args)
    write_result(args.out, f"features-{args.mode}", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
