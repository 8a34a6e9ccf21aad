"""``python -m fraudstream.loadtest``: how fast one worker decides, and up to what rate it keeps up.

One registry; the first phase (1-3) on one embedded broker and worker, then each live
run (4-6) on a broker and worker of its own:

1. **Pre-produce** ``--events`` generated transactions (``fraudstream.streams.traffic.generator``).
2. **Baselines** on those same records, each a subprocess timed from its first record
   to its last: (a) a bare Faust agent that only consumes (loadtest/bare_faust.py);
   (b) a plain confluent-kafka loop: consume batches of 500, decode the Avro transaction
   with the project's codec, produce one small record each to a scratch topic
   (loadtest/baseline_kafka.py); (c) the Quix Streams stateful peer: Avro decode, per-card
   count and sum of amounts in RocksDB state with a changelog, one output record per
   transaction (loadtest/quix_peer.py). quixstreams lives in an environment of its own
   (``make bench-deps``: it pins an older confluent-kafka than the project); without it
   the peer is skipped, and the run says so and how to install it.
3. **Backlog drain**: ``fraudstream worker`` (rules, or the full cascade with ``--models``)
   decides the same records; its rate is taken on the decisions topic, first decision to
   last (group join excluded), and given as a ratio to the Quix peer's.

**Who decided**: every worker rate (drain, steps, saturation, latency runs) comes with how
many of its decisions the model made, how many the rules made by design (no model), and
how many fell back to the rules, by cause (``timeout``, ``busy``, ...), read from the
decisions it was measured on (loadtest/decided_by.py). A rate whose decisions fell back
measures features plus rules, not the model.
4. **Step mode** (``--steps``, on by default): the worker under open-loop Poisson
   traffic at increasing rates (``--step-start`` x ``--step-factor`` per step, or
   + ``--step-increment``), ``--step-seconds`` each. Open loop: the send times are drawn
   before the step (exponential gaps, seeded with ``--seed``) and never wait for
   decisions; the transactions are generated and encoded before the step too, so the
   sender only calls produce(). Every send is recorded; how late the sender was against
   its schedule is reported per step. After each step the worker drains: the step ends
   once every transaction sent got its decision (or after ``--drain-timeout``).
5. **Latency at 70% of saturation**: one more run at 0.7x the saturation rate (by budget;
   if no step met the budget, 0.7x the lag-only saturation, and the result says so).
6. ``--latency-ratios``: optional extra runs at fixed ratios of the backlog drain rate.

**Fresh broker per live run** (default): after the backlog drain its worker and broker
stop. Each live run then starts a new embedded broker (same topic names, created anew;
the registry is kept), a new worker (new app id and group, empty data dir, the same
models and batch max), waits until ``WARMUP`` transactions got decisions (not measured),
runs, drains, and stops both. Tansu lists every stored record batch of a partition on each
fetch, so on a shared broker each run would pay for the batches of all those before it.
``--shared-broker``: the old method, every live run on the drain's broker and worker.

**Latency**: end-to-end = decision received by this process minus the transaction's Kafka
timestamp (the decision's ``source_timestamp``); "until decided" = the decision's
``decided_at - source_timestamp``. A run's percentiles cover every decision of the
transactions it sent, including those that arrived while it drained.

**Backlog** = transactions sent minus decisions received, sampled every 0.1 s. Consumer lag
read from the embedded broker is not used: Tansu understates high watermarks.

**Lag rule**: a step's lag grew when both hold:
- over the second half of its sending window, the decided rate is below 97% of the sent
  rate (slopes of least-squares lines through the received and sent counts), and
- at the end of its sending window the backlog is above 0.5 s of traffic at the step rate.
In steady state the backlog is rate x mean latency (Little's law) and does not trend;
the first condition catches a trend, the second ignores one too small to matter (or
the noise of decisions arriving in batches). A step whose backlog did not drain within
``--drain-timeout`` also counts as grown.

**Saturation** (by budget) = the highest step rate whose end-to-end p99 is within the
budget (``--budget-ms``, default ``settings.scoring.budget_ms``; the worker gets the same
budget) and whose lag did not grow. **Lag-only saturation** = the highest step rate whose
lag did not grow, whatever its p99. Both are reported as ratios to each baseline, as is
the backlog drain rate. Stepping stops after ``--stop-after`` consecutive steps that fail
both criteria, after two consecutive steps whose lag grew, after a step that did not
drain, or after ``--max-steps``.

**RSS**: each worker's VmRSS (its process and its children, /proc) every 0.5 s from its
start to its stop: peak and at end; the summary gives the highest peak and whose it was.

Live progress goes to stderr, one line a second. The summary goes to stdout; everything
goes to ``results/bench-YYYYmmdd-HHMMSS/``: ``result.json`` and PNG plots
(loadtest/plots.py). Numbers depend on this machine's load: compare ratios of one run.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from fraudstream.loadtest.baselines import run_baselines, run_quix
from fraudstream.loadtest.drain import backlog_drain
from fraudstream.loadtest.harness import ROOT, _progress, fresh_stack, pre_produce
from fraudstream.loadtest.live import LAG_BACKLOG_S, LAG_RATE_RATIO, SAMPLE_S, LiveTraffic
from fraudstream.loadtest.report import finish
from fraudstream.loadtest.rss import RssSampler
from fraudstream.loadtest.runs import WARMUP, FreshRuns, Runs, SharedRuns
from fraudstream.loadtest.steps import live_runs
from fraudstream.streams.embedded.broker import EmbeddedBroker, free_port
from fraudstream.streams.embedded.registry import EmbeddedRegistry
from fraudstream.streams.settings import Settings, WorkerSettings
from fraudstream.streams.traffic.generator import TrafficGenerator
from fraudstream.streams.traffic.world import GeneratorConfig

#: defaults, and those of --quick (a smoke run of 1-2 minutes)
DEFAULTS = {"events": 50_000, "step_seconds": 15.0, "max_steps": 12, "latency_seconds": 30.0,
            "stop_after": 2, "drain_timeout": 60.0}
QUICK = {"events": 10_000, "step_seconds": 8.0, "max_steps": 5, "latency_seconds": 10.0,
         "stop_after": 1, "drain_timeout": 30.0}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m fraudstream.loadtest",
                                     description=__doc__.split("\n")[0].replace("``", ""))
    parser.add_argument("--quick", action="store_true",
                        help="a 1-2 minute smoke run: " + ", ".join(
                            f"--{k.replace('_', '-')} {v:g}" for k, v in QUICK.items()))
    parser.add_argument("--events", type=int, help=f"pre-produced (default {DEFAULTS['events']})")
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--results", type=Path, default=ROOT / "results",
                        help="a bench-YYYYmmdd-HHMMSS/ folder is made in it")
    parser.add_argument("--batch-max", type=int, default=500,
                        help="FRAUDSTREAM_WORKER_BATCH_MAX of the worker")
    parser.add_argument("--batch-share", type=float, default=WorkerSettings().batch_share,
                        help="FRAUDSTREAM_WORKER_BATCH_SHARE of the worker")
    parser.add_argument("--backlog-batches", type=float,
                        default=WorkerSettings().backlog_batches,
                        help="FRAUDSTREAM_WORKER_BACKLOG_BATCHES of the worker")
    parser.add_argument("--backlog-batch-max", type=int,
                        default=WorkerSettings().backlog_batch_max,
                        help="FRAUDSTREAM_WORKER_BACKLOG_BATCH_MAX of the worker")
    parser.add_argument("--align-wait-ms", type=float,
                        default=WorkerSettings().align_wait_ms,
                        help="FRAUDSTREAM_WORKER_ALIGN_WAIT_MS of the worker (0: no "
                             "event-time alignment)")
    parser.add_argument("--models", type=Path, default=None,
                        help="a model registry with an ACTIVE version (the full cascade); "
                             "default: the rules alone")
    parser.add_argument("--budget-ms", type=float, default=Settings().scoring.budget_ms,
                        help="end-to-end p99 budget for saturation, also the worker's "
                             "FRAUDSTREAM_SCORING_BUDGET_MS (default %(default)g)")
    parser.add_argument("--steps", action=argparse.BooleanOptionalAction, default=True,
                        help="step mode (default on)")
    parser.add_argument("--step-start", type=float, default=500.0, help="first rate, /s")
    parser.add_argument("--step-factor", type=float, default=1.5, help="rate x this per step")
    parser.add_argument("--step-increment", type=float, default=0.0,
                        help="rate + this per step instead of the factor")
    parser.add_argument("--step-seconds", type=float,
                        help=f"sending time per step (default {DEFAULTS['step_seconds']:g})")
    parser.add_argument("--max-steps", type=int,
                        help=f"default {DEFAULTS['max_steps']}")
    parser.add_argument("--stop-after", type=int,
                        help="stop after this many steps in a row that fail both criteria "
                             f"(default {DEFAULTS['stop_after']})")
    parser.add_argument("--drain-timeout", type=float,
                        help="seconds to wait for the backlog to drain after a run "
                             f"(default {DEFAULTS['drain_timeout']:g})")
    parser.add_argument("--latency-seconds", type=float,
                        help="the 70%% run and each --latency-ratios run "
                             f"(default {DEFAULTS['latency_seconds']:g})")
    parser.add_argument("--latency-ratios", default=[],
                        type=lambda v: [float(x) for x in v.split(",") if x.strip()],
                        help="extra latency runs at these x the backlog drain rate, "
                             "e.g. 0.1,0.25 (default none)")
    parser.add_argument("--quix", action=argparse.BooleanOptionalAction, default=True,
                        help="run the Quix Streams stateful peer (default on; skipped with a "
                             "note when quixstreams is not installed: make bench-deps)")
    parser.add_argument("--quix-python", type=Path, default=None,
                        help="the interpreter that imports quixstreams (default: "
                             ".venv-quix/bin/python, else this one)")
    parser.add_argument("--replica", action=argparse.BooleanOptionalAction, default=True,
                        help="the worker's entity replica (FRAUDSTREAM_FEATURES_REPLICA; "
                             "default on)")
    parser.add_argument("--shared-broker", action="store_true",
                        help="run every live run on the backlog drain's broker and worker "
                             "(the old method; default: a fresh broker and worker per run)")
    args = parser.parse_args()
    for key, default in DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, QUICK[key] if args.quick else default)
    if args.step_factor <= 1 and args.step_increment <= 0:
        parser.error("--step-factor must be > 1 (or give --step-increment)")
    return args


def main() -> int:
    args = parse_args()
    # the sender and the reader share this process: switch threads more often than the
    # default 5 ms, so neither holds the other's timestamps back by that much
    sys.setswitchinterval(0.001)
    workdir = Path(tempfile.mkdtemp(prefix="fraudstream-bench-"))
    out_dir = args.results / f"bench-{time.strftime('%Y%m%d-%H%M%S')}"
    out_dir.mkdir(parents=True, exist_ok=False)
    budget = args.budget_ms
    result: dict[str, Any] = {
        "events": args.events, "partitions": args.partitions, "seed": args.seed,
        "batch_max": args.batch_max, "backlog_batch_max": args.backlog_batch_max,
        "budget_ms": budget,
        "models": str(args.models) if args.models else None,
        "step_seconds": args.step_seconds if args.steps else None,
        "broker": "shared" if args.shared_broker else "fresh per run",
        "warm_up_transactions": None if args.shared_broker else WARMUP,
        "lag_rule": {"decided_over_sent_below": LAG_RATE_RATIO,
                     "backlog_end_above_s": LAG_BACKLOG_S, "sample_s": SAMPLE_S},
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "loadavg": {"start": os.getloadavg()}, "cpus": os.cpu_count(),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "workdir": str(workdir),
    }
    what = "features, rules, model, online" if args.models else "features, rules"
    # send times and transactions of the live runs: the same in both broker modes
    rng = random.Random(args.seed)
    gen = TrafficGenerator(GeneratorConfig(seed=args.seed + 1,
                                           id_prefix=f"l{uuid.uuid4().hex[:6]}"))
    samplers: list[RssSampler] = []
    runs: Runs | None = None
    with EmbeddedRegistry() as reg:
        with EmbeddedBroker(log_path=workdir / "broker.log") as broker:
            stack = fresh_stack(
                broker, reg, workdir, "bench", args.partitions,
                worker={"batch_max": args.batch_max, "batch_share": args.batch_share,
                        "backlog_batches": args.backlog_batches,
                        "backlog_batch_max": args.backlog_batch_max,
                        "align_wait_ms": args.align_wait_ms,
                        "metrics_port": free_port()},
                scoring={"models_dir": args.models or workdir / "no-models",
                         "budget_ms": budget},
                features={"replica": args.replica})
            uid, settings, codecs = stack.uid, stack.settings, stack.codecs
            _progress(f"producing {args.events:,} generated transactions...")
            pre_produce(settings, codecs, args.events, args.seed)

            run_baselines(settings, workdir, uid, args.events, result)
            run_quix(settings, workdir, uid, args.events, result, args.quix_python,
                     enabled=args.quix)

            with backlog_drain(settings, codecs, workdir, args.events, samplers,
                               result) as (worker, rss):
                if args.shared_broker:
                    # only once the backlog is decided: live traffic starts on an idle worker
                    runs = SharedRuns(LiveTraffic(
                        settings, codecs, rng, gen, worker,
                        broker.process.pid if broker.process else None), rss)
                    try:
                        live_runs(runs, args, budget, result)
                    finally:
                        runs.close()
        if not args.shared_broker:
            # every live run on an empty broker: Tansu's fetch cost grows with the record
            # batches it holds (docs/performance.md, "How to measure")
            _progress("live runs: each on a fresh broker and worker")
            runs = FreshRuns(settings, codecs, rng, gen, workdir, args.seed)
            try:
                live_runs(runs, args, budget, result)
            finally:
                runs.close()
    assert runs is not None
    finish(result, runs, samplers, out_dir, budget, what)
    return 0


if __name__ == "__main__":
    sys.exit(main())
