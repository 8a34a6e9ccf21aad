"""Online learning from delayed labels: the features logged at decision time meet their
labels, the River learner learns, its predictions move the right way, its state is kept."""

from __future__ import annotations

import numpy as np

from fraudstream.schemas.codec import Codecs, make_registry
from fraudstream.scorers.cascade import ModelStage
from fraudstream.scorers.online import (
    LEARNER_KEY,
    REWEIGH_AFTER,
    OnlineLearner,
    OnlineStage,
    average_precision,
    average_precisions,
    log_key,
)
from fraudstream.scorers.rules import RuleSet, RulesScorer
from fraudstream.state.engine import FeatureEngine, MemoryStore
from fraudstream.state.features import FEATURE_NAMES, FeatureConfig
from fraudstream.streams.pipeline import Limits, Pipeline, RawRecord
from fraudstream.streams.settings import TopicSettings
from tests.conftest import T0_MS

LIMITS = Limits(max_record_bytes=65536, max_future_ms=300_000, max_amount=1_000_000.0)
NOW = T0_MS


def txn(i: int, amount: float) -> dict:
    return {"transaction_id": f"o{i}", "event_time": NOW - 3_600_000 + i * 1000,
            "card_id": f"card_o{i}", "customer_id": None, "merchant_id": "m1",
            "terminal_id": None, "amount": amount, "currency": "EUR", "mcc": "5411",
            "country": "FR", "card_country": "FR", "lat": None, "lon": None,
            "device_id": None, "ip": None, "channel": "pos"}


def test_labels_after_decisions_teach_the_learner(models_registry):
    codecs = Codecs(make_registry("mock://online"), TopicSettings())
    store = MemoryStore()
    stage = ModelStage(active=models_registry.load(models_registry.versions()[0]))
    online = OnlineStage(store, max_weight=0.3)
    pipeline = Pipeline(codecs, RulesScorer(RuleSet.default()), LIMITS,
                        features=FeatureEngine(FeatureConfig(), store), models=stage,
                        budget_ms=5000.0, online=online)

    def run(txns=(), labels=()):
        recs = [RawRecord("transactions", 0, 1000 + int(t["transaction_id"][1:]), b"k",
                          codecs.transaction.encode(t), NOW) for t in txns]
        lrecs = [RawRecord("labels", 0, i, b"k", codecs.label.encode(lab), NOW)
                 for i, lab in enumerate(labels)]
        out = pipeline.process(recs, lambda p, keys: [None] * len(keys), lrecs)
        store.write(out.feature_writes)  # as the committer does
        return out

    # 200 decisions: big amounts will turn out fraudulent, small ones genuine.
    rng = np.random.default_rng(3)
    amounts = np.where(rng.random(200) < 0.5, rng.uniform(500, 900, 200),
                       rng.uniform(5, 40, 200))
    decided = run([txn(i, float(a)) for i, a in enumerate(amounts)])
    assert len(decided.decisions) == 200
    assert (0, LEARNER_KEY) not in store.data  # nothing learned yet
    # the feature log keeps each decision's features and the ensemble's score for it
    first = codecs.decision.decode(decided.decisions[0][1])
    entry = np.frombuffer(store.data[(0, log_key(NOW - 3_600_000, "o0"))], dtype=np.float32)
    assert len(entry) == len(FEATURE_NAMES) + 1
    assert np.isclose(entry[-1], first["score"], rtol=1e-6)

    labels = [{"transaction_id": f"o{i}", "card_id": f"card_o{i}", "merchant_id": "m1",
               "is_fraud": bool(a > 100), "fraud_type": None, "source": "chargeback",
               "event_time": NOW - 3_600_000 + i * 1000, "label_time": NOW}
              for i, a in enumerate(amounts)]
    labels.append({**labels[0], "transaction_id": "never-decided"})  # nothing to join
    run(labels=labels)
    assert online.learned == 200 and online.unjoined == 1
    run(labels=labels)  # delivered again (a restart before the offsets were committed)
    assert online.learned == 200 and online.unjoined == 1

    learner = OnlineLearner.loads(store.data[(0, LEARNER_KEY)])  # its state was stored
    X = np.array([v.row for v in decided.features.vectors], dtype=np.float32)
    assert np.allclose(OnlineLearner().predict(X), 0.5)  # before: no opinion
    p = learner.predict(X)
    fraud = amounts > 100
    assert p[fraud].mean() > 0.8 and p[~fraud].mean() < 0.2  # the way the labels point
    # Its weight is earned on evidence: its predictions for these labels before learning
    # them were a coin's, so the blend could not beat the ensemble there: weight 0.
    assert learner.labels == 200 and learner.share == 0.0 and learner.weight(0.3) == 0.0
    assert len(learner.evidence) == 200
    quality = learner.quality()
    assert quality["labels"] == 200 and quality["log_loss"] < 0.693  # better than a coin

    # With a weight (as if earned), the blend moves scores: the same kind of transaction,
    # with and without it.
    learner.share = 1.0
    store.data[(0, LEARNER_KEY)] = learner.dumps()
    after = run([txn(500, 850.0), txn(501, 10.0)])
    blended = [codecs.decision.decode(v)["score"] for _k, v in after.decisions]
    Xa = np.array([v.row for v in after.features.vectors], dtype=np.float32)
    model_only, raw = stage.active.predict(Xa), learner.predict(Xa)
    # Half of these labels were fraud, the model's history about 1%: the learner's
    # probabilities enter the blend corrected to the model's base rate.
    q = learner.predict_for(Xa, stage.active.base_rate)
    w = learner.weight(0.3)
    assert w == 0.3 and np.allclose(blended, (1 - w) * model_only + w * q)
    # the decision says the learner had a say; those before (weight 0) said the model
    assert {codecs.decision.decode(v)["stage"] for _k, v in after.decisions} == {"online"}
    assert first["stage"] == "model"
    assert raw[0] > 0.8 > 0.2 > raw[1]
    assert q[0] > q[1] and q[0] < raw[0] and q[1] < raw[1]
    assert stage.active.base_rate is not None and 0 < stage.active.base_rate < 0.1


