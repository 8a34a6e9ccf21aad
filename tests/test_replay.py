"""``fraudstream replay`` on the embedded broker: the champion's replayed decisions are the
live worker's, the report adds up, and the live group and state are left as they were."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from fraudstream.scorers.registry import Registry
from fraudstream.streams.replay.engine import REPLAY_HEADER, run_replay
from fraudstream.streams.replay.ranges import Bound, ReplayConfig, ReplayError
from fraudstream.streams.replay.report import by_tenth, write_report
from fraudstream.streams.settings import Settings, TopicSettings
from fraudstream.streams.topics import ensure_topics
from fraudstream.streams.traffic.generator import arrival_events, generate_history
from fraudstream.streams.traffic.world import GeneratorConfig
from tests.conftest import ROOT, T0_MS, consume_all
from tests.test_features_e2e import committed

DAY_MS = 86_400_000


def test_bounds_read_offsets_and_times():
    assert Bound.parse("1200") == Bound("offset", 1200)
    assert Bound.parse("@1795000000000") == Bound("time", 1795000000000)
    assert Bound.parse("2026-11-22T10:00:00Z") == Bound("time", 1795341600000)
    assert Bound.parse("2026-11-22T11:00:00+01:00") == Bound("time", 1795341600000)
    for bad in ("yesterday", "2026-11-22T10:00:00", "-5"):
        with pytest.raises(ReplayError):
            Bound.parse(bad)


def test_an_event_time_range_keeps_late_records_and_ends_past_the_lateness():
    from fraudstream.streams.replay.ranges import _PartitionRange

    r = _PartitionRange(0, Bound("event", 100), Bound("event", 200), None, None,
                        lateness_ms=50)
    roles = [r.classify(offset, 0, et) for offset, et in enumerate(
        (90, 120, 80, 210, 150, None, 260, 170))]
    # 90: before the range, no warm-up; 80 (late, before it) and 210 (after it, within the
    # lateness) feed the state; 150 is late but in it; an unreadable record is in it (the
    # pipeline dead-letters it); 260 ends the partition.
    assert roles == [None, "range", "warmup", "warmup", "range", "range", None, None]
    assert r.done


def fresh_topics(settings: Settings, partitions: int, **changes) -> Settings:
    uid = uuid.uuid4().hex[:8]
    topics = TopicSettings.suffixed(uid)
    out = Settings(topics=topics, kafka=settings.kafka, codec=settings.codec,
                   worker=settings.worker, features=settings.features,
                   scoring=settings.scoring).replace(
        kafka={"partitions": partitions},
        worker={"app_id": f"replay-{uid}",
                "data_dir": settings.worker.data_dir.parent / f"state-{uid}"}, **changes)
    ensure_topics(out)
    return out


def history(seed: int, days: float, per_day: int) -> list[tuple[str, dict]]:
    start = T0_MS - int((days + 0.5) * DAY_MS)
    txns, labels = generate_history(
        GeneratorConfig(seed=seed, n_cards=300, label_delay_days=0.3,
                        label_delay_spread_days=0.1, id_prefix=f"r{uuid.uuid4().hex[:6]}"),
        start, days, per_day)
    return arrival_events(txns, labels)


def produce_arrivals(settings: Settings, codecs, events: list[tuple[str, dict]],
                     extra: list[tuple[bytes, bytes]] = ()) -> None:
    """Transactions and labels in arrival order, through one producer; ``extra`` raw
    records go to transactions after them."""
    producer = Producer({**settings.kafka.client_config(), "linger.ms": 5})
    for kind, rec in events:
        topic, codec = ((settings.topics.transactions, codecs.transaction) if kind == "transaction"
                        else (settings.topics.labels, codecs.label))
        producer.produce(topic, key=rec["card_id"].encode(), value=codec.encode(rec))
    for key, value in extra:
        producer.produce(settings.topics.transactions, key=key, value=value)
    assert producer.flush(30) == 0


def live_position(settings: Settings) -> dict[str, list[int]]:
    """The live worker's committed offsets, and the end offsets of what it writes."""
    consumer = Consumer(settings.kafka.consumer_config(settings.worker.app_id))
    parts = range(settings.kafka.partitions)
    try:
        committed = consumer.committed(
            [TopicPartition(t, p) for t in (settings.topics.transactions, settings.topics.labels)
             for p in parts], timeout=10)
        ends = {t: [consumer.get_watermark_offsets(TopicPartition(t, p), timeout=10)[1]
                    for p in parts]
                for t in (settings.topics.decisions, settings.topics.dlq,
                          f"{settings.worker.app_id}-state-changelog")}
    finally:
        consumer.close()
    return {"committed": [tp.offset for tp in committed], **ends}


