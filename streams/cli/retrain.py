"""``fraudstream retrain``: a model artifact trained on a range of the live ``transactions``
and ``labels`` topics, no export needed (:mod:`fraudstream.streams.autopilot.retrain`).

The artifact lands in ``--out/<version>/`` (ONNX files, metadata.json, report.md, plots),
and its files go to the artifacts topic, from where ``fraudstream model publish``,
``model canary`` and every worker can take it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from fraudstream.streams.settings import Settings


def add_arguments(p: argparse.ArgumentParser) -> None:
    from fraudstream.streams.cli.replay import add_range_arguments
    from fraudstream.streams.cli.train import add_split_arguments

    add_range_arguments(p, warmup=False)
    p.add_argument("--out", type=Path, default=None,
                   help="model registry folder (default: FRAUDSTREAM_SCORING_MODELS_DIR)")
    add_split_arguments(p)
    p.add_argument("--trees", type=int, default=300)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--genuine-sample", type=float, default=1.0, metavar="SHARE",
                   help="keep this share of the training window's unlabelled transactions, "
                        "each weighing 1/SHARE in the fit (every labelled one is kept; the "
                        "validation and test windows keep every transaction): a long range "
                        "in less memory. Needs --from and --to as times (default: 1, all)")
    p.add_argument("--no-upload", action="store_true",
                   help="keep the artifact in --out only (not on the artifacts topic)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace, settings: Settings) -> int:
    from tqdm import tqdm

    from fraudstream.scorers.train import TrainConfig, TrainingError
    from fraudstream.streams.autopilot.retrain import RetrainConfig, retrain
    from fraudstream.streams.cli.replay import partitions_of
    from fraudstream.streams.replay.ranges import Bound, ReplayError

    out = args.out or settings.scoring.models_dir
    try:
        if not 0.0 < args.genuine_sample <= 1.0:
            raise ValueError(f"--genuine-sample: a share in (0, 1], not {args.genuine_sample}")
        config = RetrainConfig(
            start=Bound.parse(args.start, args.event_time),
            end=Bound.parse(args.end, args.event_time) if args.end else None,
            partitions=partitions_of(args.partitions),
            train=TrainConfig(valid_frac=args.valid_frac, test_frac=args.test_frac,
                              review_rate=args.review_rate,
                              decline_precision=args.decline_precision, trees=args.trees,
                              seed=args.seed, genuine_sample=args.genuine_sample),
            upload=not args.no_upload)
    except (ReplayError, ValueError) as exc:
        print(f"fraudstream retrain: {exc}", file=sys.stderr)
        return 2
    started = time.monotonic()
    bar = tqdm(desc="read and build features", unit=" txn", disable=args.quiet,
               file=sys.stderr, mininterval=0.5)

    def phase(name: str) -> None:
        bar.close()  # the topics are read
        if not args.quiet:
            print(f"{time.monotonic() - started:7.1f} s  {name}", file=sys.stderr, flush=True)

    try:
        done = retrain(settings, config, out, progress=bar.update, phase=phase)
    except (TrainingError, ReplayError, RuntimeError) as exc:
        print(f"fraudstream retrain: {' '.join(str(exc).split())}", file=sys.stderr)
        return 1
    finally:
        bar.close()
    for reason, n in done.errors.most_common(20):
        print(f"  not used: {n:,} x {reason}", file=sys.stderr)
    meta = done.meta
    where = "; files on the artifacts topic" if config.upload else ""
    print(f"model {done.version} -> {done.path} ({sum(done.errors.values()):,} records not "
          f"used{where}; {done.seconds:.1f} s)", file=sys.stderr)
    print(json.dumps({"version": done.version, "path": str(done.path),
                      "windows": meta["windows"], "thresholds": meta["thresholds"],
                      "test": meta["metrics"]["test"]}, indent=2))
    print((done.path / "report.md").read_text(), file=sys.stderr)
    return 0