def test_adwin_on_the_learners_error_reports_a_change_in_what_labels_say():
    """Labels that follow one rule, then its opposite: the learner's prequential error
    drops (info events at most), then jumps: a warning drift event on online_error."""
    from fraudstream.state.engine import LabelEvent

    store = MemoryStore()
    stage = OnlineStage(store)
    rng = np.random.default_rng(11)
    n = 1500
    X = rng.normal(size=(n, len(FEATURE_NAMES))).astype(np.float32)
    times = [NOW - 86_400_000 + i for i in range(n)]
    store.write(OnlineStage.log_entries([(0, t, f"a{i}") for i, t in enumerate(times)], X))

    def teach(lo: int, hi: int, flipped: bool) -> list[dict]:
        labels = [LabelEvent(0, i, {"transaction_id": f"a{i}", "event_time": times[i],
                                    "is_fraud": bool((X[i, 0] > 0) != flipped)})
                  for i in range(lo, hi)]
        for k in range(0, len(labels), 50):  # batches of 50, as they would arrive
            writes: list = []
            stage.learn(labels[k:k + 50], {0}, writes)
            store.write(writes)
        events, stage.drift_events = stage.drift_events, []
        return events

    before = teach(0, 800, flipped=False)
    assert all(e["severity"] == "info" and e["value"] < e["threshold"] for e in before)
    assert stage.quality[0]["error_mean"] < 0.2
    after = teach(800, n, flipped=True)
    rising = [e for e in after if e["severity"] == "warning"]
    assert rising, after
    e = rising[0]
    assert (e["feature"], e["statistic"], e["model_version"]) == ("online_error", "adwin",
                                                                  "online-p0")
    assert e["value"] > e["threshold"] and e["window_count"] > 0


