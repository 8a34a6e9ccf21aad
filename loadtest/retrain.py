"""``python -m fraudstream.loadtest.retrain``: how fast ``fraudstream retrain`` reads and
trains on the live topics, and how its memory grows with the history.

On one embedded broker and registry, ``--events`` generated transactions over ``--days``
of event time, with their labels, are produced to ``transactions`` and ``labels`` (as
``loadtest.replay`` does). Then ``fraudstream retrain`` runs as a process twice, on the
first half of every partition (``--to``, an offset) and on all of it. Reports each run's
wall time, transactions per second and peak RSS (``ru_maxrss``), and the growth of the
peak per transaction between the two: the memory a longer history costs. With
``--genuine-sample SHARE`` it runs on all of it twice instead, first keeping that share
of the training window's unlabelled transactions, then every one (event-time bounds
around the history), with the test window's measures of both. Writes JSON to ``results/``.
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
    p.add_argument("--genuine-sample", type=float, default=None, metavar="SHARE",
                   help="compare a retraining on all of the history with one keeping this "
                        "share of its unlabelled training transactions")
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
        first = int(time.time() * 1000) - int(args.days * 86_400_000) - 3_600_000
        result["labels"] = produce_history(settings, codecs, args.events, args.days,
                                           args.cards, args.seed)
        last = int(time.time() * 1000) + 3_600_000
        env = {k: v for k, v in os.environ.items() if not k.startswith("FRAUDSTREAM_")}
        env.update(settings.to_env())
        half = args.events // (2 * args.partitions)
        runs = [("half", ["--from", "0", "--to", str(half)]), ("all", ["--from", "0"])]
        if args.genuine_sample is not None:
            bounds = ["--event-time", "--from", f"@{first}", "--to", f"@{last}"]
            # the sampled one first: the peak below is the largest of the runs so far
            runs = [(f"all, genuine sample {args.genuine_sample:g}",
                     [*bounds, "--genuine-sample", str(args.genuine_sample)]), ("all", bounds)]
        for name, bound in runs:
            print(f"retrain on {name} of the history...", flush=True)
            t0 = time.monotonic()
            proc = subprocess.Popen(
                [sys.executable, "-m", "fraudstream", "retrain", *bound,
                 "--out", str(workdir / "models"), "--trees", str(args.trees), "--quiet",
                 "--no-upload"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                stderr=subprocess.PIPE, text=True)
            out, err = proc.communicate()
            wall = time.monotonic() - t0
            # the largest peak of the children waited for so far: this run's, as each
            # takes more than the one before
            peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
            if proc.returncode != 0:
                print(err[-3000:], file=sys.stderr)
                return 1
            meta = json.loads(out)
            n = sum(w["transactions"] for w in meta["windows"].values())
            test = meta["test"]["ensemble"]
            run = {"range": name, "transactions": n, "wall_s": round(wall, 1),
                   "per_s": round(n / wall), "peak_rss_mb": round(peak_mb),
                   "test_ap": test["average_precision"], "test_auc": test["auc_roc"],
                   "test_card_precision": test.get("card_precision_at_100")}
            result["runs"].append(run)
            print(f"  {n:,} transactions in {wall:.1f} s ({n / wall:,.0f}/s, process "
                  f"start, reading, features, training and report), peak RSS "
                  f"{peak_mb:,.0f} MB; test AP {test['average_precision']:.4f}, AUC "
                  f"{test['auc_roc']:.4f}", flush=True)
    if args.genuine_sample is not None:
        path = args.results / f"retrain-sample-{time.strftime('%Y%m%d-%H%M%S')}.json"
        path.write_text(json.dumps(result, indent=2, default=str))
        print(f"results: {path}")
        return 0
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
