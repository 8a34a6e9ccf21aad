"""The online learner: River logistic regression on standardized features, taught by the
labels as they arrive, one learner per source partition (its state follows the partition).

Prediction for a micro-batch is one numpy expression over River's own scaler statistics
and weights (exactly River's ``predict_proba_one``, about 30 µs an event cheaper); learning
goes through River, one label at a time (labels are few).

Before learning a label, the learner predicts it: the log loss and ROC AUC over those
predictions (prequential) say how good it is on what arrived.

**The learner earns its weight.** The feature log keeps, next to each decided
transaction's features, the ensemble's score for it. When its label arrives, the learner's
prediction for it (made before learning it, corrected to the ensemble's base rate) and
the ensemble's score are kept with the label: the last :data:`EVIDENCE` of them. The blend
weight is the share of ``max_weight`` in :data:`GRID` whose blend has the best average
precision on that evidence, and only if it beats the ensemble alone by :data:`MARGIN`
there, with at least :data:`MIN_EVIDENCE` labels and :data:`MIN_FRAUD` frauds; otherwise
0: a learner that does not help does not vote. Once chosen, the share is chosen again
after :data:`REWEIGH_AFTER` more labels: a choice over a thousand labels barely moves with
one more, and each choice costs about 300 µs (seven average precisions), where a live
batch often brings one label.

The stage keeps each partition's learner in memory between batches, with the record it
was last stored as: when the store still holds that record, the learner is used as is,
not read again from JSON (about 110 µs a partition and batch).

River is imported with this module, not on the first label: importing it takes a second
or more from a cold disk, which inside a micro-batch would blow the deadline.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import orjson

from fraudstream.scorers.drift import drift_event
from fraudstream.scorers.river_import import drift, linear_model, optim, preprocessing
from fraudstream.state.engine import LabelEvent, StateStore
from fraudstream.state.features import FEATURE_NAMES

_NAMES = list(FEATURE_NAMES)
_AUC_BINS = 20
#: Labels kept as evidence for the blend weight (the latest), per learner.
EVIDENCE = 1000
#: Candidate weights, as shares of ``max_weight``.
GRID = (0.0, 1 / 6, 1 / 3, 1 / 2, 2 / 3, 1.0)
#: Average precision the blend must gain over the ensemble alone, on the evidence.
MARGIN = 0.005
MIN_EVIDENCE = 200
#: New evidence rows after which a chosen share is chosen again.
REWEIGH_AFTER = 20
MIN_FRAUD = 10


def average_precision(y: np.ndarray, score: np.ndarray) -> float:
    """Average precision (the mean of the precision at each fraud, by descending score;
    tied scores count together), as scikit-learn computes it, in numpy."""
    return float(average_precisions(y, np.asarray(score)[None, :])[0])


def average_precisions(y: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """:func:`average_precision` of each row of ``scores`` against the same labels, in one
    pass over the rows (the blend weight tries several at each batch of labels)."""
    k, n = scores.shape
    if not n:
        return np.zeros(k)
    order = np.argsort(-scores, axis=1)  # ties are counted as one step: any order of them
    s = np.take_along_axis(scores, order, axis=1)
    tp = np.cumsum(np.asarray(y, dtype=np.float64)[order], axis=1)
    ends = np.ones((k, n), dtype=np.bool_)  # the last row of each run of tied scores
    np.not_equal(s[:, 1:], s[:, :-1], out=ends[:, :-1])
    # frauds above each run: the count at the end of the run before it
    before = np.zeros((k, n))
    before[:, 1:] = np.where(ends[:, :-1], tp[:, :-1], 0.0)
    np.maximum.accumulate(before, axis=1, out=before)
    recall_step = np.where(ends, (tp - before) / np.maximum(tp[:, -1:], 1.0), 0.0)
    return ((tp / np.arange(1, n + 1)) * recall_step).sum(axis=1)


class OnlineLearner:
    def __init__(self, learning_rate: float = 0.05) -> None:
        self.model = preprocessing.StandardScaler() | linear_model.LogisticRegression(
            optimizer=optim.SGD(learning_rate), l2=1e-4)
        self.labels = 0
        #: The highest label offset learned (a label delivered again is not learned twice).
        self.last_offset = -1
        self.log_loss_sum = 0.0
        #: Prequential predictions counted in score bins, [genuine, fraud] per bin: the
        #: ROC AUC comes from them (and they store as plain numbers).
        self.auc_bins = [[0] * _AUC_BINS, [0] * _AUC_BINS]
        #: Evidence for the blend weight: the ensemble's score, the learner's prediction
        #: before learning, and the label, of the latest :data:`EVIDENCE` labels.
        self.evidence = np.zeros((0, 3), dtype=np.float64)
        #: The share of ``max_weight`` the evidence chose (0: the ensemble alone).
        self.share = 0.0
        #: Evidence rows added since the share was last chosen on enough evidence (None:
        #: never chosen yet).
        self.unweighed: int | None = None

    def predict(self, X: np.ndarray) -> np.ndarray:
        scaler = self.model["StandardScaler"]
        lr = self.model["LogisticRegression"]
        mean = np.array([scaler.means.get(n, 0.0) for n in _NAMES])
        var = np.array([scaler.vars.get(n, 0.0) for n in _NAMES])
        w = np.array([lr.weights.get(n, 0.0) for n in _NAMES])
        std = np.sqrt(np.where(var > 0, var, 1.0))
        xs = np.where(var > 0, (X.astype(np.float64) - mean) / std, 0.0)
        z = np.clip(xs @ w + lr.intercept, -500.0, 500.0)  # exp() of more overflows
        return 1.0 / (1.0 + np.exp(-z))

    def predict_for(self, X: np.ndarray, base_rate: float | None) -> np.ndarray:
        """:meth:`predict`, corrected for how labels are sampled.

        Every fraud gets a label but only a sample of genuine transactions does, so the
        learner sees far more fraud (often a third of its labels) than traffic holds (about
        1%), and its raw probabilities are inflated as much; blended into the ensemble,
        they would raise every score as labels accrue. The prior-shift correction moves
        the log-odds by ``logit(base_rate) - logit(share of fraud among the labels
        learned)``, ``base_rate`` being the fraud rate the ensemble was trained on."""
        p = self.predict(X)
        if base_rate is None or not 0.0 < base_rate < 1.0 or not self.labels:
            return p
        seen = (sum(self.auc_bins[1]) + 0.5) / (self.labels + 1.0)
        shift = math.log(base_rate / (1 - base_rate)) - math.log(seen / (1 - seen))
        q = np.clip(p, 1e-12, 1 - 1e-12)
        z = np.clip(np.log(q / (1 - q)) + shift, -500.0, 500.0)
        return 1.0 / (1.0 + np.exp(-z))

    def learn(self, X: np.ndarray, y: Sequence[bool]) -> list[float]:
        """Learn each label in turn, after predicting it (prequential quality); returns
        the prequential errors, ``|label - prediction|``."""
        errors = []
        for row, label in zip(X.tolist(), y, strict=True):
            x = dict(zip(_NAMES, row, strict=True))
            p = min(max(self.model.predict_proba_one(x).get(True, 0.5), 1e-7), 1 - 1e-7)
            self.log_loss_sum += -math.log(p if label else 1 - p)
            self.auc_bins[bool(label)][min(int(p * _AUC_BINS), _AUC_BINS - 1)] += 1
            errors.append(1.0 - p if label else p)
            self.model.learn_one(x, bool(label))
            self.labels += 1
        return errors

    def weigh(self, ensemble: np.ndarray, prior: np.ndarray, y: Sequence[bool]) -> float:
        """Add evidence (the ensemble's scores of labelled transactions, the learner's
        predictions for them before learning them, their labels; rows with no ensemble
        score are left out) and choose the weight's share again, once the evidence allows a
        choice and :data:`REWEIGH_AFTER` rows have come since the last one; returns the
        share."""
        rows = np.column_stack([ensemble, prior, np.asarray(y, dtype=np.float64)])
        rows = rows[np.isfinite(rows[:, 0])]
        self.evidence = np.vstack([self.evidence, rows])[-EVIDENCE:]
        if self.unweighed is not None:
            self.unweighed += len(rows)
            if self.unweighed < REWEIGH_AFTER:
                return self.share
        e, p, yy = self.evidence[:, 0], self.evidence[:, 1], self.evidence[:, 2]
        self.share = 0.0
        if len(yy) < MIN_EVIDENCE or yy.sum() < MIN_FRAUD or yy.sum() == len(yy):
            return self.share
        self.unweighed = 0
        shares = np.array(GRID)[:, None]
        blends = (1 - shares) * e + shares * p
        blends[0] = e  # GRID[0]: the ensemble alone
        aps = average_precisions(yy, blends)
        best, best_ap = 0.0, aps[0] + MARGIN
        for share, ap in zip(GRID[1:], aps[1:].tolist(), strict=True):
            if ap > best_ap:
                best, best_ap = share, ap
        self.share = best
        return self.share

    def weight(self, max_weight: float = 0.3) -> float:
        """The blend weight: the evidence's choice (:meth:`weigh`), up to ``max_weight``."""
        return max_weight * self.share

    def quality(self) -> dict[str, float]:
        return {"labels": float(self.labels),
                "log_loss": self.log_loss_sum / self.labels if self.labels else float("nan"),
                "roc_auc": self._auc()}

    def _auc(self) -> float:
        """Probability that a fraud scored above a genuine one (ties in a bin: half)."""
        neg, pos = self.auc_bins
        if not sum(neg) or not sum(pos):
            return float("nan")
        below = wins = 0.0
        for n, f in zip(neg, pos, strict=True):
            wins += f * (below + 0.5 * n)
            below += n
        return wins / (sum(neg) * sum(pos))

    def dumps(self) -> bytes:
        """The learner as JSON: River's scaler statistics and weights, and our counters.
        Stored records come back from a changelog topic or a shared Redis, so they are
        data, never pickles."""
        scaler = self.model["StandardScaler"]
        lr = self.model["LogisticRegression"]
        return orjson.dumps({
            "v": 1, "labels": self.labels, "last_offset": self.last_offset,
            "log_loss_sum": self.log_loss_sum, "auc_bins": self.auc_bins,
            "counts": dict(scaler.counts), "means": dict(scaler.means),
            "vars": dict(scaler.vars), "weights": dict(lr._weights),
            "intercept": lr.intercept, "iterations": lr.optimizer.n_iterations,
            "evidence": self.evidence.astype(np.float32).tobytes().hex(), "share": self.share,
            "unweighed": self.unweighed,
        })

    @staticmethod
    def loads(data: bytes | None) -> OnlineLearner:
        learner = OnlineLearner()
        if not data:
            return learner
        r = orjson.loads(data)
        if not isinstance(r, dict) or r.get("v") != 1:
            raise ValueError("not a version 1 online learner record")
        scaler = learner.model["StandardScaler"]
        lr = learner.model["LogisticRegression"]
        learner.labels, learner.last_offset = int(r["labels"]), int(r["last_offset"])
        learner.log_loss_sum, learner.auc_bins = float(r["log_loss_sum"]), r["auc_bins"]
        scaler.counts.update({k: int(v) for k, v in r["counts"].items()})
        scaler.means.update({k: float(v) for k, v in r["means"].items()})
        scaler.vars.update({k: float(v) for k, v in r["vars"].items()})
        for k, v in r["weights"].items():
            lr._weights[k] = float(v)
        lr.intercept = float(r["intercept"])
        lr.optimizer.n_iterations = int(r["iterations"])
        # Records from before the evidence: none yet, weight 0 until it is gathered.
        evidence = bytes.fromhex(r.get("evidence", ""))
        learner.evidence = np.frombuffer(evidence, dtype=np.float32).astype(
            np.float64).reshape(-1, 3)
        learner.share = float(r.get("share", 0.0))
        unweighed = r.get("unweighed")  # records from before it: chosen at the next label
        learner.unweighed = None if unweighed is None else int(unweighed)
        return learner