def test_average_precision_is_scikit_learns():
    from sklearn.metrics import average_precision_score

    rng = np.random.default_rng(4)
    for n in (50, 1000):
        y = rng.random(n) < 0.2
        score = np.round(rng.random(n) + y * 0.3, 1)  # many ties
        assert np.isclose(average_precision(y, score), average_precision_score(y, score))


def test_average_precisions_of_several_score_rows_are_each_rows_own():
    from sklearn.metrics import average_precision_score

    rng = np.random.default_rng(5)
    y = rng.random(400) < 0.25
    rows = np.stack([np.round(rng.random(400) + y * 0.2, d) for d in (1, 2, 8)])
    got = average_precisions(y, rows)
    assert got.shape == (3,)
    for ap, row in zip(got, rows, strict=True):
        assert np.isclose(ap, average_precision_score(y, row))
    assert average_precisions(y[:0], rows[:, :0]).tolist() == [0.0, 0.0, 0.0]


def test_a_feature_log_for_named_transactions_keeps_only_theirs(models_registry):
    """A replay knows which transactions will be labelled: it logs only their features,
    the same entries a worker (which logs every one) writes for them."""
    codecs = Codecs(make_registry("mock://online-log"), TopicSettings())
    version = models_registry.versions()[0]
    recs = [RawRecord("transactions", 0, 1000 + i, b"k", codecs.transaction.encode(txn(i, a)),
                      NOW) for i, a in enumerate((12.0, 640.0, 33.0, 870.0))]

    def logged(feature_log_for):
        store = MemoryStore()
        pipeline = Pipeline(codecs, RulesScorer(RuleSet.default()), LIMITS,
                            features=FeatureEngine(FeatureConfig(), store),
                            models=ModelStage(active=models_registry.load(version)),
                            budget_ms=5000.0, online=OnlineStage(store),
                            feature_log_for=feature_log_for)
        out = pipeline.process(recs, lambda p, keys: [None] * len(keys))
        return {k: v for p, k, v in out.feature_writes if k.startswith(b"f|")}

    every = logged(None)
    assert len(every) == 4
    some = logged({"o1", "o3", "never-seen"})
    assert some == {k: every[k] for k in (log_key(NOW - 3_600_000 + i * 1000, f"o{i}")
                                          for i in (1, 3))}
    assert logged(set()) == {}


def test_the_learner_earns_its_weight_on_evidence_or_gets_none():
    """Labelled transactions with the ensemble's score and the learner's prediction made
    before learning each: the blend weight goes to the learner only where it improves the
    ensemble's average precision on them."""
    rng = np.random.default_rng(7)
    n = 600
    y = rng.random(n) < 0.1
    good = np.clip(0.6 * y + rng.normal(0.2, 0.15, n), 0, 1)  # separates the classes
    noise = rng.random(n)                                      # knows nothing

    helpful = OnlineLearner()
    helpful.weigh(noise, good, y.tolist())  # the ensemble is blind, the learner is not
    assert helpful.share > 0 and helpful.weight(0.3) == 0.3 * helpful.share

    useless = OnlineLearner()
    useless.weigh(good, noise, y.tolist())  # the ensemble is good, the learner guesses
    assert useless.share == 0.0 and useless.weight(0.3) == 0.0

    few = OnlineLearner()
    few.weigh(noise[:100], good[:100], y[:100].tolist())  # too little evidence yet
    assert few.share == 0.0

    # no ensemble score (the rules decided): not evidence
    unscored = OnlineLearner()
    unscored.weigh(np.full(n, np.nan), good, y.tolist())
    assert len(unscored.evidence) == 0 and unscored.share == 0.0

    again = OnlineLearner.loads(helpful.dumps())  # the evidence is kept with the learner
    assert again.share == helpful.share
    assert np.allclose(again.evidence, helpful.evidence.astype(np.float32))


