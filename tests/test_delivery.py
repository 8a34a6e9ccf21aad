"""The commit order of streams/worker/delivery.py, with recording fakes (a pure unit test)."""

from __future__ import annotations

import asyncio

import pytest

from fraudstream.streams.pipeline import BatchResult
from fraudstream.streams.worker.delivery import BatchCommitter, DeliveryError


class Journal:
    def __init__(self, fail_at: str | None = None) -> None:
        self.steps: list[str] = []
        self.fail_at = fail_at

    def step(self, name: str) -> None:
        self.steps.append(name)
        if name == self.fail_at:
            raise DeliveryError(f"broker did not acknowledge ({name})")


class RecordingState:
    def __init__(self, journal: Journal) -> None:
        self.journal = journal

    def record(self, entries) -> None:
        self.journal.step(f"record {len(entries)}")

    async def flush(self) -> None:
        self.journal.step("flush state")


class RecordingSink:
    def __init__(self, journal: Journal) -> None:
        self.journal = journal

    async def publish(self, batches, tolerant=()) -> list:
        self.journal.step("publish " + ",".join(f"{t}:{len(r)}" for t, r in batches))
        return []


def result() -> BatchResult:
    out = BatchResult()
    out.decisions = [(b"t1", b"d1"), (b"t2", b"d2")]
    out.new_entries = [(0, b"t1", b"d1")]  # t2 was a redelivery: no new entry
    out.dead_letters = [(None, b"dl")]
    return out


def test_state_is_durable_before_any_decision_is_published():
    journal = Journal()
    committer = BatchCommitter(RecordingState(journal), RecordingSink(journal), "decisions", "dlq")
    asyncio.run(committer.commit(result()))
    assert journal.steps == ["record 1", "flush state", "publish decisions:2,dlq:1"]


def test_a_failed_state_flush_publishes_nothing_and_fails_the_batch():
    journal = Journal(fail_at="flush state")
    committer = BatchCommitter(RecordingState(journal), RecordingSink(journal), "decisions", "dlq")
    with pytest.raises(DeliveryError):
        asyncio.run(committer.commit(result()))
    assert journal.steps == ["record 1", "flush state"]


def test_a_failed_publish_fails_the_batch_so_it_is_not_acknowledged():
    journal = Journal(fail_at="publish decisions:2,dlq:1")
    committer = BatchCommitter(RecordingState(journal), RecordingSink(journal), "decisions", "dlq")
    with pytest.raises(DeliveryError):
        asyncio.run(committer.commit(result()))


class RecordingFeatures:
    def __init__(self, journal: Journal, down: bool = False) -> None:
        self.journal = journal
        self.down = down

    def write(self, items) -> None:
        self.journal.step(f"features {len(items)}")

    async def flush(self) -> None:
        from fraudstream.state.engine import StateUnavailable

        self.journal.step("flush features")
        if self.down:
            raise StateUnavailable("redis down")


def with_features() -> BatchResult:
    out = result()
    out.feature_writes = [(0, b"c|card_1", b"{}"), (0, b"m|m1", b"{}")]
    out.feature_log = [(b"t1", b"fv")]
    return out


def test_features_are_stored_before_the_dedupe_entries_and_any_decision():
    journal = Journal()
    committer = BatchCommitter(RecordingState(journal), RecordingSink(journal), "decisions",
                               "dlq", features=RecordingFeatures(journal))
    asyncio.run(committer.commit(with_features()))
    assert journal.steps == ["features 2", "record 1", "flush features", "flush state",
                             "publish decisions:2,dlq:1,features:1"]


def test_a_feature_store_that_is_down_loses_its_writes_but_not_the_decisions():
    journal = Journal()
    committer = BatchCommitter(RecordingState(journal), RecordingSink(journal), "decisions",
                               "dlq", features=RecordingFeatures(journal, down=True))
    asyncio.run(committer.commit(with_features()))
    assert committer.lost_feature_writes == 2
    assert journal.steps[-1] == "publish decisions:2,dlq:1,features:1"
