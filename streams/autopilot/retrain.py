"""Training from the live topics: a range of ``transactions`` and ``labels``
(:mod:`fraudstream.streams.autopilot.source`) through :func:`fraudstream.scorers.train.train`,
with the rules in force on the control topic, and the artifact registered on the control
plane (its files on the artifacts topic, where every worker and the autopilot can fetch
it). Used by ``fraudstream retrain`` and by the autopilot.

The windows are shares of the range's event-time span: training, then validation, then
the held-out test window last (what the autopilot replays both models over). The dataset
holds no Python object per transaction (:class:`fraudstream.scorers.train.Dataset`).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from fraudstream.scorers.registry import Registry
from fraudstream.scorers.train import TrainConfig, TrainingError, train
from fraudstream.state.features import FeatureConfig
from fraudstream.streams.autopilot.source import topic_events
from fraudstream.streams.control.artifacts import upload
from fraudstream.streams.control.follow import in_force
from fraudstream.streams.control.rollout import codecs_for
from fraudstream.streams.replay.ranges import Bound, ReplayConfig
from fraudstream.streams.settings import Settings


@dataclass(frozen=True)
class RetrainConfig:
    start: Bound
    end: Bound | None = None
    partitions: list[int] | None = None
    #: Windows, thresholds and models (its ``features`` are taken from the settings).
    train: TrainConfig = field(default_factory=TrainConfig)
    #: Put the files on the artifacts topic.
    upload: bool = True


@dataclass
class Retrained:
    meta: dict[str, Any]
    path: Path
    #: Records not used, by topic and reason.
    errors: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0

    @property
    def version(self) -> str:
        return str(self.meta["version"])

    @property
    def frauds_learned(self) -> int:
        return int(self.meta["windows"]["train"]["fraud_learned"] or 0)


def data_hash(settings: Settings, config: RetrainConfig) -> str:
    """What was read: the broker, the topics and the bounds."""
    what = {"bootstrap": settings.kafka.bootstrap,
            "topics": [settings.topics.transactions, settings.topics.labels],
            "start": [config.start.kind, config.start.value],
            "end": None if config.end is None else [config.end.kind, config.end.value],
            "partitions": config.partitions}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()


#: Sampling stops this share of the range's span before the validation window begins:
#: event times trail the Kafka times the bounds are in.
SAMPLE_MARGIN = 0.02


def sample_until(config: RetrainConfig) -> int | None:
    """Where sampling genuine transactions stops (event time): inside the training window
    of a range with time bounds at both ends; None without sampling. Raises
    :class:`TrainingError` for a range whose span is not known before it is read."""
    t = config.train
    if t.genuine_sample >= 1.0:
        return None
    start, end = config.start, config.end
    if end is None or start.kind == "offset" or end.kind == "offset":
        raise TrainingError("sampling genuine transactions needs a range with time "
                            "bounds at both ends (--from and --to as times): where the "
                            "training window ends is known from them")
    span = end.value - start.value
    return int(start.value + span * (1.0 - t.valid_frac - t.test_frac - SAMPLE_MARGIN))


def retrain(settings: Settings, config: RetrainConfig, models_dir: Path,
            progress: Any = None, phase: Callable[[str], None] | None = None) -> Retrained:
    """Train on the range into ``models_dir``; raises
    :class:`~fraudstream.scorers.train.TrainingError` (the data cannot give a model),
    ``ReplayError`` (bad bounds) or RuntimeError (the upload failed: an
    ``ArtifactTransferError``). ``progress(n)`` per batch of records read; ``phase(name)``
    as each later phase starts."""
    t0 = time.monotonic()
    codecs = codecs_for(settings)
    errors: Counter[str] = Counter()
    train_config = replace(config.train, sample_until_ms=sample_until(config))
    # What the workers decide with now: amounts converted with the rates table in force.
    rules, rates = in_force(settings)
    # the labelled transactions, known before the first is read: only sampling needs them
    labelled: set[str] | None = set() if train_config.sample_until_ms is not None else None
    events = topic_events(
        settings, codecs,
        ReplayConfig(challenger="-", start=config.start, end=config.end,
                     partitions=config.partitions),
        errors, progress, rates=rates, labelled=labelled)
    fs = settings.features
    features = FeatureConfig(allowed_lateness_ms=int(fs.allowed_lateness_s * 1000),
                             label_delay_ms=int(fs.label_delay_s * 1000))
    meta = train(events, models_dir, replace(train_config, features=features, rates=rates),
                 data_hash(settings, config), rules, phase=phase, labelled=labelled)
    if config.upload:
        upload(settings, Registry(models_dir), meta["version"])
    return Retrained(meta, models_dir / meta["version"], errors, time.monotonic() - t0)