def registry_with(models_registry, tmp_path: Path) -> tuple[Path, str, str]:
    root = tmp_path / "models"
    for v in models_registry.versions():
        shutil.copytree(models_registry.root / v, root / v)
    first, second = Registry(root).versions()
    Registry(root).promote(first)
    return root, first, second


def test_replaying_the_champion_gives_the_live_decisions_and_leaves_the_live_alone(
        models_registry, stack_settings, start_worker, codecs, tmp_path):
    root, first, second = registry_with(models_registry, tmp_path)
    # One partition: the replay reads it in the order the worker did. No deadline
    # fallbacks (a large budget) and no online learner on either side.
    settings = fresh_topics(stack_settings, 1,
                            scoring={"models_dir": root, "budget_ms": 10_000.0, "online": False})
    events = history(21, 1.5, 2000)
    txns = [rec for kind, rec in events if kind == "transaction"]
    bad = [(b"card_x", b"\x00not avro"), (b"card_y", b"")]
    again = (txns[5]["card_id"].encode(), codecs.transaction.encode(txns[5]))
    worker = start_worker(settings)
    # Labels first, read by the worker before any transaction: which of two topics a
    # worker fetches first is up to the broker, so live decisions near a label would
    # otherwise depend on timing (the replay orders labels by their timestamps).
    labels = [(k, r) for k, r in events if k == "label"]
    produce_arrivals(settings, codecs, labels)
    deadline = time.monotonic() + 90
    while committed(settings, settings.topics.labels) < len(labels):
        assert worker.running and time.monotonic() < deadline, worker.tail()
        time.sleep(0.5)
    produce_arrivals(settings, codecs, [(k, r) for k, r in events if k != "label"],
                     [*bad, again])
    live = consume_all(settings, settings.topics.decisions, len(txns) + 1, timeout_s=120)
    assert worker.running, worker.tail()
    assert worker.stop() == 0, worker.tail()
    before = live_position(settings)

    out = tmp_path / "report"
    env = {"PATH": "/usr/bin:/bin", **settings.to_env()}
    proc = subprocess.run(
        [sys.executable, "-m", "fraudstream", "replay", "--from", "0", "--champion", first,
         "--challenger", second, "--online", "off", "--replay-id", "r1", "--out", str(out),
         "--quiet"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "report:" in proc.stdout

    data = json.loads((out / "result.json").read_text())
    c = data["counts"]
    assert c == {**c, "read": len(txns) + 3, "decided": len(txns), "duplicates": 1, "bad": 2,
                 "published": len(txns), "labels_fed": len(labels)}
    assert sum(c["bad_reasons"].values()) == 2
    assert sum(sum(row.values()) for row in data["flip_matrix"].values()) == len(txns)

    # The champion's replayed decisions are the live ones, transaction by transaction.
    live_by_id = {}
    for m in live:
        d = codecs.decision.decode(m.value())
        live_by_id.setdefault(d["transaction_id"], d)
    assert all(d["model_version"] == first and not d["fallback"] for d in live_by_id.values())
    import csv

    replayed = {}
    with (out / "decisions.csv").open() as fh:
        for row in csv.DictReader(fh):
            replayed[row["transaction_id"]] = row
    assert replayed.keys() == live_by_id.keys()
    mismatched = [tid for tid, row in replayed.items()
                  if row["champion"] != live_by_id[tid]["decision"]
                  or not math.isclose(float(row["champion_score"]), live_by_id[tid]["score"],
                                      rel_tol=1e-5, abs_tol=1e-6)]
    assert mismatched == []
    assert {row["champion"] for row in replayed.values()} >= {"approve", "decline"}

    # The challenger's decisions are on decisions.shadow, tagged; nothing live moved.
    shadow = consume_all(settings, settings.topics.decisions_shadow, len(txns), timeout_s=60)
    assert len(shadow) == len(txns)
    assert {dict(m.headers())[REPLAY_HEADER] for m in shadow} == {b"r1"}
    assert {codecs.decision.decode(m.value())["model_version"] for m in shadow} == {second}
    assert live_position(settings) == before
    report = (out / "report.md").read_text()
    assert "## Decision flips" in report
    written = report + (out / "flips.csv").read_text() + (out / "decisions.csv").read_text()
    assert not any(t["card_id"] in written for t in txns[:200])


def test_a_time_range_after_a_warm_up_adds_up_and_shows_the_challenger(
        models_registry, stack_settings, codecs, tmp_path):
    root, first, second = registry_with(models_registry, tmp_path)
    settings = fresh_topics(stack_settings, 3, scoring={"models_dir": root})
    events = history(22, 2.0, 1500)
    cut = next(i for i, (kind, rec) in enumerate(events) if kind == "transaction"
               and rec["event_time"] >= events[0][1]["event_time"] + DAY_MS)
    produce_arrivals(settings, codecs, events[:cut])
    time.sleep(0.05)
    middle = int(time.time() * 1000)  # a Kafka timestamp (produce time), not event time
    time.sleep(0.05)
    produce_arrivals(settings, codecs, events[cut:])
    in_range = sum(1 for kind, _ in events[cut:] if kind == "transaction")
    warm = sum(1 for kind, _ in events[:cut] if kind == "transaction")

    result = run_replay(settings, ReplayConfig(
        challenger=second, champion=first, start=Bound("time", middle),
        warmup=Bound("offset", 0), publish=False))
    data = write_report(result, tmp_path / "report")
    c = data["counts"]
    assert (c["read"], c["decided"], c["warmup"], c["bad"]) == (in_range, in_range, warm, 0)
    matrix = data["flip_matrix"]
    assert sum(sum(row.values()) for row in matrix.values()) == in_range
    assert data["flipped"] == in_range - sum(matrix[o][o] for o in matrix) > 0
    for side in ("champion", "challenger"):
        assert math.isclose(sum(data["rates"][side].values()), 1.0)
        q = data["quality"][side]
        assert 0.5 < q["auc_roc"] <= 1.0 and 0.0 < q["average_precision"] <= 1.0
    assert data["quality"]["frauds"] > 0
    assert c["labels_fed"] > 0 and c["published"] == 0
    assert (tmp_path / "report" / "scores.png").stat().st_size > 1000
    flips = (tmp_path / "report" / "flips.csv").read_text().splitlines()
    assert len(flips) == data["flipped"] + 1
    # The same range without the warm-up starts from empty state: other features.
    cold = run_replay(settings, ReplayConfig(
        challenger=second, champion=first, start=Bound("time", middle), publish=False))
    assert cold.read == in_range and cold.warmup == 0
    assert cold.decided.champion_score != result.decided.champion_score
    # Decided in the reading process (``processes=1``), the report is the same, score for
    # score: the second process (the default) changes where the learners, rules and
    # models run, not what they decide.
    one = run_replay(settings, ReplayConfig(
        challenger=second, champion=first, start=Bound("time", middle),
        warmup=Bound("offset", 0), publish=False, processes=1))
    assert result.peak_rss_mb is not None and one.peak_rss_mb is None
    a, b = result.decided, one.decided
    assert a.transaction_ids == b.transaction_ids
    for column in ("champion", "challenger", "champion_score", "challenger_score", "cards",
                   "partitions", "event_times"):
        assert bytes(getattr(a, column)) == bytes(getattr(b, column)), column
    assert (one.read, one.warmup, one.labels_fed, one.fallbacks) == (
        result.read, result.warmup, result.labels_fed, result.fallbacks)


def test_a_replay_refuses_to_write_to_the_live_decisions(models_registry, stack_settings,
                                                        tmp_path):
    root, first, second = registry_with(models_registry, tmp_path)
    settings = stack_settings.replace(scoring={"models_dir": root})
    with pytest.raises(ReplayError, match="never writes"):
        run_replay(settings, ReplayConfig(challenger=second, start=Bound("offset", 0),
                                          topic=settings.topics.decisions))
    with pytest.raises(ReplayError, match="no version"):
        run_replay(settings, ReplayConfig(challenger="nope", start=Bound("offset", 0)))


def test_a_replay_on_another_machine_takes_the_champion_in_force_and_fetches_the_versions(
        models_registry, stack_settings, codecs, tmp_path):
    """An ML engineer replays on a laptop whose models folder is empty: the champion is the
    version every worker serves (the control topic's), and both versions come from the
    artifacts topic, checked as a worker checks them."""
    from fraudstream.schemas.control import ControlRecord
    from fraudstream.streams.control.artifacts import upload
    from fraudstream.streams.control.topic import publish

    root, first, second = registry_with(models_registry, tmp_path)
    settings = fresh_topics(stack_settings, 3, scoring={"models_dir": root})
    for version in (first, second):
        upload(settings, Registry(root), version)
    # The workers serve ``second``; this folder's own ACTIVE pointer says ``first``.
    publish(settings, ControlRecord.make("model", second, {"active": second, "shadow": None},
                                         "ops", T0_MS, "in force").after(None))
    events = history(31, 0.5, 600)
    produce_arrivals(settings, codecs, events)
    laptop = tmp_path / "laptop-models"
    result = run_replay(settings.replace(scoring={"models_dir": laptop}), ReplayConfig(
        challenger=first, start=Bound("offset", 0), publish=False))
    assert (result.champion, result.challenger) == (second, first)
    assert sorted(Registry(laptop).versions()) == sorted([first, second])
    assert result.decided.champion_score and len(result.decided.transaction_ids) == sum(
        1 for kind, _ in events if kind == "transaction")
    with pytest.raises(ReplayError, match="none to fetch"):
        run_replay(settings.replace(scoring={"models_dir": laptop}), ReplayConfig(
            challenger="v-never-sent", start=Bound("offset", 0), publish=False))


def test_the_deciding_process_failing_or_dying_is_an_error_not_a_wait(
        models_registry, stack_settings, tmp_path):
    from fraudstream.streams.replay.decider import RemoteDecider

    root, first, second = registry_with(models_registry, tmp_path)
    settings = stack_settings.replace(scoring={"models_dir": root})
    failing = RemoteDecider(settings, ReplayConfig(challenger="nope", start=Bound("offset", 0)),
                            "replay-test")
    try:
        with pytest.raises(ReplayError, match="no version 'nope'"):
            failing.finish()
    finally:
        failing.close()
    dying = RemoteDecider(settings, ReplayConfig(challenger=second, start=Bound("offset", 0),
                                                 publish=False), "replay-test")
    try:
        dying._proc.kill()
        with pytest.raises(ReplayError, match="exited"):
            dying.finish()
    finally:
        dying.close()


@pytest.mark.timeout(120)
def test_an_end_offset_ends_the_range_even_when_nothing_follows_it(
        models_registry, stack_settings, codecs, tmp_path):
    root, first, second = registry_with(models_registry, tmp_path)
    settings = fresh_topics(stack_settings, 1, scoring={"models_dir": root})
    events = [(k, r) for k, r in history(23, 0.2, 1500) if k == "transaction"][:300]
    produce_arrivals(settings, codecs, events)
    for end in (300, 120):  # 300: the last record; no record at that offset will come
        result = run_replay(settings, ReplayConfig(
            challenger=second, start=Bound("offset", 20), end=Bound("offset", end),
            publish=False))
        assert (result.read, len(result.decided)) == (end - 20, end - 20)
        assert result.decided.transaction_ids[0] == events[20][1]["transaction_id"]


def test_event_time_bounds_pick_the_days_of_a_history_loaded_in_one_go(
        models_registry, stack_settings, codecs, tmp_path):
    # Two days loaded at once: every Kafka timestamp is the load's, the event times are
    # the history's. A fraud team names its windows in event time.
    root, first, second = registry_with(models_registry, tmp_path)
    settings = fresh_topics(stack_settings, 2, scoring={"models_dir": root, "online": False})
    events = history(31, 2.0, 1500)
    produce_arrivals(settings, codecs, events)
    txns = [rec for kind, rec in events if kind == "transaction"]
    lo = txns[0]["event_time"] + DAY_MS // 2
    hi = lo + DAY_MS // 2
    want = [t["transaction_id"] for t in txns if lo <= t["event_time"] < hi]
    assert 300 < len(want) < len(txns) // 2

    def replay(start: str, end: str, warmup: str | None, event_time: bool):
        return run_replay(settings, ReplayConfig(
            challenger=second, champion=first, start=Bound.parse(start, event_time),
            end=Bound.parse(end, event_time),
            warmup=Bound.parse(warmup, event_time) if warmup else None, publish=False,
            online=False))

    window = replay(f"@{lo}", f"@{hi}", f"@{txns[0]['event_time']}", True)
    assert sorted(window.decided.transaction_ids) == sorted(want)
    assert window.read == len(want) and window.warmup > 0
    # With the history before it as warm-up, the window's decisions are those of a replay
    # of everything: the same state, met in the same order.
    everything = replay("0", str(len(txns)), None, False)
    full = dict(zip(everything.decided.transaction_ids, everything.decided.champion_score,
                    strict=True))
    for tid, score in zip(window.decided.transaction_ids, window.decided.champion_score,
                          strict=True):
        assert math.isclose(score, full[tid], rel_tol=1e-9, abs_tol=1e-12), tid
    # The same times read as Kafka timestamps: every record was written after both.
    assert len(replay(f"@{lo}", f"@{hi}", None, False).decided) == 0
    with pytest.raises(ReplayError, match="all Kafka times or all event times"):
        run_replay(settings, ReplayConfig(challenger=second, start=Bound("event", lo),
                                          end=Bound("time", hi), publish=False))


def test_a_range_to_the_end_of_the_embedded_topics_is_read_whole_without_waiting_for_idle(
        stack_settings, monkeypatch):
    # The embedded broker reports a partition's end as its last batch's first offset plus
    # one. The reader takes that batch to its end, then stops: not after an idle wait.
    from fraudstream.streams.replay import ranges
    from fraudstream.streams.topics import read_since

    monkeypatch.setattr(ranges, "IDLE_S", 60.0)
    settings = fresh_topics(stack_settings, 3)
    topic = settings.topics.transactions
    producer = Producer({**settings.kafka.client_config(), "linger.ms": 50})
    sent = []
    for burst in range(4):  # several batches a partition, the last of many records
        for i in range(300):
            key, value = f"card-{i % 7}".encode(), f"{burst}-{i}".encode()
            producer.produce(topic, key=key, value=value)
            sent.append(value)
        assert producer.flush(30) == 0

    started = time.monotonic()
    reader = ranges.RangeReader(settings, ReplayConfig(challenger="-", start=Bound("offset", 0),
                                                       batch=37),
                                f"tests-{uuid.uuid4().hex[:6]}")
    try:
        batches = list(reader.batches())
    finally:
        reader.close()
    assert time.monotonic() - started < 60.0
    assert sorted(rec.value for batch in batches for _role, rec, _t in batch) == sorted(sent)
    # Whole batches however the fetches fell (labels go in between batches, and the
    # learners learn per batch: a batch cut by a fetch would change decisions from run to
    # run); only the last is shorter.
    assert [len(b) for b in batches] == [37] * (len(sent) // 37) + [len(sent) % 37]

    started = time.monotonic()
    consumer = Consumer(settings.kafka.consumer_config(f"tests-{uuid.uuid4().hex[:6]}"))
    try:
        read = [m.value() for m in read_since(consumer, topic, [0, 1, 2], 0,
                                               embedded=True, idle_s=60.0)]
    finally:
        consumer.close()
    assert time.monotonic() - started < 60.0
    assert sorted(read) == sorted(sent)


def test_the_rate_by_tenth_shows_where_a_replay_slowed():
    """Marks after each batch of 100 records: 1 ms a record for the first half, 2 ms for
    the second, labels fed only in the second. Each tenth gets its own rate and labels;
    a replay shorter than ten batches gets one entry per batch."""
    marks, t, labels = [], 0.0, 0
    for k in range(1, 21):
        t += 0.1 if k <= 10 else 0.2
        labels += 0 if k <= 10 else 7
        marks.append((100 * k, labels, t))
    tenths = by_tenth(marks)
    assert [x["records"] for x in tenths] == [200] * 10
    assert [round(x["records_per_s"]) for x in tenths] == [1000] * 5 + [500] * 5
    assert [x["labels"] for x in tenths] == [0] * 5 + [14] * 5
    short = by_tenth([(500, 0, 1.0), (700, 3, 2.0)])
    assert [(x["records"], x["labels"], x["records_per_s"]) for x in short] == [
        (500, 0, 500.0), (200, 3, 200.0)]
    assert by_tenth([]) == []



def test_the_autopilots_comparison_stops_after_the_batch_it_is_deciding(
        models_registry, stack_settings, codecs, tmp_path):
    # The autopilot's SIGTERM sets its stop: the comparison (a replay in two processes)
    # ends after the batch it is deciding, its deciding process with it, rather than
    # running through the test window first.
    import multiprocessing
    import threading
    from datetime import UTC, datetime

    from fraudstream.streams.autopilot.compare import replay_window, stopping
    from fraudstream.streams.processes import Stopped

    root, first, second = registry_with(models_registry, tmp_path)
    settings = fresh_topics(stack_settings, 1, scoring={"models_dir": root, "online": False})
    events = [(k, r) for k, r in history(37, 2.0, 1500) if k == "transaction"]
    produce_arrivals(settings, codecs, events)
    config = ReplayConfig(challenger=second, champion=first, start=Bound("offset", 0),
                          publish=False, online=False)
    stop = threading.Event()
    check = stopping(stop)
    batches: list[int] = []

    def progress(read: int) -> None:
        batches.append(read)
        check(read)

    whole = run_replay(settings, config, progress)
    assert len(batches) > 4 and whole.read == len(events)

    batches.clear()

    def stop_in_first(read: int) -> None:
        stop.set()  # as a SIGTERM arriving while the first batch is decided
        progress(read)

    with pytest.raises(Stopped, match="comparison was stopped"):
        run_replay(settings, config, stop_in_first)
    assert batches == [config.batch]  # not one batch more
    assert not multiprocessing.active_children()  # the deciding process is gone

    # The autopilot's own call, its stop already set: ends the same way.
    def iso(ms: int) -> str:
        return datetime.fromtimestamp(ms / 1000, UTC).isoformat()

    times = [r["event_time"] for _k, r in events]
    meta = {"windows": {"valid": {"from": iso(times[0])},
                        "test": {"from": iso(times[len(times) // 2]), "to": iso(times[-1])}}}
    with pytest.raises(Stopped):
        replay_window(settings, root, first, second, meta, stop)
    assert not multiprocessing.active_children()


def test_a_replay_killed_outright_leaves_no_deciding_process_behind(
        models_registry, stack_settings, tmp_path):
    # A SIGKILL (an OOM kill, a node drained) runs no cleanup: the deciding process,
    # which holds both models, must not live on blocked on its queue.
    import os
    import signal

    root, first, second = registry_with(models_registry, tmp_path)
    settings = stack_settings.replace(scoring={"models_dir": root})
    script = (
        "import time\n"
        "from fraudstream.streams.replay.decider import RemoteDecider\n"
        "from fraudstream.streams.replay.ranges import Bound, ReplayConfig\n"
        "from fraudstream.streams.settings import Settings\n"
        f"d = RemoteDecider(Settings.from_env(), ReplayConfig(challenger={second!r}, "
        "start=Bound('offset', 0), publish=False), 'replay-test')\n"
        "print(d._proc.pid, flush=True)\n"
        "time.sleep(120)\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("FRAUDSTREAM_")}
    env.update(settings.to_env())
    proc = subprocess.Popen([sys.executable, "-c", script], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        child = int(proc.stdout.readline())
        time.sleep(2.0)  # the child is up (loading its models, or waiting for batches)
        os.kill(child, 0)  # alive
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.kill(child, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        else:
            os.kill(child, signal.SIGKILL)
            raise AssertionError("the deciding process outlived its replay")
    finally:
        if proc.poll() is None:
            proc.kill()
