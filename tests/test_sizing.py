"""Micro-batches sized to the budget (streams/worker/sizing.py)."""

from __future__ import annotations

from fraudstream.streams.worker.sizing import BatchSizer


def test_batches_shrink_to_fit_the_share_of_the_budget_when_records_cost_more():
    sizer = BatchSizer(budget_ms=50.0, share=0.5, minimum=32, maximum=500)
    assert sizer.size() == 32  # nothing measured yet: start small
    sizer.observe(32, 32 * 50e-6)  # 50 us a record: 500 fit in 25 ms
    assert sizer.size() == 500
    for _ in range(40):  # the cost rises to 250 us a record (a bigger model, say)
        sizer.observe(sizer.size(), sizer.size() * 250e-6)
    assert 95 <= sizer.size() <= 105  # 25 ms / 250 us = 100
    assert sizer.size() * sizer.per_record_s <= 0.025 * 1.05


def test_bounds_hold_whatever_the_cost():
    sizer = BatchSizer(budget_ms=50.0, share=0.5, minimum=32, maximum=500)
    sizer.observe(100, 10.0)  # 0.1 s a record: a stall
    assert sizer.size() == 32
    sizer = BatchSizer(budget_ms=50.0, share=0.5, minimum=32, maximum=500)
    sizer.observe(100, 0.0)
    assert sizer.size() == 500


def test_small_batches_of_live_traffic_move_the_estimate_little():
    """Five records a fetch carry a batch's fixed cost on few records: they must not drag
    the size down as a full batch at that cost would."""
    sizer = BatchSizer(budget_ms=50.0, share=0.5, minimum=32, maximum=1000)
    sizer.observe(200, 200 * 50e-6)
    assert sizer.size() == 500
    for _ in range(20):
        sizer.observe(5, 0.002)  # 400 us a record, all of it the batch's fixed part
    assert sizer.size() >= 200
    sizer.observe(0, 1.0)  # an empty batch says nothing
    assert sizer.size() >= 200


def test_a_backlog_takes_the_largest_batches_until_it_is_gone():
    """Records that waited in Kafka are late already: the drain's rate serves them best."""
    sizer = BatchSizer(budget_ms=50.0, share=0.5, minimum=32, maximum=500)
    sizer.observe(100, 100 * 250e-6)  # 100 a batch fit the budget
    assert sizer.size() == 100 and not sizer.backlog
    sizer.set_lag("transactions-0", 5_000)
    assert sizer.backlog and sizer.size() == 500
    sizer.set_lag("transactions-0", 60)  # less than one sized batch waits
    sizer.set_lag("transactions-1", 30)
    assert not sizer.backlog and sizer.size() == 100
    sizer.set_lag("transactions-1", 3_000)
    assert sizer.size() == 500
    sizer.keep({"transactions-0"})  # partition 1 was revoked: its lag is not ours
    assert sizer.size() == 100


def test_a_backlog_batch_takes_its_own_maximum_and_live_batches_keep_theirs():
    """FRAUDSTREAM_WORKER_BACKLOG_BATCH_MAX: records long late share a batch's fixed wait
    over more of them; live traffic, and a burst of less than that, stay within batch_max."""
    sizer = BatchSizer(budget_ms=50.0, share=0.5, minimum=32, maximum=500,
                       backlog_maximum=2000)
    sizer.observe(100, 100 * 10e-6)  # cheap records: the budget would allow 2,500
    assert sizer.size() == 500
    sizer.set_lag("transactions-0", 5_000)
    assert sizer.backlog and sizer.size() == 2000
    sizer.set_lag("transactions-0", 1_500)  # a live burst, or a backlog's last records
    assert sizer.backlog and sizer.size() == 500
    sizer.set_lag("transactions-0", 0)
    assert sizer.size() == 500


def test_a_burst_shorter_than_the_backlog_threshold_keeps_batches_to_their_size():
    """With FRAUDSTREAM_WORKER_BACKLOG_BATCHES above 1, a few batches' worth waiting (a
    fetch wait, a commit) is not a backlog: batches keep to their size."""
    sizer = BatchSizer(budget_ms=50.0, share=0.5, minimum=32, maximum=500,
                       backlog_batches=4.0)
    sizer.observe(100, 100 * 250e-6)
    sizer.set_lag("transactions-0", 350)  # three and a half sized batches
    assert not sizer.backlog and sizer.size() == 100
    sizer.set_lag("transactions-0", 450)
    assert sizer.backlog and sizer.size() == 500
