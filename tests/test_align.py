"""The aligner merges partitions in event time, labels before the transactions they are
due for, waits for a partition that may hold earlier records, but never for long."""

from __future__ import annotations

import itertools
from collections import namedtuple

from fraudstream.streams.worker.align import Aligner

TP = namedtuple("TP", "topic partition")
Rec = namedtuple("Rec", "value offset")

T0, T1, L0 = TP("transactions", 0), TP("transactions", 1), TP("labels", 0)


class Clock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


def aligner(clock: Clock | None = None) -> Aligner:
    # a record's value is its time, as text ("x": unreadable)
    def time_of(_topic: str, value: bytes | None) -> int | None:
        return None if value in (None, b"x") else int(value)

    return Aligner("transactions", "labels", time_of, max_wait_s=2.0,
                   clock=clock or Clock())


_OFFSETS = itertools.count()


def recs(*times: int | str, first: int | None = None) -> list[Rec]:
    """Records with these times, at the next offsets (or from ``first``)."""
    offsets = itertools.count(first) if first is not None else _OFFSETS
    return [Rec(str(t).encode(), next(offsets)) for t in times]


def flat(out: list) -> list[tuple[int, int]]:
    return [(tp.partition if tp.topic == "transactions" else -1, int(r.value))
            for tp, rs in out for r in rs]


def test_partitions_are_merged_in_event_time_each_keeping_its_order():
    a = aligner()
    a.add(T0, recs(10, 30, 20, 50))  # 20 arrived late on partition 0: it stays after 30
    a.add(T1, recs(10, 25, 40))
    out = a.release(pending=())
    assert flat(out) == [(0, 10), (1, 10), (1, 25), (0, 30), (0, 20), (1, 40), (0, 50)]
    assert not any(a.held.values())


def test_a_partition_that_may_hold_earlier_records_holds_the_others_back_for_a_while():
    clock = Clock()
    a = aligner(clock)
    a.add(T0, recs(10, 20, 30))
    a.add(T1, recs(15))
    # partition 1 may hold more (not at its end): stop where it ran empty
    assert flat(a.release(pending={T1})) == [(0, 10), (1, 15)]
    assert flat(a.release(pending={T1})) == []  # still nothing new from it
    clock.now = 1.0
    assert flat(a.release(pending={T1})) == []
    clock.now = 2.5  # waited past max_wait_s: the held records go
    assert flat(a.release(pending={T1})) == [(0, 20), (0, 30)]
    assert a.timeouts == 1 and a.waiting_since is None


def test_a_merge_that_moves_on_is_not_waiting_however_often_it_stops():
    # A backlog: partitions come one fetch at a time, so the merge stops on an empty one
    # at almost every call while it keeps releasing. Records must not go out of order
    # after max_wait_s of that.
    clock = Clock()
    a = aligner(clock)
    a.add(T0, recs(*range(0, 100, 2)))
    released = []
    for step in range(10):
        a.add(T1, recs(*range(step * 10 + 1, step * 10 + 10, 2)))
        released += flat(a.release(pending={T0, T1}))
        clock.now += 1.0  # well past max_wait_s in all
    assert a.timeouts == 0
    times = [t for _p, t in released]
    assert times == sorted(times) and len(times) > 90


def test_the_time_spent_deciding_what_was_released_is_not_waiting():
    clock = Clock()
    a = aligner(clock)
    a.add(T0, recs(10, 20, 30))
    a.add(T1, recs(15))
    assert flat(a.release(pending={T1})) == [(0, 10), (1, 15)]
    clock.now = 5.0  # the worker decided those for 5 s
    assert flat(a.release(pending={T1})) == []  # the wait for partition 1 starts now
    clock.now = 6.5
    assert flat(a.release(pending={T1})) == [] and a.timeouts == 0
    clock.now = 7.5
    assert flat(a.release(pending={T1})) == [(0, 20), (0, 30)] and a.timeouts == 1


def test_labels_go_before_the_first_transaction_they_are_due_for():
    a = aligner()
    a.add(L0, recs(12, 35, 90))  # availability times
    a.add(T0, recs(10, 20, 40))
    out = a.release(pending={L0})
    # 90 is due after every transaction, and none is held or to come: it goes too
    assert flat(out) == [(0, 10), (-1, 12), (0, 20), (-1, 35), (0, 40), (-1, 90)]


