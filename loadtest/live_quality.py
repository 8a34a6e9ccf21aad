"""Are live decisions as good as the model? ``python -m fraudstream.loadtest.live_quality``

The "Done when" of live-versus-offline quality, measured on the project's generator:

1. a history of ``--days`` days (``--cards`` cards, ``--per-day`` transactions a day,
   labels late by ``--label-delay-days``, 3 on average by default, sd half of it) is
   made with a fixed start, so a run does not depend on the date;
2. ``train`` fits a model on explicit windows (warm-up day 0, train to day 12, valid
   days 12-14, test from a day more than the label delay after valid: day 18 by default)
   and evaluates it offline on the test window; the version is promoted in a fresh
   registry;
3. the whole history, labels included, is produced to 4 partitions of a fresh embedded
   broker before a ``fraudstream worker`` starts: a backlog, the case where partitions
   drain at different speeds and labels run ahead of transactions;
4. the worker decides every transaction (once with the online learners on, the default,
   once with them off); the decisions of the test window are read from ``decisions`` and
   scored against the final labels the same way the training report scores the model;
5. ``fraudstream replay`` (in process) replays the same topics with the model as
   champion, and its test window is scored the same way (``--no-replay``: skipped).

Prints AUC ROC, average precision and card precision@100/day, offline and live, the
differences, who decided (model or fallback, by cause) and how many live and replayed
scores differ from the offline model's score of the same transaction; writes JSON to
``results/``.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from confluent_kafka import Producer

from fraudstream.loadtest.decided_by import decider, describe, tally
from fraudstream.loadtest.harness import (
    _progress,
    _spawn,
    fresh_stack,
    read_decisions,
    write_result,
)
from fraudstream.scorers.metrics import summary
from fraudstream.scorers.registry import Registry
from fraudstream.scorers.rules import RuleSet, RulesScorer
from fraudstream.scorers.train import TrainConfig, build_dataset, onnx_scores, train
from fraudstream.scorers.windows import Windows
from fraudstream.state.features import FeatureConfig
from fraudstream.streams.embedded.broker import EmbeddedBroker
from fraudstream.streams.embedded.registry import EmbeddedRegistry
from fraudstream.streams.processes import stop_process
from fraudstream.streams.replay.engine import run_replay
from fraudstream.streams.replay.ranges import Bound, ReplayConfig
from fraudstream.streams.traffic.generator import arrival_events, generate_history
from fraudstream.streams.traffic.world import GeneratorConfig

ROOT = Path(__file__).resolve().parent.parent
DAY_MS = 86_400_000
START_MS = 1_788_220_800_000  # 2026-09-01 UTC
#: Differences allowed by the issue between live and offline on the test window.
MAX_AUC_GAP, MAX_AP_GAP = 0.005, 0.01


def windows(days: int, label_delay_days: float) -> Windows:
    """Warm-up day 0; train days 1-12; valid 12-14; test from a whole day more than the
    label delay after valid, to the end."""
    test_from = 14 + math.ceil(label_delay_days) + 1
    if days < test_from + 2:
        raise SystemExit(f"--days must be at least {test_from + 2} for a label delay of "
                         f"{label_delay_days} days (the test window starts on day "
                         f"{test_from})")
    return Windows(warmup_from=START_MS, train_from=START_MS + DAY_MS,
                   train_to=START_MS + 12 * DAY_MS, valid_from=START_MS + 12 * DAY_MS,
                   valid_to=START_MS + 14 * DAY_MS, test_from=START_MS + test_from * DAY_MS)


def produce(settings: Any, codecs: Any, events: list[tuple[str, dict[str, Any]]]) -> None:
    """The history in arrival order, labels on ``labels`` and transactions on
    ``transactions``, keyed by card, in batches."""
    producer = Producer({**settings.kafka.client_config(), "linger.ms": 50,
                         "batch.num.messages": 10_000})
    topics = {"transaction": (settings.topics.transactions, codecs.transaction),
              "label": (settings.topics.labels, codecs.label)}
    for kind, record in events:
        topic, codec = topics[kind]
        while True:
            try:
                producer.produce(topic, key=record["card_id"].encode(),
                                 value=codec.encode(record))
                break
            except BufferError:
                producer.poll(0.05)
    assert producer.flush(120) == 0


def drain(broker: EmbeddedBroker, registry: EmbeddedRegistry, workdir: Path, models: Path,
          events: list, n_txns: int, online: bool, timeout_s: float,
          align_wait_ms: float | None) -> tuple[dict, dict, Any]:
    """A fresh stack, the history produced, one worker draining it: (transaction id ->
    decision, the run's numbers)."""
    stack = fresh_stack(broker, registry, workdir, f"quality-{'on' if online else 'off'}",
                        4, scoring={"models_dir": models, "online": online},
                        worker={} if align_wait_ms is None else {"align_wait_ms": align_wait_ms})
    t0 = time.monotonic()
    produce(stack.settings, stack.codecs, events)
    produced_s = time.monotonic() - t0
    _progress(f"  produced {len(events):,} records in {produced_s:.1f} s; worker draining...")
    worker = _spawn(["-m", "fraudstream", "worker", "--loglevel", "info"], stack.settings,
                    workdir / f"worker-{stack.uid}.log")
    try:
        got = read_decisions(stack.settings, stack.codecs, lambda out: len(out) >= n_txns,
                             timeout_s)
    finally:
        stop_process(worker)
    times = [t for t, _ in got]
    decisions = {d["transaction_id"]: d for _, d in got}
    run = {"decisions": len(got), "unique": len(decisions),
           "drain_s": times[-1] - times[0] if len(times) > 1 else 0.0,
           "decided_by": tally(decider(d) for d in decisions.values())}
    if len(decisions) < n_txns:
        _progress(f"  only {len(decisions):,} of {n_txns:,} decided in {timeout_s:.0f} s; "
                  f"worker log: {workdir / f'worker-{stack.uid}.log'}")
    return decisions, run, stack.settings


def replay(settings: Any, version: str, online: bool) -> tuple[dict[str, float], dict]:
    """``fraudstream replay`` of the whole topic with the model as champion: (transaction
    id -> champion score, the run's numbers)."""
    t0 = time.monotonic()
    result = run_replay(settings, ReplayConfig(challenger=version, champion=version,
                                               start=Bound("offset", 0), online=online,
                                               publish=False))
    scores = dict(zip(result.decided.transaction_ids, result.decided.champion_score,
                      strict=True))
    return scores, {"decided": len(scores), "seconds": time.monotonic() - t0}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fraudstream.loadtest.live_quality",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--days", type=int, default=22)
    p.add_argument("--per-day", type=int, default=6000)
    p.add_argument("--cards", type=int, default=3000)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--trees", type=int, default=200)
    p.add_argument("--label-delay-days", type=float, default=3.0,
                   help="mean label delay (sd: half of it)")
    p.add_argument("--late-ratio", type=float, default=0.0,
                   help="share of transactions arriving late (up to 2 h)")
    p.add_argument("--online", choices=("on", "off", "both"), default="both",
                   help="worker runs with the online learners on, off, or one of each")
    p.add_argument("--align-wait-ms", type=float, default=None,
                   help="the worker's FRAUDSTREAM_WORKER_ALIGN_WAIT_MS (default: its "
                        "default; 0: no event-time alignment)")
    p.add_argument("--no-replay", dest="replay", action="store_false",
                   help="skip the replay of the same topics after each drain")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per drain")
    p.add_argument("--results", type=Path, default=ROOT / "results")
    p.add_argument("--scores", type=Path, default=None,
                   help="write each test transaction's offline and live scores (CSV)")
    args = p.parse_args(argv)

    workdir = Path(tempfile.mkdtemp(prefix="fraudstream-live-quality-"))
    win = windows(args.days, args.label_delay_days)
    config = GeneratorConfig(seed=args.seed, n_cards=args.cards, id_prefix=f"q{args.seed}",
                             label_delay_days=args.label_delay_days,
                             label_delay_spread_days=args.label_delay_days / 2)
    txns, labels = generate_history(config, START_MS, float(args.days), args.per_day,
                                    late_ratio=args.late_ratio)
    events = arrival_events(txns, labels)
    n_txns = len({t["transaction_id"] for t in txns})
    _progress(f"history: {len(txns):,} transactions, {len(labels):,} labels, "
              f"{args.days} days; training...")
    models = workdir / "models"
    t0 = time.monotonic()
    meta = train(events, models, TrainConfig(trees=args.trees, seed=args.seed, windows=win),
                 f"{args.seed:064x}", RulesScorer(RuleSet.default()))
    Registry(models).promote(meta["version"])
    train_s = time.monotonic() - t0
    offline_metrics = meta["metrics"]["test"]

    # The offline model's score of each test transaction, for the count of live scores
    # that differ from it.
    ds = build_dataset(events, FeatureConfig(), windows=win, records=True)
    te = win.split(ds.times)["test"]
    version_dir = models / meta["version"]
    offline_score = sum(m["weight"] * onnx_scores((version_dir / m["file"]).read_bytes(),
                                                  ds.X[te]) for m in meta["models"])
    test_ids = [ds.txns[i]["transaction_id"] for i in te]
    cards = ds.cards[te].tolist()
    times = ds.times[te]
    y = ds.y[te]

    modes = {"on": [True], "off": [False], "both": [True, False]}[args.online]
    live: dict[str, Any] = {}
    columns: dict[str, np.ndarray] = {"offline": offline_score}
    with EmbeddedBroker(log_path=workdir / "broker.log") as broker, \
            EmbeddedRegistry() as registry:
        for online in modes:
            name = "online on" if online else "online off"
            _progress(f"live, {name}:")
            decisions, run, settings = drain(broker, registry, workdir, models, events,
                                             n_txns, online, args.timeout, args.align_wait_ms)
            missing = [tid for tid in test_ids if tid not in decisions]
            if missing:
                _progress(f"  {len(missing):,} test transactions without a decision")
                return 1
            score = np.array([decisions[tid]["score"] for tid in test_ids])
            columns[name] = score
            run["test"] = summary(cards, times, y, score, known=ds.compromised)
            diff = np.abs(score - offline_score)
            run["scores_differ"] = {"1e-5": int((diff > 1e-5).sum()),
                                    "0.01": int((diff > 0.01).sum())}
            run["test_decided_by"] = tally(decider(decisions[tid]) for tid in test_ids)
            run["stage_online"] = sum(decisions[tid]["stage"] == "online" for tid in test_ids)
            live[name] = run
            _progress(f"  {run['unique']:,} decided in {run['drain_s']:.1f} s; "
                      f"{describe(run['decided_by'])}")
            if args.replay:
                _progress("  replay of the same topics...")
                replayed, run["replay"] = replay(settings, meta["version"], online)
                rscore = np.array([replayed.get(tid, np.nan) for tid in test_ids])
                columns[f"replay, {name}"] = rscore
                run["replay"]["test"] = summary(cards, times, y, rscore, known=ds.compromised)
                rdiff = np.abs(rscore - offline_score)
                run["replay"]["scores_differ"] = {"1e-5": int((~(rdiff <= 1e-5)).sum()),
                                                  "0.01": int((~(rdiff <= 0.01)).sum())}

    result = {"days": args.days, "per_day": args.per_day, "cards": args.cards,
              "seed": args.seed, "late_ratio": args.late_ratio,
              "label_delay_days": args.label_delay_days, "align_wait_ms": args.align_wait_ms,
              "transactions": n_txns,
              "labels": len(labels), "version": meta["version"], "train_s": train_s,
              "test": {"transactions": len(te), "fraud": int(y.sum()),
                       "from": meta["windows"]["test"]["from"],
                       "to": meta["windows"]["test"]["to"]},
              "offline": offline_metrics, "live": live}
    report(result)
    if args.scores is not None:
        with open(args.scores, "w", newline="") as f:
            out = csv.writer(f)
            out.writerow(["transaction_id", "event_time", "is_fraud", *columns])
            for k, tid in enumerate(test_ids):
                out.writerow([tid, int(times[k]), int(y[k]),
                              *(f"{c[k]:.9g}" for c in columns.values())])
    write_result(args.results, "live-quality", result, printed={
        name: {k: run[k] for k in ("test", "scores_differ", "decided_by")}
        for name, run in live.items()})
    return 0


