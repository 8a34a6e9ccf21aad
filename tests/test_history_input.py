"""A history file read in a second process gives the same events and errors as in-process,
refuses a bad mapping before streaming, and leaves no process behind."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from fraudstream.schemas.fx import Rates
from fraudstream.streams.cli.history_input import HistorySource, history_events
from fraudstream.streams.settings import Settings
from fraudstream.streams.traffic.csv_source import ColumnMapping, CsvMappingError

KEY = "test-tokenization-key"
BASE_S = 1_546_300_800  # 2019-01-01


def _history(tmp_path: Path, n: int = 5_000) -> Path:
    """``n`` rows over a few cards and merchants, with bad rows of several kinds and raw
    card numbers, labels on every tenth row."""
    lines = ["id,ts,card,shop,value,cur,kind,fraud,lat,lon"]
    for i in range(n):
        card = "4111 1111 1111 1111" if i % 97 == 0 else f"c{i % 13}"
        value = "ten" if i % 500 == 7 else f"{1 + i % 50}.5"
        lat = "north" if i % 700 == 3 else "48.85"
        fraud = ("1" if i % 30 == 0 else "0") if i % 10 == 0 else ""
        lines.append(f"t{i},{BASE_S + 60 * i},{card},m{i % 5},{value},EUR,pos,{fraud},{lat},2.35")
    lines.insert(1234, "short,row")
    path = tmp_path / "history.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


def _source(path: Path, mapping: ColumnMapping | None = None,
            key: str | None = KEY) -> HistorySource:
    mapping = mapping or ColumnMapping.from_flags(
        ["transaction_id=id", "event_time=ts", "card_id=card", "merchant_id=shop",
         "amount=value", "currency=cur", "channel=kind", "label=fraud"], ["country=FR"])
    return HistorySource(path, mapping, 0.5, key, False, Settings(), Rates.load())


def test_a_second_process_gives_the_same_events_and_errors(tmp_path: Path) -> None:
    source = _source(_history(tmp_path))
    inline_errors: list[str] = []
    inline = list(history_events(source, inline_errors, "inline"))
    background_errors: list[str] = []
    background = list(history_events(source, background_errors, "process"))
    assert background == inline
    assert background_errors == inline_errors
    kinds = {k for k, _ in inline}
    assert kinds == {"transaction", "label"}
    # bad amounts, bad latitudes and the short row are reported, not dropped
    assert len(inline_errors) == 10 + 8 + 1
    assert any("'value'" in e for e in inline_errors)
    assert any("'lat'" in e for e in inline_errors) and any("fields" in e for e in inline_errors)
    text = str(inline) + str(inline_errors)
    assert "1111 1111" not in text and "1111111111" not in text  # tokens, not card numbers
    assert any(r["card_id"].startswith("tok_") for k, r in inline if k == "transaction")
    assert len([k for k, _ in inline if k == "transaction"]) == 5_000 - 10 - 8


def test_a_bad_mapping_is_refused_before_streaming(tmp_path: Path) -> None:
    path = _history(tmp_path, 50)
    bad = ColumnMapping.from_flags(["card_id=no_such_column"])
    with pytest.raises(CsvMappingError, match="no_such_column"):
        history_events(_source(path, bad), [], "process")
    with pytest.raises(CsvMappingError, match="card numbers"):
        history_events(_source(path, key=None), [], "process")
    with pytest.raises(FileNotFoundError):
        history_events(_source(tmp_path / "missing.csv"), [], "process")


def _children() -> set[int]:
    me = os.getpid()
    out = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == me:
                out.add(int(entry))
    return out


def test_stopping_early_ends_the_reading_process(tmp_path: Path) -> None:
    before = _children()
    events = history_events(_source(_history(tmp_path, 20_000)), [], "process")
    assert _children() - before, "the file is read in a child process"
    assert next(iter(events))[0] == "transaction"
    events.close()  # type: ignore[attr-defined]
    deadline = time.monotonic() + 10
    while _children() - before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _children() - before