def test_a_labels_partition_that_may_hold_a_label_due_holds_the_transactions_back():
    a = aligner()
    a.add(L0, recs(12))
    a.add(T0, recs(10, 20, 40))
    # after label 12 the labels partition is empty and may hold one due before 20
    assert flat(a.release(pending={L0, T0})) == [(0, 10), (-1, 12)]
    a.add(L0, recs(45))
    assert flat(a.release(pending={L0, T0})) == [(0, 20), (0, 40)]


def test_labels_wait_while_transactions_may_still_come():
    a = aligner()
    a.add(L0, recs(50))
    assert flat(a.release(pending={T0})) == []  # the transactions before 50 may come
    a.add(T0, recs(40, 60))
    assert flat(a.release(pending=())) == [(0, 40), (-1, 50), (0, 60)]


def test_an_unreadable_record_goes_at_once_and_forget_drops_a_revoked_partition():
    a = aligner()
    a.add(T0, recs("x", 30))
    a.add(T1, recs(20))
    assert flat_values(a.release(pending=())) == [b"x", b"20", b"30"]
    a.add(T0, recs(70))
    a.add(T1, recs(60))
    a.forget(keep={T1})
    assert flat(a.release(pending=())) == [(1, 60)]
    assert T0 not in a.held


def flat_values(out: list) -> list[bytes]:
    return [r.value for _tp, rs in out for r in rs]


def test_record_times_read_event_time_and_label_availability():
    from datetime import UTC, datetime

    import orjson

    from fraudstream.schemas.codec import decode_json
    from fraudstream.streams.worker.align import record_times

    time_of = record_times(decode_json, decode_json, "transactions", label_delay_ms=600_000)
    assert time_of("transactions", orjson.dumps({"event_time": 1_700_000_000_000})) == \
        1_700_000_000_000
    iso = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC).isoformat()
    assert time_of("transactions", orjson.dumps({"event_time": iso})) == \
        int(datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC).timestamp() * 1000)
    # a label counts from label_time + the features' label delay
    assert time_of("labels", orjson.dumps({"label_time": 1_000})) == 601_000
    # unreadable: None (released at once; the pipeline dead-letters it)
    assert time_of("transactions", b"{not json") is None
    assert time_of("transactions", orjson.dumps({"event_time": "yesterday"})) is None
    assert time_of("labels", None) is None


def test_an_avro_transactions_time_is_read_without_decoding_it_all():
    from fraudstream.schemas.codec import Codecs, make_registry
    from fraudstream.streams.settings import TopicSettings
    from fraudstream.streams.traffic.generator import generate_history
    from fraudstream.streams.traffic.world import GeneratorConfig

    codecs = Codecs(make_registry("mock://align"), TopicSettings())
    txns, _ = generate_history(GeneratorConfig(seed=3, n_cards=50), 1_790_000_000_000, 0.5, 400)
    for t in txns:
        data = codecs.transaction.encode(t)
        assert codecs.transaction.event_time(data) == t["event_time"]
    assert codecs.transaction.event_time(b"\x00\x00\x00\x00\x07" + data[5:]) is None  # other id
    assert codecs.transaction.event_time(data[:7]) is None  # truncated


def test_records_read_again_from_a_lower_offset_are_handed_on_again():
    """After an offset reset (a broker that lost its log) new records come with offsets
    already seen: they must be decided, not taken for copies. Copies after a seek back
    are answered downstream (the dedupe, the learner's offsets)."""
    a = aligner()
    a.add(T0, recs(10, 20, first=0))
    assert flat(a.release(pending=())) == [(0, 10), (0, 20)]
    a.add(T0, recs(30, 40, first=0))
    assert flat(a.release(pending=())) == [(0, 30), (0, 40)]


def test_records_put_back_go_first_at_the_next_release_in_their_order():
    a = aligner()
    a.add(L0, recs(5, 6, first=10))
    a.add(T0, recs(30))
    out = a.release(pending=())
    assert flat(out) == [(-1, 5), (-1, 6), (0, 30)]
    [(tp, labels), _] = out
    a.put_back(tp, labels)  # the handler could not take them
    a.add(L0, recs(7, first=12))
    again = a.release(pending=())
    assert [r.offset for _tp, rs in again for r in rs] == [10, 11, 12]
