"""Streaming a user's CSV history: their column names, time order, errors as data, tokens."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from fastavro import parse_schema
from fastavro.validation import validate

from fraudstream.schemas.fx import Rates
from fraudstream.schemas.validate import validate_transaction
from fraudstream.streams.traffic.csv_source import (
    ColumnMapping,
    CsvMappingError,
    parse_event_time,
    read_csv_events,
    tokenize_card,
)

SCHEMA_DIR = Path(__file__).resolve().parents[1] / "schemas"
KEY = b"test-tokenization-key"
DAY_MS = 86_400_000
# A file with someone else's column names (the Kaggle "fraudTrain" layout), out of order.
KAGGLE = """\
trans_num,trans_date_trans_time,cc_num,merchant,amt,category,merch_lat,merch_long,is_fraud
a1,2019-01-01 00:10:00,4111111111111111,fraud_Kirlin,12.50,grocery_pos,48.85,2.35,0
a2,2019-01-01 00:00:00,4111 1111 1111 1111,fraud_Sporer,3.10,misc_net,,,1
a3,2019-01-01 00:05:00,5500-0000-0000-0004,fraud_Lind,99.99,shopping_pos,45.76,4.84,
a4,2019-01-02 00:00:00,card_tok_42,fraud_Kirlin,20,grocery_pos,48.85,2.35,0
"""
KAGGLE_FLAGS = ["transaction_id=trans_num", "event_time=trans_date_trans_time",
                "card_id=cc_num", "merchant_id=merchant", "amount=amt", "lat=merch_lat",
                "lon=merch_long", "label=is_fraud"]
KAGGLE_DEFAULTS = ["currency=USD", "country=US", "channel=pos"]


def _write(tmp_path: Path, text: str, name: str = "history.csv") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _kaggle(tmp_path: Path, **kwargs: Any) -> list[tuple[str, dict[str, Any]]]:
    mapping = ColumnMapping.from_flags(KAGGLE_FLAGS, KAGGLE_DEFAULTS)
    kwargs.setdefault("label_delay_days", 3.0)  # the file has labels, no label_time
    return list(read_csv_events(_write(tmp_path, KAGGLE), mapping, token_key=KEY, **kwargs))


def _ms(iso: str) -> int:
    return int(datetime.fromisoformat(iso).replace(tzinfo=UTC).timestamp() * 1000)


def _of(events: list[tuple[str, dict[str, Any]]], kind: str) -> list[dict[str, Any]]:
    return [e for k, e in events if k == kind]


def test_other_column_names_map_to_valid_transactions(tmp_path: Path) -> None:
    events = _kaggle(tmp_path)
    txns = _of(events, "transaction")
    assert [t["transaction_id"] for t in txns] == ["a2", "a3", "a1", "a4"]
    schema = parse_schema(json.loads((SCHEMA_DIR / "transaction.avsc").read_text()))
    label_schema = parse_schema(json.loads((SCHEMA_DIR / "label.avsc").read_text()))
    for t in txns:
        assert validate(t, schema, raise_errors=True)
        validate_transaction(t, now_ms=_ms("2030-01-01"), max_future_ms=0, max_amount=1e9,
                             rates=Rates.load())
    for lb in _of(events, "label"):
        assert validate(lb, label_schema, raise_errors=True)
    a1 = next(t for t in txns if t["transaction_id"] == "a1")
    assert a1["event_time"] == _ms("2019-01-01T00:10:00")
    assert (a1["merchant_id"], a1["amount"], a1["currency"], a1["country"], a1["channel"]) == (
        "fraud_Kirlin", 12.5, "USD", "US", "pos")
    assert (a1["lat"], a1["lon"]) == (48.85, 2.35)
    a2 = next(t for t in txns if t["transaction_id"] == "a2")
    assert a2["lat"] is None and a2["mcc"] is None and a2["customer_id"] is None


def test_stream_is_in_event_time_order_with_labels_merged(tmp_path: Path) -> None:
    events = _kaggle(tmp_path, label_delay_days=0.5)
    times = [e["event_time"] if k == "transaction" else e["label_time"] for k, e in events]
    assert times == sorted(times)
    assert [k for k, _ in events] == [
        "transaction", "transaction", "transaction", "label", "label", "transaction", "label"]


def test_labels_come_after_their_transaction_and_delay(tmp_path: Path) -> None:
    events = _kaggle(tmp_path, label_delay_days=2)
    seen: dict[str, int] = {}
    for i, (kind, e) in enumerate(events):
        if kind == "transaction":
            seen[e["transaction_id"]] = i
        elif kind == "label":
            assert seen[e["transaction_id"]] < i
            assert e["label_time"] == e["event_time"] + 2 * DAY_MS
    labels = {lb["transaction_id"]: lb for lb in _of(events, "label")}
    assert set(labels) == {"a1", "a2", "a4"}  # a3's label cell is empty: no label
    assert labels["a2"]["is_fraud"] and labels["a2"]["source"] == "confirmed_fraud"
    assert not labels["a1"]["is_fraud"] and labels["a1"]["source"] == "confirmed_genuine"


def test_raw_card_numbers_are_tokenized_and_never_leave(tmp_path: Path) -> None:
    events = _kaggle(tmp_path)
    dumped = json.dumps(events).replace(" ", "").replace("-", "")
    for digits in ("4111111111111111", "5500000000000004", "11111111", "00000004"):
        assert digits not in dumped
    assert all(not re.search(r"[0-9]{13}", e["card_id"]) for _, e in events)
    cards = {t["transaction_id"]: t["card_id"] for t in _of(events, "transaction")}
    assert cards["a1"] == cards["a2"] == tokenize_card("4111111111111111", KEY)  # same card
    assert re.fullmatch(r"tok_[0-9a-f]{16}", cards["a3"]) and cards["a3"] != cards["a1"]
    assert cards["a4"] == "card_tok_42"  # already a token: kept
    assert tokenize_card("4111111111111111", b"other key") != cards["a1"]
    labels = _of(events, "label")
    assert {lb["card_id"] for lb in labels} <= set(cards.values())


@pytest.mark.parametrize("spelling", [
    "4111111111111111", "4111-1111-1111-1111", " 4111 1111 1111 1111 ", "4111111111111111.0",
    "4.111111111111111e+15", "4.111111111111111E15"])
def test_every_spelling_of_a_card_number_gets_the_same_token(spelling: str) -> None:
    assert tokenize_card(spelling, KEY) == tokenize_card("4111111111111111", KEY)


@pytest.mark.parametrize("value", ["card_000123", "123456789012", "12345678901234567890",
                                   "tok_abc", "1.5e+3"])
def test_values_that_are_not_card_numbers_are_left_alone(tmp_path: Path, value: str) -> None:
    text = f"transaction_id,event_time,card_id,merchant_id,amount\nx,1546300800,{value},m,1\n"
    mapping = ColumnMapping(defaults={"currency": "EUR", "country": "FR", "channel": "pos"})
    (txn,) = _of(list(read_csv_events(_write(tmp_path, text), mapping)), "transaction")
    assert txn["card_id"] == value


def test_card_numbers_without_a_key_are_refused_up_front(tmp_path: Path) -> None:
    mapping = ColumnMapping.from_flags(KAGGLE_FLAGS, KAGGLE_DEFAULTS)
    with pytest.raises(CsvMappingError, match="cc_num"):
        read_csv_events(_write(tmp_path, KAGGLE), mapping, label_delay_days=3.0)


def test_bad_rows_become_errors_naming_the_column(tmp_path: Path) -> None:
    text = """\
