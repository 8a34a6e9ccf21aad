"""``python -m fraudstream.loadtest.replay``: how fast ``fraudstream replay`` goes, and its memory.

On one embedded broker and registry: ``--events`` generated transactions spread over
``--days`` of event time (and their labels, at their label times) are produced to
``transactions`` and ``labels``; two model versions are trained on another generated
history (or ``--models`` names a registry with an ACTIVE version and ``--challenger``);
then ``fraudstream replay --from 0`` runs as a process over the whole range and publishes
the challenger's decisions. Reports its wall time, transaction records per second and
peak RSS (``ru_maxrss`` of the replay process), and writes JSON to ``results/``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from confluent_kafka import Producer

from fraudstream.loadtest.harness import fresh_stack
from fraudstream.schemas.codec import Codecs
from fraudstream.streams.embedded.broker import EmbeddedBroker
from fraudstream.streams.embedded.registry import EmbeddedRegistry
from fraudstream.streams.settings import Settings
from fraudstream.streams.traffic.generator import DAY_MS, TrafficGenerator
from fraudstream.streams.traffic.world import GeneratorConfig

ROOT = Path(__file__).resolve().parent.parent
#: The models' training history starts here, not at a time taken from the clock: how
#: many frauds fall in the test window depends on where the history starts, and one
#: started from the clock left it with none at some hours.
TRAIN_START_MS = 1_793_491_200_000  # 2026-11-01T00:00:00Z


def produce_history(settings: Settings, codecs: Codecs, n: int, days: float, cards: int,
                    seed: int) -> int:
    """``n`` transactions over ``days`` ending now, labels as they fall due; returns the
    number of labels."""
    gen = TrafficGenerator(GeneratorConfig(seed=seed, n_cards=cards,
                                           id_prefix=f"rp{uuid.uuid4().hex[:6]}"))
    producer = Producer({**settings.kafka.client_config(), "linger.ms": 20})
    start = int(time.time() * 1000) - int(days * DAY_MS)
    step = days * DAY_MS / n
    labels = 0

    def send(topic: str, key: bytes, value: bytes) -> None:
        while True:
            try:
                producer.produce(topic, key=key, value=value)
                return
            except BufferError:
                producer.poll(0.05)

    for i in range(n):
        now = start + int(i * step)
        for lab in gen.due_labels(now):
            send(settings.topics.labels, lab["card_id"].encode(), codecs.label.encode(lab))
            labels += 1
        txn = gen.next_transaction(now)
        send(settings.topics.transactions, txn["card_id"].encode(),
             codecs.transaction.encode(txn))
        if i % 100_000 == 0:
            print(f"  produced {i:,}", flush=True)
    assert producer.flush(120) == 0
    return labels


def train_two(root: Path) -> tuple[str, str]:
    from fraudstream.scorers import train as T
    from fraudstream.scorers.registry import Registry
    from fraudstream.scorers.rules import RuleSet, RulesScorer
    from fraudstream.streams.traffic.generator import arrival_events, generate_history

    for seed in (5, 6):
        txns, labels = generate_history(GeneratorConfig(seed=seed, n_cards=2000),
                                        TRAIN_START_MS, 8.0, 4000)
        T.train(arrival_events(txns, labels), root, T.TrainConfig(trees=100, seed=seed),
                f"{seed:02d}" * 32, RulesScorer(RuleSet.default()))
        time.sleep(1.0)  # versions are named by the second
    reg = Registry(root)
    first, second = reg.versions()[-2:]
    reg.promote(first)
    return first, second


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fraudstream.loadtest.replay",
                                description=__doc__.split("\n")[0])
    p.add_argument("--events", type=int, default=1_000_000)
    p.add_argument("--days", type=float, default=10.0)
    p.add_argument("--cards", type=int, default=50_000)
    p.add_argument("--partitions", type=int, default=4)
    p.add_argument("--seed", type=int, default=9)
    p.add_argument("--models", type=Path, default=None,
                   help="a registry with an ACTIVE version (default: train two)")
    p.add_argument("--challenger", default=None, help="with --models")
    p.add_argument("--online", choices=("learn", "off"), default="learn")
    p.add_argument("--processes", type=int, nargs="+", choices=(1, 2), default=[2],
                   help="replay once per value on the same history (fraudstream replay "
                        "--processes): 2 decides in a second process")
    p.add_argument("--results", type=Path, default=ROOT / "results")
    args = p.parse_args(argv)

    workdir = Path(tempfile.mkdtemp(prefix="fraudstream-replay-bench-"))
    args.results.mkdir(parents=True, exist_ok=True)
    result: dict = {"events": args.events, "days": args.days, "cards": args.cards,
                    "partitions": args.partitions, "online": args.online,
                    "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if args.models is None:
        print("training two model versions...", flush=True)
        args.models = workdir / "models"
        champion, challenger = train_two(args.models)
    else:
        from fraudstream.scorers.registry import ACTIVE, Registry

        champion, challenger = Registry(args.models).pointer(ACTIVE), args.challenger
        if champion is None or challenger is None:
            p.error("--models needs an ACTIVE version and --challenger")
    result |= {"champion": champion, "challenger": challenger}
    with EmbeddedBroker(log_path=workdir / "broker.log") as broker, EmbeddedRegistry() as reg:
        stack = fresh_stack(broker, reg, workdir, "replay-bench", args.partitions,
                            scoring={"models_dir": args.models})
        settings, codecs = stack.settings, stack.codecs
        print(f"producing {args.events:,} transactions over {args.days} days...", flush=True)
        t0 = time.monotonic()
        result["labels"] = produce_history(settings, codecs, args.events, args.days,
                                           args.cards, args.seed)
        result["produce_s"] = time.monotonic() - t0

        env = {k: v for k, v in os.environ.items() if not k.startswith("FRAUDSTREAM_")}
        env.update(settings.to_env())
        runs = []
        for i, processes in enumerate(args.processes):
            print(f"replaying with {processes} process(es)...", flush=True)
            out = workdir / f"report-{i}"
            t0 = time.monotonic()
            proc = subprocess.run(
                [sys.executable, "-m", "fraudstream", "replay", "--from", "0", "--champion",
                 champion, "--challenger", challenger, "--online", args.online,
                 "--processes", str(processes), "--replay-id", f"bench-{i}",
                 "--out", str(out)], cwd=ROOT, env=env)
            wall = time.monotonic() - t0
            if proc.returncode != 0:
                print(f"replay failed ({proc.returncode})", file=sys.stderr)
                return 1
            data = json.loads((out / "result.json").read_text())
            runs.append({"processes": processes, "wall_s": wall, "replay_s": data["seconds"],
                         "counts": data["counts"], "records_per_s": data["records_per_s"],
                         "fallbacks": data["fallbacks"], "peak_rss_mb": data["peak_rss_mb"],
                         "stage_us_per_record": data["stage_us_per_record"],
                         "by_tenth": data["by_tenth"],
                         "flipped": data["flipped"], "quality": data.get("quality"),
                         "report": str(out / "report.md")})
    result["runs"] = runs
    print()
    for run in runs:
        c, rss = run["counts"], run["peak_rss_mb"]
        print(f"replay of {c['read']:,} transactions ({result['labels']:,} labels, "
              f"{args.partitions} partitions, online {args.online}, "
              f"{run['processes']} process(es)):")
        print(f"  {run['replay_s']:.1f} s in the replay loop, {run['wall_s']:.1f} s for the "
              f"process (start, model loading, report): {run['records_per_s']:,.0f} records/s")
        falls = run["fallbacks"]
        champ = {k: v for k, v in falls.items() if not k.startswith("shadow")}
        chall = {k: v for k, v in falls.items() if k.startswith("shadow")}
        print(f"  decided {c['decided']:,}; fallbacks by cause: the champion's {champ}, "
              f"the challenger's {chall}")
        deciding = rss["deciding"] or 0.0
        print(f"  peak RSS: reading process {rss['reading']:,.0f} MB"
              + (f" + deciding process {deciding:,.0f} MB = {rss['reading'] + deciding:,.0f} MB"
                 if rss["deciding"] is not None else ""))
        tenths = run["by_tenth"]
        if tenths:
            rates = [t["records_per_s"] for t in tenths]
            print("  records/s by tenth of the range: "
                  + ", ".join(f"{r:,.0f}" for r in rates)
                  + f"; slowest/fastest {min(rates) / max(rates):.2f}, last/first "
                  f"{rates[-1] / rates[0]:.2f}")
            print("  labels fed by tenth (to the features and the learners): "
                  + ", ".join(f"{t['labels']:,}" for t in tenths))
        print(f"  report: {run['report']}")
    if len(runs) > 1:
        same = all((r["flipped"], r["quality"]) == (runs[0]["flipped"], runs[0]["quality"])
                   for r in runs)
        print(f"same flips and quality in every run: {same}")
    path = args.results / f"replay-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(result, indent=2, default=str))
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
