"""The worker's static group membership id: the same across restarts of one worker, one
per worker, off on the embedded broker unless set, and off on request."""

from __future__ import annotations

from pathlib import Path

from fraudstream.streams.settings import Settings
from fraudstream.streams.worker.startup import group_instance_id


def _settings(data_dir: Path, instance_id: str = "", embedded: bool = False) -> Settings:
    return Settings().replace(kafka={"embedded": embedded},
                              worker={"data_dir": data_dir, "instance_id": instance_id})


def test_the_derived_id_is_stable_per_data_dir_and_unique_per_worker(tmp_path):
    first = group_instance_id(_settings(tmp_path / "a"))
    assert first is not None and first.startswith("fraudstream-")
    assert group_instance_id(_settings(tmp_path / "a")) == first  # a restart: the same id
    assert group_instance_id(_settings(tmp_path / "b")) != first  # another worker


def test_an_explicit_id_is_used_and_none_turns_static_membership_off(tmp_path):
    assert group_instance_id(_settings(tmp_path, "worker-7")) == "worker-7"
    assert group_instance_id(_settings(tmp_path, "worker-7", embedded=True)) == "worker-7"
    assert group_instance_id(_settings(tmp_path, "none")) is None
    assert group_instance_id(_settings(tmp_path, embedded=True)) is None
