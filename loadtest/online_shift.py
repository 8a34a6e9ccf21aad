"""Does the online learner earn its weight? The ensemble alone against the ensemble blended
with the learner, on the test window of two generated histories:

* **stationary**: the same fraud mix throughout;
* **shifting**: the train and validation windows hold every fraud type but one; the test
  window (after a gap of more than the label delay) holds that one only, a pattern the
  ensemble never saw.

Both are trained by :func:`fraudstream.scorers.train.train` with explicit windows; its
``ensemble+online`` row lives the test window as a worker would (labels learned once they
arrive, the weight earned on evidence). Prints average precision, AUC and card precision
@100/day for both, and their difference.

    python -m fraudstream.loadtest.online_shift [--seeds 3] [--per-day 6000]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path
from typing import Any

from fraudstream.scorers.rules import RuleSet, RulesScorer
from fraudstream.scorers.train import TrainConfig, train
from fraudstream.scorers.windows import Windows
from fraudstream.streams.traffic.generator import arrival_events, generate_history
from fraudstream.streams.traffic.world import FRAUD_TYPES, GeneratorConfig

DAY_MS = 86_400_000
START_MS = 1_788_220_800_000  # 2026-09-01 UTC: fixed, so a run does not depend on the date
NEW = "impossible_travel"  # the pattern the shifting test window brings


def history(seed: int, per_day: int, shift: bool) -> list[tuple[str, dict[str, Any]]]:
    """14 days: days 0-10 with every type (or every type but :data:`NEW`), days 10-14 with
    the same mix (or :data:`NEW` only); the same cards and merchants throughout."""
    before = tuple((t, 1.0) for t in FRAUD_TYPES if not shift or t != NEW)
    after = ((NEW, 1.0),) if shift else before
    events = []
    for part, (start, days, mix) in enumerate(((0, 10.0, before), (10, 4.0, after))):
        config = GeneratorConfig(seed=seed, n_cards=3000, campaign_mix=mix,
                                 label_delay_days=1.0, label_delay_spread_days=0.5,
                                 traffic_seed=seed * 10 + part, id_prefix=f"s{seed}p{part}")
        txns, labels = generate_history(config, START_MS + start * DAY_MS, days, per_day)
        events += arrival_events(txns, labels)
    return events


def measure(seed: int, per_day: int, shift: bool, trees: int) -> dict[str, Any]:
    windows = Windows(train_from=START_MS + DAY_MS, train_to=START_MS + 7 * DAY_MS,
                      valid_from=START_MS + 7 * DAY_MS, valid_to=START_MS + 8 * DAY_MS,
                      test_from=START_MS + 10 * DAY_MS)
    with tempfile.TemporaryDirectory() as tmp:
        meta = train(history(seed, per_day, shift), Path(tmp),
                     TrainConfig(trees=trees, seed=seed, windows=windows), f"{seed:064x}",
                     RulesScorer(RuleSet.default()))
    test = meta["metrics"]["test"]
    return {"ensemble": test["ensemble"], "ensemble+online": test["ensemble+online"],
            "test_fraud": meta["windows"]["test"]["fraud"],
            "test_transactions": meta["windows"]["test"]["transactions"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fraudstream.loadtest.online_shift",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--per-day", type=int, default=6000)
    p.add_argument("--trees", type=int, default=200)
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    args = p.parse_args(argv)
    results: dict[str, list[dict[str, Any]]] = {"stationary": [], "shifting": []}
    for name in results:
        for seed in range(1, args.seeds + 1):
            r = measure(seed, args.per_day, name == "shifting", args.trees)
            results[name].append(r)
            e, o = r["ensemble"], r["ensemble+online"]
            print(f"{name:10s} seed {seed}: test {r['test_transactions']} transactions, "
                  f"{r['test_fraud']} fraud; AP ensemble {e['average_precision']:.4f}, "
                  f"+online {o['average_precision']:.4f} "
                  f"({o['average_precision'] - e['average_precision']:+.4f}); AUC "
                  f"{e['auc_roc']:.4f} / {o['auc_roc']:.4f}; card precision@100 "
                  f"{e['card_precision_at_100']:.4f} / {o['card_precision_at_100']:.4f}",
                  flush=True)
    for name, rs in results.items():
        gains = [r["ensemble+online"]["average_precision"] - r["ensemble"]["average_precision"]
                 for r in rs]
        print(f"{name}: AP gain of the blend, median {statistics.median(gains):+.4f}, "
              f"least {min(gains):+.4f}, most {max(gains):+.4f} ({len(gains)} seeds)")
    if args.out is not None:
        args.out.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
