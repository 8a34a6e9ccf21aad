"""``python -m fraudstream.loadtest.restart crashloop``: ``--events`` transactions at ``--rate``/s
while
the worker is SIGKILLed ``--kills`` times, evenly spaced, and started again at once each
time; then every decision is read back: missing, conflicting, duplicates, and who decided
(see :mod:`fraudstream.loadtest.restart`)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from fraudstream.loadtest.restart import Decisions, Stack, Traffic, Worker, _done, _wait, _workdir
from fraudstream.streams.traffic.world import GeneratorConfig


def ensure_models(models: Path) -> None:
    """A small model (40 trees, 20k generated transactions) as the active version of
    ``models``, unless it has one."""
    from fraudstream.scorers.registry import ACTIVE, Registry

    reg = Registry(models)
    if reg.pointer(ACTIVE):
        return
    from fraudstream.scorers import train as T
    from fraudstream.scorers.rules import RuleSet, RulesScorer
    from fraudstream.streams.traffic.generator import arrival_events, generate_history

    print(f"training a small model into {models} ...", file=sys.stderr, flush=True)
    now = int(time.time() * 1000)
    txns, labels = generate_history(
        GeneratorConfig(seed=5, n_cards=400, label_delay_days=0.5,
                        label_delay_spread_days=0.2, id_prefix="m5"),
        now - 9 * 86_400_000, 8.0, 2500)
    meta = T.train(arrival_events(txns, labels), models, T.TrainConfig(trees=40, seed=5),
                   "05" * 32, RulesScorer(RuleSet.default()))
    reg.promote(meta["version"])


def run_crashloop(args: argparse.Namespace) -> dict[str, Any]:
    root = Path(args.root).resolve()
    workdir = _workdir(args)
    if not args.models:
        args.models = str(workdir / "models")
    ensure_models(Path(args.models))
    seconds = args.events / args.rate
    kill_at = [seconds * (k + 1) / (args.kills + 1) for k in range(args.kills)]
    restarts: list[float] = []
    with Stack(args, workdir) as stack:
        reader = Decisions(stack)
        reader.start()
        worker = Worker(stack.settings, root, workdir / "worker.log")
        worker.start()
        # traffic starts once the worker decides: the first join is not a crash
        warm = Traffic(stack, 50, args.linger_ms, 50, seed=11)
        warm.start()
        _wait(lambda: len(reader.records) >= 50, 180, "the first worker's decisions")
        traffic = Traffic(stack, args.rate, args.linger_ms, args.events)
        start = time.monotonic()
        traffic.start()
        try:
            for k, at in enumerate(kill_at):
                while time.monotonic() - start < at:
                    time.sleep(0.05)
                worker.kill()
                t0 = worker.start()
                print(f"kill {k + 1}/{args.kills} at {at:.0f} s: sent {len(traffic.sent)}, "
                      f"decisions {len(reader.records)}", flush=True)
                restarts.append(t0)
            traffic.join()
            if traffic.error is not None:
                raise traffic.error
            sent_at = time.monotonic() - start
            expected = set(traffic.sent) | set(warm.sent)
            deadline = time.monotonic() + args.drain_timeout
            while time.monotonic() < deadline:
                if len({r[0] for r in reader.records}) >= len(expected):
                    break
                time.sleep(0.5)
            time.sleep(args.settle_s)  # duplicates must be visible
        finally:
            traffic.halt.set()
            worker.stop()
            reader.halt.set()
            reader.join(10)
    by_id: dict[str, set[bytes]] = {}
    deciders: dict[str, int] = {}
    for tid, value, who, _at in reader.records:
        if tid not in expected:
            continue
        if tid not in by_id:  # who decided, counted once per transaction
            deciders[who] = deciders.get(who, 0) + 1
        by_id.setdefault(tid, set()).add(value)
    decided = set(by_id)
    out = {
        "events": args.events, "rate": args.rate, "kills": args.kills,
        "send_seconds": round(sent_at, 1), "sent": len(expected),
        "missing": len(expected - decided),
        "conflicting": sum(1 for values in by_id.values() if len(values) > 1),
        "duplicates": sum(1 for r in reader.records if r[0] in expected) - len(decided),
        "model_share": round(deciders.get("model", 0) / max(1, len(decided)), 4),
        "deciders": dict(sorted(deciders.items())),
        "decision_records": len(reader.records),
        "session_timeout_ms": args.session_timeout_ms, "instance_id": args.instance_id,
    }
    print(f"crash loop: {out['sent']} transactions at {args.rate:g}/s, {args.kills} SIGKILLs: "
          f"missing {out['missing']}, conflicting {out['conflicting']}, duplicates "
          f"{out['duplicates']}, share decided by the model {out['model_share']:.1%} "
          f"(deciders: {out['deciders']})", flush=True)
    _done(args, workdir)
    return out
