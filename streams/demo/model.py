"""The demo's world and its model: trained once on a generated history, then cached.

:class:`DemoWorld` is what the demo's traffic looks like: a card population sized for the
rate, and event time running ``speed`` times faster than the wall clock, so that a card's
genuine gap is hours (``cards * speed / rate`` event-seconds), as in a real portfolio,
while the demo shows a day of traffic in minutes.

:func:`ensure_model` trains a model on a history of the same world (same cards, merchants
and fraud mix, the same event-time density) the first time, with a progress bar, and
keeps it in a cache folder keyed by everything that shapes it (world, feature version,
rates table, rules version). Later demos promote the cached version at once.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from fraudstream.schemas.fx import Rates
from fraudstream.state.features import FEATURE_VERSION
from fraudstream.streams.traffic.world import GeneratorConfig

#: The history's first event: fixed, so that the same world gives the same model.
HISTORY_START_MS = 1_767_571_200_000  # 2026-01-05T00:00:00Z, a Monday


@dataclass(frozen=True)
class DemoWorld:
    seed: int = 7
    rate: float = 250.0  # transactions per wall-clock second
    speed: float = 120.0  # event seconds per wall-clock second
    cards: int = 60_000
    label_delay_days: float = 0.1  # mean, in event time (at speed 120: about 72 s)
    history_days: float = 3.0
    #: The fraud team's policy the thresholds are set for: the share of traffic sent to
    #: review or decline, and decline only where validation precision reaches this.
    review_rate: float = 0.025
    decline_precision: float = 0.95

    @property
    def per_day(self) -> int:
        """Transactions per event-time day at ``rate`` and ``speed``."""
        return int(self.rate * 86_400 / self.speed)

    @property
    def card_gap_hours(self) -> float:
        return self.cards * self.speed / self.rate / 3600.0

    def generator(self, traffic_seed: int | None = None, id_prefix: str = "") -> GeneratorConfig:
        return GeneratorConfig(seed=self.seed, n_cards=self.cards,
                               label_delay_days=self.label_delay_days,
                               label_delay_spread_days=self.label_delay_days / 2,
                               traffic_seed=traffic_seed, id_prefix=id_prefix)

    def key(self, rates: Rates, rules_version: str) -> str:
        world = {k: float(v) for k, v in asdict(self).items()}  # 100 and 100.0 alike
        text = json.dumps({**world, "features": FEATURE_VERSION,
                           "rates": rates.version, "rules": rules_version}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


def default_cache() -> Path:
    import os

    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "fraudstream" / "demo-models"


def ensure_model(world: DemoWorld, cache: Path, rules_path: Path, rates: Rates,
                 quiet: bool = False) -> tuple[Path, str, bool]:
    """(registry folder, active version, trained now?) for ``world``; trains if needed."""
    from tqdm import tqdm

    from fraudstream.scorers.registry import Registry
    from fraudstream.scorers.rules import RuleSet, RulesScorer
    from fraudstream.scorers.train import TrainConfig, train
    from fraudstream.state.features import FeatureConfig
    from fraudstream.streams.traffic.generator import arrival_events, generate_history

    rules = RuleSet.load(rules_path)
    folder = cache / world.key(rates, rules.version)
    registry = Registry(folder)
    version = registry.pointer("ACTIVE") if folder.exists() else None
    if version is not None:
        try:
            registry.load(version)
            return folder, version, False
        except Exception as exc:  # a broken cache is rebuilt, not trusted
            print(f"demo: cached model {version} unusable ({exc}); training again",
                  file=sys.stderr)
    shutil.rmtree(folder, ignore_errors=True)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    print(f"demo: training a model on {world.history_days:g} days of generated history "
          f"({world.per_day * world.history_days:,.0f} transactions, {world.cards:,} cards); "
          f"cached in {folder} for the next demos", file=sys.stderr, flush=True)
    txns, labels = generate_history(world.generator(id_prefix="h"), HISTORY_START_MS,
                                    world.history_days, world.per_day, late_ratio=0.005)
    events = arrival_events(txns, labels, rates)
    del txns
    config = TrainConfig(features=FeatureConfig(), review_rate=world.review_rate,
                         decline_precision=world.decline_precision,
                         rates=rates)
    with tqdm(total=sum(1 for k, _ in events if k == "transaction"), desc="features",
              unit=" txn", disable=quiet, file=sys.stderr, mininterval=1.0) as bar:
        meta = train(events, tmp, config, hashlib.sha256(world.key(rates, rules.version)
                                                         .encode()).hexdigest(),
                     RulesScorer(rules), progress=bar)
    Registry(tmp).promote(meta["version"])
    tmp.rename(folder)
    test = meta["metrics"]["test"]["ensemble"]
    print(f"demo: model {meta['version']}: test AUC {test['auc_roc']:.3f}, average precision "
          f"{test['average_precision']:.3f}", file=sys.stderr, flush=True)
    return folder, meta["version"], True