def test_a_label_delivered_twice_in_one_batch_is_learned_once():
    from fraudstream.state.engine import LabelEvent

    store = MemoryStore()
    stage = OnlineStage(store)
    X = np.random.default_rng(2).normal(size=(3, len(FEATURE_NAMES))).astype(np.float32)
    store.write(OnlineStage.log_entries([(0, NOW, f"d{i}") for i in range(3)], X))
    labels = [LabelEvent(0, i, {"transaction_id": f"d{i}", "event_time": NOW,
                                "is_fraud": i == 0}) for i in range(3)]
    writes: list = []
    stage.learn([*labels, labels[1], labels[2]], {0}, writes)  # a seek back, mid-batch
    assert stage.learned == 3
    assert OnlineLearner.loads(writes[-1][2]).labels == 3


def test_a_chosen_weight_is_chosen_again_after_enough_new_labels():
    """The learner improves the ensemble, then the two swap: the share holds while fewer
    than REWEIGH_AFTER new labels came, then falls to 0 on the evidence; it survives a
    store round trip on the way."""
    rng = np.random.default_rng(5)
    n = 600
    y = rng.random(n) < 0.15
    good = np.clip(0.6 * y + rng.normal(0.2, 0.15, n), 0, 1)
    noise = rng.random(n)
    learner = OnlineLearner()
    learner.weigh(noise, good, y.tolist())
    assert learner.share > 0
    chosen = learner.share
    # the learner turns useless: a few labels keep the choice...
    swap_y = rng.random(2 * REWEIGH_AFTER) < 0.5
    swap_good = np.clip(0.6 * swap_y + rng.normal(0.2, 0.15, len(swap_y)), 0, 1)
    swap_noise = rng.random(len(swap_y))
    k = REWEIGH_AFTER - 1
    learner.weigh(swap_good[:k], swap_noise[:k], swap_y[:k].tolist())
    assert learner.share == chosen
    learner = OnlineLearner.loads(learner.dumps())
    assert learner.share == chosen and learner.unweighed == k
    # ...and the next one reaches REWEIGH_AFTER: chosen again, on the whole evidence
    learner.weigh(swap_good[k:k + 1], swap_noise[k:k + 1], swap_y[k:k + 1].tolist())
    assert learner.unweighed == 0
    expected = OnlineLearner()
    expected.weigh(learner.evidence[:, 0], learner.evidence[:, 1],
                   learner.evidence[:, 2].astype(bool).tolist())
    assert learner.share == expected.share


def test_a_learner_kept_in_memory_is_used_only_while_the_store_holds_its_record():
    """The stage keeps each partition's learner between batches. After a batch whose
    writes never reached the store (a failed commit), its labels are learned again from
    what the store holds, not on top of the learner in memory."""
    from fraudstream.state.engine import LabelEvent

    store = MemoryStore()
    stage = OnlineStage(store)
    X = np.random.default_rng(3).normal(size=(30, len(FEATURE_NAMES))).astype(np.float32)
    store.write(OnlineStage.log_entries([(0, NOW, f"r{i}") for i in range(30)], X))
    labels = [LabelEvent(0, i, {"transaction_id": f"r{i}", "event_time": NOW,
                                "is_fraud": i % 3 == 0}) for i in range(30)]
    writes: list = []
    first = stage.learn(labels[:10], {0}, writes)[0]
    store.write(writes)
    again = stage.learn(labels[10:20], {0}, writes := [])[0]
    assert again is first and again.labels == 20  # in memory, and what the store holds
    store.write(writes)
    lost = stage.learn(labels[20:25], {0}, [])[0]  # its writes never reach the store
    assert lost is first and lost.labels == 25
    redo = stage.learn(labels[20:30], {0}, writes := [])[0]
    assert redo is not lost and redo.labels == 30
    assert OnlineLearner.loads(writes[-1][2]).labels == 30