def report(result: dict[str, Any]) -> None:
    """The table of the note: offline and live on the test window, and the gaps."""
    off = result["offline"]
    t = result["test"]
    print(f"test window {t['from']} .. {t['to']}: {t['transactions']:,} transactions, "
          f"{t['fraud']:,} fraud (model {result['version']})")
    print(f"{'':28s} {'AUC ROC':>8s} {'AP':>8s} {'card p@100':>10s}")
    for name, m in (("offline ensemble", off["ensemble"]),
                    ("offline ensemble+online", off["ensemble+online"])):
        print(f"{name:28s} {m['auc_roc']:8.4f} {m['average_precision']:8.4f} "
              f"{m['card_precision_at_100']:10.4f}")
    for name, run in result["live"].items():
        m = run["test"]
        ref = off["ensemble+online" if name == "online on" else "ensemble"]
        d_auc = m["auc_roc"] - ref["auc_roc"]
        d_ap = m["average_precision"] - ref["average_precision"]
        ok = abs(d_auc) <= MAX_AUC_GAP and abs(d_ap) <= MAX_AP_GAP
        print(f"{'live, ' + name:28s} {m['auc_roc']:8.4f} {m['average_precision']:8.4f} "
              f"{m['card_precision_at_100']:10.4f}   vs offline "
              f"{'ensemble+online' if name == 'online on' else 'ensemble'}: AUC {d_auc:+.4f}, "
              f"AP {d_ap:+.4f} ({'within' if ok else 'OUTSIDE'} "
              f"{MAX_AUC_GAP}/{MAX_AP_GAP})")
        print(f"  {'':26s} scores differing from the offline model's: "
              f"{run['scores_differ']['1e-5']:,} by > 1e-5, {run['scores_differ']['0.01']:,} "
              f"by > 0.01; stage online: {run['stage_online']:,}; "
              f"{describe(run['test_decided_by'])}")
        rp = run.get("replay")
        if rp is not None:
            m = rp["test"]
            print(f"{'replay, ' + name:28s} {m['auc_roc']:8.4f} {m['average_precision']:8.4f} "
                  f"{m['card_precision_at_100']:10.4f}   scores differing from the offline "
                  f"model's: {rp['scores_differ']['1e-5']:,} by > 1e-5, "
                  f"{rp['scores_differ']['0.01']:,} by > 0.01 ({rp['decided']:,} decided in "
                  f"{rp['seconds']:.1f} s)")


if __name__ == "__main__":
    sys.exit(main())