id,ts,card,shop,value,cur,cat,kind,fraud
ok1,1546300800,c1,m1,10.0,EUR,5411,pos,0
bad_amount,1546300801,c1,m1,ten,EUR,5411,pos,0
neg_amount,1546300802,c1,m1,-4,EUR,5411,pos,0
no_card,1546300803,,m1,10.0,EUR,5411,pos,0
bad_time,yesterday,c1,m1,10.0,EUR,5411,pos,0
bad_mcc,1546300804,c1,m1,10.0,EUR,grocery,pos,0
bad_channel,1546300805,c1,m1,10.0,EUR,5411,teleport,0
bad_label,1546300806,c1,m1,10.0,EUR,5411,pos,maybe
short_row,1546300807,c1
ok2,1546300808,c2,m2,5,eur,742,online,1
bad_lat,1546300809,c1,m1,10.0,EUR,5411,pos,0,north,2.35
"""
    text = text.replace("kind,fraud\n", "kind,fraud,y,x\n").replace(",0\n", ",0,,\n")
    text = text.replace(",1\n", ",1,,\n").replace(",maybe\n", ",maybe,,\n")
    mapping = ColumnMapping.from_flags(
        ["transaction_id=id", "event_time=ts", "card_id=card", "merchant_id=shop",
         "amount=value", "currency=cur", "mcc=cat", "channel=kind", "label=fraud",
         "lat=y", "lon=x"],
        ["country=FR"])
    events = list(read_csv_events(_write(tmp_path, text), mapping, label_delay_days=1.0))
    errors = {e["line"]: e for e in _of(events, "error")}
    expected = {3: "value", 4: "value", 5: "card", 6: "ts", 7: "cat", 8: "kind", 9: "fraud",
                12: "y"}
    assert set(errors) == set(expected) | {10}
    for line, column in expected.items():
        assert errors[line]["column"] == column and f"'{column}'" in errors[line]["reason"]
    assert "fields" in errors[10]["reason"]
    txns = {t["transaction_id"]: t for t in _of(events, "transaction")}
    assert set(txns) == {"ok1", "bad_label", "ok2"}  # a bad label keeps its transaction
    assert "transaction kept" in errors[9]["reason"]
    assert (txns["ok2"]["currency"], txns["ok2"]["mcc"], txns["ok2"]["channel"]) == (
        "EUR", "0742", "ecom")
    assert txns["ok1"]["event_time"] == 1_546_300_800_000


def test_time_formats_are_detected() -> None:
    ms = 1_546_300_800_000
    assert parse_event_time("1546300800") == ms  # epoch seconds
    assert parse_event_time("1546300800.5") == ms + 500
    assert parse_event_time("1546300800000") == ms  # epoch millis
    assert parse_event_time("1546300800000000") == ms  # epoch micros
    assert parse_event_time("2019-01-01T00:00:00Z") == ms
    assert parse_event_time("2019-01-01 01:00:00+01:00") == ms
    assert parse_event_time("2019-01-01 00:00:00") == ms  # no zone: UTC
    assert parse_event_time("01/01/2019 00:00", "%d/%m/%Y %H:%M") == ms
    assert parse_event_time("1546300800", "epoch_s") == ms
    with pytest.raises(ValueError, match="ISO-8601"):
        parse_event_time("tomorrow")


def test_time_before_2000_is_an_error_not_a_guess(tmp_path: Path) -> None:
    text = "transaction_id,event_time,card_id,merchant_id,amount\nx,12345,c,m,1\n"
    mapping = ColumnMapping(defaults={"currency": "EUR", "country": "FR", "channel": "pos"})
    (error,) = _of(list(read_csv_events(_write(tmp_path, text), mapping)), "error")
    assert "before 2000" in error["reason"] and error["field"] == "event_time"


def test_same_name_columns_defaults_and_synthesized_ids(tmp_path: Path) -> None:
    text = "event_time,card_id,merchant_id,amount,country,device_id\n" \
           "2019-01-01T00:00:00Z,c1,m1,5,de,d1\n2019-01-01T00:00:01Z,c1,,6,,\n"
    mapping = ColumnMapping(transaction_id=None, defaults={
        "currency": "EUR", "country": "FR", "channel": "ecom", "merchant_id": "unknown"})
    txns = _of(list(read_csv_events(_write(tmp_path, text, "hist.csv"), mapping)),
               "transaction")
    assert [t["transaction_id"] for t in txns] == ["hist-2", "hist-3"]
    assert [(t["country"], t["merchant_id"], t["device_id"]) for t in txns] == [
        ("DE", "m1", "d1"), ("FR", "unknown", None)]


def test_mapping_mistakes_are_refused_before_streaming(tmp_path: Path) -> None:
    path = _write(tmp_path, KAGGLE)
    with pytest.raises(CsvMappingError, match="cc_num|trans_num|columns not found"):
        read_csv_events(path, ColumnMapping(), token_key=KEY)
    with pytest.raises(CsvMappingError, match="currency"):  # no column and no default
        read_csv_events(path, ColumnMapping.from_flags(KAGGLE_FLAGS), token_key=KEY,
                        label_delay_days=3.0)
    # labels without a label_time column: when they became known must be said, not guessed
    with pytest.raises(CsvMappingError, match="is_fraud.*--label-delay-days"):
        read_csv_events(path, ColumnMapping.from_flags(KAGGLE_FLAGS, KAGGLE_DEFAULTS),
                        token_key=KEY)
    with pytest.raises(CsvMappingError, match="expected FIELD=VALUE"):
        ColumnMapping.from_flags(["cardnumber=cc_num"])
    with pytest.raises(CsvMappingError, match="default currency"):
        read_csv_events(path, ColumnMapping.from_flags(
            KAGGLE_FLAGS, ["currency=euro", "country=US", "channel=pos"]), token_key=KEY,
            label_delay_days=3.0)
    with pytest.raises(CsvMappingError, match="not a readable Parquet file"):
        read_csv_events(_write(tmp_path, "not parquet", "history.parquet"))


def test_a_parquet_file_reads_like_the_same_csv(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    text = ("transaction_id,event_time,card_id,merchant_id,amount,label\n"
            "t1,2024-03-01T10:00:00+00:00,c1,m1,12.5,1\n"
            "t2,2024-03-01T10:05:00+00:00,c2,m1,7,\n")
    mapping = ColumnMapping(defaults={"currency": "EUR", "country": "FR", "channel": "pos"})
    from_csv = list(read_csv_events(_write(tmp_path, text, "h.csv"), mapping,
                                    label_delay_days=1.0))
    table = pa.table({
        "transaction_id": ["t1", "t2"],
        "event_time": pa.array([1709287200000, 1709287500000], pa.timestamp("ms", tz="UTC")),
        "card_id": ["c1", "c2"], "merchant_id": ["m1", "m1"], "amount": [12.5, 7.0],
        "label": pa.array([1, None], pa.int64()),
    })
    pq.write_table(table, tmp_path / "h.parquet")
    from_parquet = list(read_csv_events(tmp_path / "h.parquet", mapping, label_delay_days=1.0))
    assert from_parquet == from_csv
    assert [k for k, _ in from_parquet] == ["transaction", "transaction", "label"]


def test_a_sorted_file_streams_lazily(tmp_path: Path) -> None:
    rows = "".join(f"t{i},{1_546_300_800 + i},c{i % 7},m1,1.5\n" for i in range(5000))
    path = _write(tmp_path, "transaction_id,event_time,card_id,merchant_id,amount\n" + rows)
    mapping = ColumnMapping(defaults={"currency": "EUR", "country": "FR", "channel": "pos"})
    stream = read_csv_events(path, mapping)
    kind, first = next(stream)
    assert (kind, first["transaction_id"]) == ("transaction", "t0")
    assert sum(1 for _ in stream) == 4999


def test_a_label_without_its_time_and_no_delay_is_an_error_not_a_guess(tmp_path: Path) -> None:
    text = ("transaction_id,event_time,card_id,merchant_id,amount,label,label_time\n"
            "t1,1546300800,c1,m1,10.0,1,1546400800\n"
            "t2,1546300801,c2,m1,10.0,1,\n")
    mapping = ColumnMapping(defaults={"currency": "EUR", "country": "FR", "channel": "pos"})
    events = list(read_csv_events(_write(tmp_path, text), mapping))
    assert [lb["transaction_id"] for lb in _of(events, "label")] == ["t1"]
    [error] = _of(events, "error")
    assert error["line"] == 3 and "label delay" in error["reason"]
    assert "transaction kept" in error["reason"]
    assert {t["transaction_id"] for t in _of(events, "transaction")} == {"t1", "t2"}
