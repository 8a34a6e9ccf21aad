"""``python -m fraudstream.loadtest.pipeline``: the worker's batch step per event, by stage,
without a broker.

Generated history (``--days`` of ``--per-day`` transactions over 2,000 cards, 4
partitions) is encoded as Avro records once, then decided by
:class:`fraudstream.streams.pipeline.Pipeline` in micro-batches of ``--batch``, as the
worker does: decode and validation, dedupe (a dict standing for the state table),
features (in-memory store), rules, the model stage (``--models``: a registry; its ACTIVE
version, else its newest) with the online learner's log, and the decisions' encoding.
The budget is unlimited, so the model decides every event; the printed counts say so.

It prints the median over batches of each stage's time per event (the pipeline's own
``timings_ms``; ``encode`` is ``total`` minus the stages) and the overall rate. It is the
CPU cost of the worker's decisions, apart from the broker's: compare it with the backlog
drain of ``python -m fraudstream.loadtest`` to see what the broker and Faust add.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import zlib
from collections import Counter
from pathlib import Path

from fraudstream.loadtest.harness import write_result
from fraudstream.schemas.codec import Codecs, make_registry
from fraudstream.scorers.cascade import ModelStage
from fraudstream.scorers.registry import Registry
from fraudstream.scorers.rules import RuleSet, RulesScorer
from fraudstream.state.engine import FeatureEngine, MemoryStore
from fraudstream.state.features import FeatureConfig
from fraudstream.streams.pipeline import Limits, Pipeline, RawRecord
from fraudstream.streams.settings import TopicSettings
from fraudstream.streams.traffic.generator import DAY_MS, generate_history
from fraudstream.streams.traffic.world import GeneratorConfig

ROOT = Path(__file__).resolve().parent.parent
#: A fixed start: the same history on every run, whatever the date.
START_MS = 1_790_000_000_000
STAGES = ("decode", "dedupe", "features", "rules", "model", "encode", "total")


def run(models: Path, days: float, per_day: int, batch: int) -> dict:
    codecs = Codecs(make_registry("mock://loadtest-pipeline"), TopicSettings())
    txns, _labels = generate_history(
        GeneratorConfig(seed=3, n_cards=2000, id_prefix="pb"), START_MS, days, per_day)
    records = [RawRecord("transactions", zlib.crc32(t["card_id"].encode()) % 4, i,
                         t["card_id"].encode(), codecs.transaction.encode(t), START_MS)
               for i, t in enumerate(txns)]
    registry = Registry(models)
    version = registry.pointer("ACTIVE") or registry.versions()[-1]
    store = MemoryStore(partitions=4)
    pipeline = Pipeline(
        codecs, RulesScorer(RuleSet.default()), Limits(65536, 10**12, 1e6),
        features=FeatureEngine(FeatureConfig(), store),
        models=ModelStage(active=registry.load(version)), budget_ms=float("inf"),
        clock=lambda: (START_MS + (days + 1) * DAY_MS) / 1000)
    decided: dict[bytes, bytes] = {}

    def lookup(_partition: int, keys: list[bytes]) -> list[bytes | None]:
        return [decided.get(k) for k in keys]

    per_stage: dict[str, list[float]] = {s: [] for s in STAGES}
    deciders: Counter[str] = Counter()
    t0 = time.perf_counter()
    for i in range(0, len(records), batch):
        chunk = records[i:i + batch]
        out = pipeline.process(chunk, lookup)
        store.write(out.feature_writes)
        decided.update((k, v) for _p, k, v in out.new_entries)
        for v in out.verdicts:
            deciders["fallback" if v["fallback"] else v["stage"]] += 1
        t = dict(out.timings_ms)
        t["encode"] = t["total"] - sum(t[s] for s in STAGES[:5])
        for s in STAGES:
            per_stage[s].append(t[s] * 1000.0 / len(chunk))
    wall = time.perf_counter() - t0
    return {"events": len(records), "batch": batch, "model": version,
            "rate": len(records) / wall, "us_per_event": wall / len(records) * 1e6,
            "stages_us": {s: statistics.median(v) for s, v in per_stage.items()},
            "decided_by": dict(deciders)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fraudstream.loadtest.pipeline",
                                description=__doc__.split("\n")[0].replace("``", ""))
    p.add_argument("--models", type=Path, required=True,
                   help="a model registry (fraudstream train --out DIR)")
    p.add_argument("--days", type=float, default=2.0)
    p.add_argument("--per-day", type=int, default=20_000)
    p.add_argument("--batch", type=int, default=500)
    p.add_argument("--out", type=Path, default=ROOT / "results")
    args = p.parse_args(argv)
    r = run(args.models, args.days, args.per_day, args.batch)
    print(f"{r['events']:,} transactions in batches of {r['batch']}: {r['rate']:,.0f}/s "
          f"({r['us_per_event']:.1f} us per event); decided by {r['decided_by']}",
          file=sys.stderr)
    print("  " + "  ".join(f"{s} {v:.1f}" for s, v in r["stages_us"].items())
          + "  (us per event, medians over batches)", file=sys.stderr)
    write_result(args.out, "pipeline", r)
    return 0


if __name__ == "__main__":
    sys.exit(main())