LEARNER_KEY = b"l|online"
DAY_MS = 86_400_000


def log_key(event_time: int, transaction_id: str) -> bytes:
    """Feature-log key: ``f|<event day>|<transaction_id>`` (sorted by day, for expiry)."""
    return b"f|%05d|%s" % (event_time // DAY_MS, transaction_id.encode())


class OnlineStage:
    """The feature log and the per-partition learners, in the feature state store.

    Per batch: one read (the logged features of the batch's labels, and the learners of
    its partitions), learning, then the writes (new feature-log entries, changed
    learners) go out with the batch's other state records.
    """

    def __init__(self, store: StateStore, max_weight: float = 0.3,
                 adwin_delta: float = 0.002) -> None:
        self.store = store
        self.max_weight = max_weight
        self.adwin_delta = adwin_delta
        self.learned = 0
        self.unjoined = 0
        #: Partition -> prequential quality of its learner, after its last lesson.
        self.quality: dict[int, dict[str, float]] = {}
        #: Partition -> ADWIN over its learner's prequential errors. Kept in memory: after
        #: a restart or a rebalance a partition's detector starts over.
        self.adwin: dict[int, drift.ADWIN] = {}
        #: Drift events of the learners' error found since the caller last took them.
        self.drift_events: list[dict[str, Any]] = []
        #: Partition -> (the record last read or written, the learner it holds).
        self._resident: dict[int, tuple[bytes | None, OnlineLearner]] = {}

    def learn(self, labels: Sequence[LabelEvent], partitions: set[int],
              writes: list[tuple[int, bytes, bytes]], base_rate: float | None = None,
              ) -> dict[int, OnlineLearner]:
        """Learners of ``partitions`` (and of the labels'), taught the labels whose
        features were logged, and weighed against the ensemble's logged scores
        (predictions corrected to ``base_rate``, as the blend does); changed learners are
        appended to ``writes``."""
        parts = sorted(partitions | {lab.partition for lab in labels})
        label_keys = [(lab.partition, log_key(lab.label["event_time"], lab.label["transaction_id"]))
                      for lab in labels]
        raw = self.store.read([(p, LEARNER_KEY) for p in parts] + label_keys)
        learners = {}
        stored: dict[int, bytes | None] = {}
        for p, data in zip(parts, raw[:len(parts)], strict=True):
            # Out of residence while in use: a batch that fails half-way leaves no learner
            # behind that the store does not hold.
            kept = self._resident.pop(p, None)
            stored[p] = data
            if kept is not None and kept[0] == data:
                learners[p] = kept[1]
                continue
            try:
                learners[p] = OnlineLearner.loads(data)
            except (ValueError, KeyError, TypeError, AttributeError):  # unreadable: afresh
                learners[p] = OnlineLearner()
        taught: dict[int, tuple[list[np.ndarray], list[bool], list[float]]] = {}
        last: dict[int, int] = {}
        for lab, logged in zip(labels, raw[len(parts):], strict=True):
            if lab.offset <= max(learners[lab.partition].last_offset,
                                 last.get(lab.partition, -1)):
                continue  # delivered again (after a restart, or twice in one batch)
            last[lab.partition] = max(last.get(lab.partition, -1), lab.offset)
            if logged is None:
                self.unjoined += 1
                continue
            xs, ys, es = taught.setdefault(lab.partition, ([], [], []))
            row = np.frombuffer(logged, dtype=np.float32)
            xs.append(row[:len(_NAMES)])
            # the ensemble's score follows the features (entries of older releases: none)
            es.append(float(row[len(_NAMES)]) if len(row) > len(_NAMES) else math.nan)
            ys.append(bool(lab.label["is_fraud"]))
        for p, offset in last.items():
            if p in taught:
                xs, ys, es = taught[p]
                X = np.vstack(xs)
                learners[p].weigh(np.asarray(es), learners[p].predict_for(X, base_rate), ys)
                errors = learners[p].learn(X, ys)
                self.learned += len(ys)
                self._watch_error(p, errors)
                self.quality[p] = learners[p].quality() | {
                    "error_mean": self.adwin[p].estimation,
                    "weight": learners[p].weight(self.max_weight)}
            learners[p].last_offset = offset
            stored[p] = learners[p].dumps()
            writes.append((p, LEARNER_KEY, stored[p]))
        for p, learner in learners.items():
            self._resident[p] = (stored[p], learner)
        return learners

    def _watch_error(self, partition: int, errors: list[float]) -> None:
        """ADWIN on the error stream: a change in its mean (the labels no longer look like
        what the learner learned, or it caught up) is a drift event, ``warning`` when the
        error rose and ``info`` when it fell."""
        detector = self.adwin.get(partition)
        if detector is None:
            detector = self.adwin[partition] = drift.ADWIN(delta=self.adwin_delta)
        for e in errors:
            before = detector.estimation
            detector.update(e)
            if detector.drift_detected:
                now = int(time.time() * 1000)
                self.drift_events.append(drift_event(
                    "online_error", "adwin", detector.estimation, before, now, now,
                    detector.width, f"online-p{partition}",
                    "warning" if detector.estimation > before else "info"))

    def blend(self, learners: dict[int, OnlineLearner], partitions: Sequence[int],
              X: np.ndarray, scores: np.ndarray, base_rate: float | None = None
              ) -> np.ndarray:
        """Ensemble scores mixed with each event's partition learner, by its weight; the
        learner's probabilities corrected to ``base_rate`` (:meth:`OnlineLearner.predict_for`)."""
        out = scores.copy()
        parts = np.asarray(partitions)
        for p, learner in learners.items():
            w = learner.weight(self.max_weight)
            rows = np.flatnonzero(parts == p)
            if w <= 0 or not len(rows):
                continue
            out[rows] = (1 - w) * scores[rows] + w * learner.predict_for(X[rows], base_rate)
        return out

    def blended(self, learners: dict[int, OnlineLearner], partitions: Sequence[int]
                ) -> np.ndarray:
        """Which events :meth:`blend` mixes with a learner (its weight above 0)."""
        parts = np.asarray(partitions)
        out = np.zeros(len(parts), dtype=bool)
        for p, learner in learners.items():
            if learner.weight(self.max_weight) > 0:
                out |= parts == p
        return out

    @staticmethod
    def log_entries(items: Sequence[tuple[int, int, str]], X: np.ndarray,
                    ensemble: np.ndarray | None = None) -> list[tuple[int, bytes, bytes]]:
        """(partition, event_time, transaction_id) + their features and the ensemble's
        score (NaN: none, the rules decided) -> feature-log writes."""
        scores = np.full(len(X), np.nan) if ensemble is None else ensemble
        X32 = np.column_stack([X, scores]).astype(np.float32)
        return [(p, log_key(t, txn_id), X32[i].tobytes())
                for i, (p, t, txn_id) in enumerate(items)]
