"""Bearer tokens of the API: constant-time comparison, and a tokens file rotated while the
API runs (pure: a real file, a clock the test moves)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from fraudstream.streams.api.auth import BearerTokens, authorized


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _write(path: Path, text: str) -> None:
    """Replace the file as a Kubernetes Secret volume or an editor does: a new file moved
    over the old one."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def test_only_a_bearer_header_with_a_configured_token_passes():
    tokens = [b"alpha", b"beta"]
    assert authorized("Bearer beta", tokens)
    assert authorized("Bearer alpha ", tokens)
    for header in (None, "", "beta", "Basic beta", "Bearer bet", "Bearer betaa",
                   "Bearer ", "bearer beta"):
        assert not authorized(header, tokens), header


def test_a_rotated_file_takes_effect_within_the_check_interval_without_a_restart(
        tmp_path, caplog):
    path = tmp_path / "tokens"
    _write(path, "# during a rotation\nold-token\n")
    clock = Clock()
    tokens = BearerTokens([b"from-setting"], str(path), clock=clock)
    assert tokens.authorized("Bearer old-token")
    assert tokens.authorized("Bearer from-setting")

    _write(path, "old-token\nnew-token\n")
    assert not tokens.authorized("Bearer new-token")  # not looked at before CHECK_S
    clock.now += tokens.check_s
    assert tokens.authorized("Bearer new-token")

    _write(path, "new-token\n")
    clock.now += tokens.check_s
    with caplog.at_level(logging.WARNING, logger="fraudstream.api"):
        assert not tokens.authorized("Bearer old-token")
    assert tokens.authorized("Bearer new-token")
    assert tokens.authorized("Bearer from-setting")  # the setting's stay
    assert tokens.reloads == 2 and tokens.refused == 0
    assert "2 tokens in force (3 before)" in caplog.text
    assert "new-token" not in caplog.text and "old-token" not in caplog.text


def test_a_file_removed_unreadable_or_emptied_leaves_the_tokens_in_force(tmp_path, caplog):
    path = tmp_path / "tokens"
    _write(path, "only-token\n")
    clock = Clock()
    tokens = BearerTokens([], str(path), clock=clock)

    for break_it in (lambda: path.unlink(), lambda: _write(path, "# none left\n\n"),
                     lambda: path.write_bytes(b"\xff\xfe\x00bad")):
        break_it()
        clock.now += tokens.check_s
        with caplog.at_level(logging.ERROR, logger="fraudstream.api"):
            assert tokens.authorized("Bearer only-token")
            clock.now += tokens.check_s  # the same broken file is not counted again
            assert tokens.authorized("Bearer only-token")
        assert not tokens.authorized("Bearer other")
        assert tokens.stale  # what /metrics shows, and the alert fires on
    assert tokens.refused == 3
    assert "only-token" not in caplog.text
    assert caplog.text.count("the 1 tokens in force stay") == 3

    _write(path, "next-token\n")  # a good file is taken again
    clock.now += tokens.check_s
    assert tokens.authorized("Bearer next-token")
    assert not tokens.authorized("Bearer only-token")
    assert not tokens.stale


def test_an_anonymous_api_stays_open_and_one_with_tokens_is_never_opened(tmp_path):
    assert BearerTokens([], anonymous=True).authorized(None)
    assert not BearerTokens([], anonymous=False).authorized(None)
    assert not BearerTokens([b"t"], anonymous=True).authorized(None)

    path = tmp_path / "tokens"
    _write(path, "\n")
    clock = Clock()
    tokens = BearerTokens([], str(path), anonymous=True, clock=clock)
    assert tokens.authorized(None)
    _write(path, "first-token\n")  # tokens given later turn authentication on
    clock.now += tokens.check_s
    assert not tokens.authorized(None)
    assert tokens.authorized("Bearer first-token")


def test_a_tokens_file_unreadable_at_start_is_an_error(tmp_path):
    with pytest.raises(OSError):
        BearerTokens([], str(tmp_path / "missing"))
