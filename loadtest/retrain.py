"""``python -m fraudstream.loadtest.retrain``: how fast ``fraudstream retrain`` reads and
trains on the live topics, and how its memory grows with the history.

On one embedded broker and registry, ``--events`` generated transactions over ``--days``
of event time, with their labels, are produced to ``transactions`` and ``labels`` (as
``loadtest.replay`` does). Then ``fraudstream retrain`` runs as a process twice, on the
first half of every partition (``--to``, an offset) and on all of it. Reports each run's
wall time, transactions per second and peak RSS (``ru_maxrss``), and the growth of the
peak per transaction between the two: the memory a longer history costs. Writes JSON to
``results/``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fraudstream.loadtest.harness import fresh_stack
from fraudstream.loadtest.replay import produce_history
from fraudstream.streams.embedded.broker import EmbeddedBroker
from fraudstream.streams.embedded.registry import EmbeddedRegistry

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fraudstream.loadtest.retrain",
                                description=__doc__.split("\n")[0])
    p.add_argument("--events", type=int, default=400_000)
    p.add_argument("--days", type=float, default=20.0)
    p.add_argument("--cards", type=int, default=50_000)
    p.add_argument("--partitions", type=int, default=4)
    p.add_argument("--trees", type=int, default=100)
    p.add_argument("--seed", type=int, default=9)
    p.add_argument("--results", type=Path, default=ROOT / "results")
    args = p.parse_args(argv)

    workdir = Path(tempfile.mkdtemp(prefix="fraudstream-retrain-bench-"))
    args.results.mkdir(parents=True, exist_ok=True)
    result: dict = {"events": args.events, "days": args.days, "cards": args.cards,
                    "partitions": args.partitions, "trees": args.trees,
                    "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "runs": []}
    with EmbeddedBroker(log_path=workdir / "broker.log") as broker, EmbeddedRegistry() as reg:
        stack = fresh_stack(broker, reg, workdir, "retrain-bench", args.partitions)
        settings, codecs = stack.settings, stack.codecs
        print(f"producing {args.events:,} transactions over {args.days} days...", flush=True)
        result["labels"] = produce_history(settings, codecs, args.events, args.days,
                                           args.cards, args.seed)
        env = {k: v for k, v in os.environ.items() if not k.startswith("FRAUDSTREAM_")}
        env.update(settings.to_env())
        half = args.events // (2 * args.partitions)
        for name, bound in (("half", ["--to", str(half)]), ("all", [])):
            print(f"retrain on {name} of the history...", flush=True)
            t0 = time.monotonic()
            proc = subprocess.run(
                [sys.executable, "-m", "fraudstream", "retrain", "--from", "0", *bound,
                 "--out", str(workdir / "models"), "--trees", str(args.trees), "--quiet",
                 "--no-upload"], cwd=ROOT, env=env, capture_output=True, text=True)
            wall = time.monotonic() - t0
            # the largest peak of the children waited for so far: this run's, as each
            # reads more than the one before
            peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
            if proc.returncode != 0:
                print(proc.stderr[-3000:], file=sys.stderr)
                return 1
            meta = json.loads(proc.stdout)
            n = sum(w["transactions"] for w in meta["windows"].values())
            run = {"range": name, "transactions": n, "wall_s": round(wall, 1),
                   "per_s": round(n / wall), "peak_rss_mb": round(peak_mb),
                   "test_ap": meta["test"]["ensemble"]["average_precision"]}
            result["runs"].append(run)
            print(f"  {n:,} transactions in {wall:.1f} s ({n / wall:,.0f}/s, process "
                  f"start, reading, features, training and report), peak RSS "
                  f"{peak_mb:,.0f} MB", flush=True)
    a, b = result["runs"]
    slope = (b["peak_rss_mb"] - a["peak_rss_mb"]) * 2**20 / max(1, b["transactions"]
                                                               - a["transactions"])
    result["rss_bytes_per_transaction"] = round(slope)
    print(f"peak RSS grows {slope:,.0f} bytes per transaction of history")
    path = args.results / f"retrain-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(result, indent=2, default=str))
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
