"""The challenger against the champion on the challenger's held-out test window, both run
through the live pipeline by the replay machinery
(:func:`fraudstream.streams.replay.engine.run_replay`): same features, same rules, same
cascade and thresholds, state warmed up over the validation window first. Nothing is
written to the topics. The measures follow the training report's: AUC ROC, average
precision and card precision@100/day on every label known now, plus the share of
labelled-genuine transactions each declined."""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from fraudstream.scorers.registry import Registry
from fraudstream.scorers.retraining import Policy, Side, Verdict, compare
from fraudstream.streams.control.artifacts import download
from fraudstream.streams.processes import Stopped
from fraudstream.streams.replay.engine import OUTCOMES, ReplayResult, run_replay
from fraudstream.streams.replay.ranges import Bound, ReplayConfig
from fraudstream.streams.replay.report import analyse
from fraudstream.streams.settings import Settings

DECLINE = OUTCOMES.index("decline")


def ms(iso: str) -> int:
    return int(datetime.fromisoformat(iso).timestamp() * 1000)


def replay_window(settings: Settings, models_dir: Path, champion: str, challenger: str,
                  meta: dict[str, Any], stop: threading.Event | None = None) -> ReplayResult:
    """Both versions over the test window of a training (its metadata), the champion
    fetched from the artifacts topic if the folder lacks it. Once ``stop`` is set the
    replay ends after the batch it is deciding (:class:`Stopped`), its deciding process
    with it: a SIGTERM does not wait for the comparison."""
    if champion not in Registry(models_dir).versions():
        download(settings, champion, models_dir)
    windows = meta["windows"]
    start, end = ms(windows["test"]["from"]), ms(windows["test"]["to"]) + 1
    config = ReplayConfig(
        challenger=challenger, champion=champion,
        start=Bound("event", start), end=Bound("event", end),
        warmup=Bound("event", ms(windows["valid"]["from"])),
        publish=False, online=False, replay_id=f"autopilot-{challenger}")
    return run_replay(settings.replace(scoring={"models_dir": models_dir}), config,
                      None if stop is None else stopping(stop))


def stopping(stop: threading.Event) -> Callable[[int], None]:
    """A replay's ``progress``, called after each batch: :class:`Stopped` once ``stop``
    is set."""
    def progress(_read: int) -> None:
        if stop.is_set():
            raise Stopped("the comparison was stopped before it ended")
    return progress


def sides(result: ReplayResult) -> tuple[Side, Side, dict[str, Any]]:
    """(champion, challenger) measures of a replay, and its report's counts."""
    report = analyse(result)
    quality = report.get("quality")
    d = result.decided
    genuine = np.fromiter((result.labels.get(t) is False for t in d.transaction_ids),
                          dtype=bool, count=len(d))

    def side(name: str, outcomes: bytearray) -> Side:
        declined = np.frombuffer(bytes(outcomes), dtype=np.uint8) == DECLINE
        false_declines = float(declined[genuine].mean()) if genuine.any() else 0.0
        q = quality[name] if quality else {}
        return Side(average_precision=float(q.get("average_precision", np.nan)),
                    card_precision=float(q.get("card_precision_at_100", np.nan)),
                    auc_roc=float(q.get("auc_roc", np.nan)),
                    false_decline_rate=false_declines)

    counts = {"decided": len(d), "labelled": quality["labelled"] if quality else 0,
              "frauds": quality["frauds"] if quality else 0,
              "labelled_genuine": int(genuine.sum()), "fallbacks": dict(result.fallbacks),
              "seconds": round(result.seconds, 1)}
    return side("champion", d.champion), side("challenger", d.challenger), counts


def judge(policy: Policy, result: ReplayResult, frauds_learned: int
          ) -> tuple[Verdict, dict[str, Any]]:
    champion, challenger, counts = sides(result)
    verdict = compare(policy, champion, challenger, frauds_learned)
    if not counts["frauds"]:
        verdict = Verdict(False, ("no fraud labelled yet in the replayed window",)
                          + verdict.reasons, verdict.figures)
    return verdict, counts
