"""``python -m fraudstream.loadtest.cascade``: what the scoring cascade costs per event, by batch
size.

A model is trained on a generated history (or ``--model DIR`` is loaded), then for batches
of 1, 32 and 256 transactions with real feature vectors it times, per event (median over
batches, wall time):

- ``rules``: the rules scorer;
- ``model``: the ONNX ensemble (one call per model per batch); ``reasons``: its codes;
- ``online``: the online learner's blend (a learner taught 2,000 labels first);
- ``model stage``: model and reasons as the pipeline calls them, in the model thread;
- ``cascade``: all three, as the pipeline runs them (thread hand-off and deadline included);
- ``canary``: the cascade during a canary rollout at 10%: the card split, then the canary
  version scoring the whole batch too (here the same artifact, so the figure is the
  rollout's own overhead, not a slower version's).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from fraudstream.loadtest.harness import write_result
from fraudstream.scorers import train as T
from fraudstream.scorers.canary import in_canary
from fraudstream.scorers.cascade import ModelStage
from fraudstream.scorers.online import OnlineLearner, OnlineStage
from fraudstream.scorers.onnx_model import ModelScorer
from fraudstream.scorers.rules import RuleSet, RulesScorer
from fraudstream.state.engine import MemoryStore
from fraudstream.state.features import FeatureConfig
from fraudstream.streams.traffic.generator import DAY_MS, arrival_events, generate_history
from fraudstream.streams.traffic.world import GeneratorConfig

ROOT = Path(__file__).resolve().parent.parent


def _events(days: float, per_day: int, seed: int) -> list[tuple[str, dict]]:
    start = int(time.time() * 1000) - int((days + 1) * DAY_MS)
    txns, labels = generate_history(GeneratorConfig(seed=seed, n_cards=2000, id_prefix="cb",
                                                    label_delay_days=1.0), start, days, per_day)
    return arrival_events(txns, labels)


def _median_us(fn, batches: list, per: int) -> float:
    """Median wall time per event (the model stage runs in a thread: CPU time of this
    thread would miss it)."""
    samples = []
    for b in batches:
        t0 = time.perf_counter()
        fn(b)
        samples.append((time.perf_counter() - t0) / per * 1e6)
    return statistics.median(samples)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fraudstream.loadtest.cascade")
    p.add_argument("--model", type=Path, help="an artifact folder (default: train one)")
    p.add_argument("--days", type=float, default=6.0)
    p.add_argument("--per-day", type=int, default=6000)
    p.add_argument("--batches", type=int, default=200, help="timed batches per size")
    p.add_argument("--out", type=Path, default=ROOT / "results")
    args = p.parse_args(argv)

    events = _events(args.days, args.per_day, 11)
    with tempfile.TemporaryDirectory() as tmp:
        if args.model is None:
            meta = T.train(events, Path(tmp), T.TrainConfig(trees=300), "00" * 32,
                           RulesScorer(RuleSet.default()))
            args.model = Path(tmp) / meta["version"]
        model = ModelScorer.load(args.model)
        ds = T.build_dataset(events, FeatureConfig(), records=True)
    rules = RulesScorer(RuleSet.default())
    learner = OnlineLearner()
    learner.learn(ds.X[:2000], ds.y[:2000].astype(bool).tolist())
    online = OnlineStage(MemoryStore(), max_weight=0.3)
    stage = ModelStage(active=model)
    rng = np.random.default_rng(1)
    result: dict[str, dict[str, float]] = {}
    for size in (1, 32, 256):
        starts = rng.integers(0, len(ds.txns) - size, args.batches)
        batches = [(list(range(s, s + size))) for s in starts]

        def run_rules(idx: list[int]) -> None:
            rules.score_batch([ds.txns[i] for i in idx], [ds.vectors[i] for i in idx])

        def run_model(idx: list[int]) -> None:
            model.predict(ds.X[idx])

        def run_reasons(idx: list[int]) -> None:
            model.reasons(ds.X[idx])

        def run_online(idx: list[int]) -> None:
            X = ds.X[idx]
            online.blend({0: learner}, [0] * len(idx), X, np.zeros(len(idx)))

        def run_stage(idx: list[int]) -> None:
            stage.run(model, ds.X[idx], time.perf_counter() + 1.0)

        def run_cascade(idx: list[int]) -> None:
            run_rules(idx)
            X = ds.X[idx]
            scores, _reasons, cause = stage.run(model, X, time.perf_counter() + 1.0)
            assert cause is None
            online.blend({0: learner}, [0] * len(idx), X, scores)

        def run_canary(idx: list[int]) -> None:
            run_cascade(idx)
            in_canary([ds.txns[i]["card_id"] for i in idx], 0.1)
            _scores, _reasons, cause = stage.run(model, ds.X[idx], time.perf_counter() + 1.0)
            assert cause is None

        result[str(size)] = {name: _median_us(fn, batches, size) for name, fn in (
            ("rules", run_rules), ("model", run_model), ("reasons", run_reasons),
            ("online", run_online), ("stage", run_stage), ("cascade", run_cascade),
            ("canary", run_canary))}
        r = result[str(size)]
        print(f"batch {size:>3}: rules {r['rules']:6.1f}  model {r['model']:6.1f}  reasons "
              f"{r['reasons']:5.1f}  online {r['online']:6.1f}  model stage (thread) "
              f"{r['stage']:6.1f}  cascade {r['cascade']:6.1f}  during a canary "
              f"{r['canary']:6.1f} µs/event (wall)", file=sys.stderr)
    write_result(args.out, "cascade", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
