"""The exchange-rates table through the control topic: published by ``fraudstream rates``
after the checks a worker makes, in force on a running worker and API without a restart,
kept by a worker that restarts, and refused (by the CLI and by the worker) when it would
change the deployment's reference currency."""

from __future__ import annotations

import subprocess
import time
import tomllib
import uuid
from pathlib import Path

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer

from fraudstream.schemas.control import ControlRecord
from fraudstream.schemas.fx import Rates, RatesError
from fraudstream.streams.control.follow import in_force
from fraudstream.streams.control.topic import latest, publish
from fraudstream.streams.embedded.broker import free_port
from fraudstream.streams.settings import Settings
from fraudstream.streams.topics import assign_all
from tests.conftest import T0_MS, produce
from tests.test_api_e2e import ApiProcess, _post_all, _run
from tests.test_control import cli as control_cli
from tests.test_control import metric

SHIPPED = Rates.load()


def rates_file(folder: Path, version: str, reference: str = "EUR", drop: str = "",
               **changed: float) -> Path:
    """The shipped table under another version, with ``changed`` rates (added when new),
    without ``drop``, or (``reference``) in another reference currency."""
    table = dict(SHIPPED.units_per_ref)
    table.update(changed)
    table.pop(drop, None)
    if reference != SHIPPED.reference:
        base = table[reference]
        table = {c: r / base for c, r in table.items()}
        table[reference] = 1.0
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"rates-{version}.toml"
    path.write_text(f'version = "{version}"\nreference = "{reference}"\n\n[rates]\n'
                    + "".join(f"{c} = {r!r}\n" for c, r in sorted(table.items())))
    return path


def cli(settings: Settings, *args: str) -> subprocess.CompletedProcess:
    return control_cli(settings, *args, command="rates")


def test_a_rates_version_holding_a_card_number_is_refused():
    with pytest.raises(RatesError, match="card number"):
        Rates.from_mapping({"version": "4111 1111 1111 1111", "reference": "EUR",
                            "rates": {"EUR": 1.0}})


@pytest.mark.e2e
@pytest.mark.slow  # 25 s: make test-slow (CI runs both)
def test_a_published_rates_table_converts_amounts_without_a_restart(
        stack_settings, start_worker, codecs, tmp_path):
    port = free_port()
    settings = stack_settings.replace(worker={"metrics_port": port})
    card = f"card_fx_{uuid.uuid4().hex[:6]}"
    count = iter(range(10_000))
    reader = Consumer(settings.kafka.consumer_config("tests-rates-reader"))
    assign_all(reader, [settings.topics.decisions, settings.topics.dlq], OFFSET_BEGINNING)
    seen: dict[str, dict] = {}

    def decide(currency: str, amount: float, timeout_s: float = 30.0) -> dict:
        """One more transaction of the card, and its decision or dead letter."""
        i = next(count)
        tid = f"fx-{card}-{i}"
        txn = {"transaction_id": tid, "event_time": T0_MS + i * 1000, "card_id": card,
               "customer_id": None, "merchant_id": "m_fx", "terminal_id": None,
               "amount": amount, "currency": currency, "mcc": "5411", "country": "FR",
               "card_country": "FR", "lat": None, "lon": None, "device_id": None,
               "ip": None, "channel": "ecom"}
        produce(settings, settings.topics.transactions,
                [(card.encode(), codecs.transaction.encode(txn))])
        deadline = time.monotonic() + timeout_s
        while tid not in seen:
            assert time.monotonic() < deadline, f"{tid}: no decision nor dead letter"
            for m in reader.consume(1000, 0.2):
                if m.error():
                    continue
                if m.topic() == settings.topics.dlq:
                    d = codecs.dead_letter.decode(m.value())
                    if tid.encode() in (d["value"] or b""):  # the record's bytes, masked
                        seen[tid] = d
                else:
                    d = codecs.decision.decode(m.value())
                    seen[d["transaction_id"]] = d
        return seen[tid]

    worker = start_worker(settings)
    api = ApiProcess(settings, tmp_path / "api.log").start()
    try:
        # Gold is not in the shipped table: a transaction in it is a dead letter, and the
        # API refuses it naming the field.
        letter = decide("XAU", 2.0)
        assert letter.get("field") == "currency" and "amount_ref" not in letter, letter
        assert f"no exchange rate for 'XAU' in rates table {SHIPPED.version}" in \
            letter["reason"]
        usd = decide("USD", 100.0)
        assert usd["amount_ref"] == pytest.approx(100.0 / SHIPPED.rate("USD"), abs=1e-4)
        assert usd["rates_version"] == SHIPPED.version
        probe = {"transaction_id": f"api-{card}-0", "event_time": T0_MS, "card_id": card,
                 "merchant_id": "m_fx", "amount": 2.0, "currency": "XAU", "mcc": "5411",
                 "country": "FR", "card_country": "FR", "channel": "ecom"}
        [(status, _h, body, _e)] = _run(_post_all(api, [probe]))
        assert status == 422 and body["field"] == "currency", body

        # Treasury publishes the day's table: gold added, the dollar moved.
        path = rates_file(tmp_path / "ops", "2026-12-05", XAU=0.0004, USD=1.20)
        started = time.monotonic()
        out = cli(settings, "publish", str(path), "--reason", "daily ECB rates",
                  "--by", "treasury-job")
        assert out.returncode == 0, out.stderr
        assert "rates 2026-12-05" in out.stdout and "USD 11%" in out.stdout, out.stdout
        deadline = time.monotonic() + 20
        while "amount_ref" not in (gold := decide("XAU", 2.0)):
            assert time.monotonic() < deadline, worker.tail()
            time.sleep(0.5)
        assert gold["amount_ref"] == pytest.approx(2.0 / 0.0004, abs=1e-4)
        assert gold["rates_version"] == "2026-12-05"
        took = time.monotonic() - started
        assert decide("USD", 100.0)["amount_ref"] == pytest.approx(100.0 / 1.20, abs=1e-4)
        assert worker.running
        assert metric(port, 'fraudstream_rates_info{reference="EUR",version="2026-12-05"}') \
            == 1.0
        assert metric(port, f'fraudstream_rates_info{{reference="EUR",version='
                            f'"{SHIPPED.version}"}}') is None
        # The API reads requests with the same table, and answers with the stream's decision.
        deadline = time.monotonic() + 20
        while True:
            probe["transaction_id"] = f"api-{card}-{next(count)}"
            [(status, _h, body, _e)] = _run(_post_all(api, [probe]))
            if status == 200:
                break
            assert status == 422 and time.monotonic() < deadline, (status, body)
            time.sleep(0.5)
        assert body["amount_ref"] == pytest.approx(2.0 / 0.0004, abs=1e-4), body
        assert body["rates_version"] == "2026-12-05", body

        # Published past the CLI: a table in dollars. The worker refuses it and keeps euros.
        by_hand = rates_file(tmp_path / "bad", "2026-12-05-usd", reference="USD")
        publish(settings, ControlRecord.make(
            "rates", "2026-12-05-usd", tomllib.loads(by_hand.read_text()), "script@ops",
            T0_MS, "by hand").after(latest(settings, "rates")))
        deadline = time.monotonic() + 20
        while "control: refused the rates table" not in worker.log.read_text():
            assert time.monotonic() < deadline, worker.tail()
            time.sleep(0.5)
        assert "but this deployment's are in EUR" in worker.log.read_text()
        assert decide("USD", 100.0)["amount_ref"] == pytest.approx(100.0 / 1.20, abs=1e-4)
        assert metric(port, 'fraudstream_control_refused_total{kind="rates"}') == 1.0
        # What a replay and a retraining convert with: the table the workers apply.
        assert in_force(settings)[1].version == "2026-12-05"
    finally:
        api.stop()

    # The CLI refuses what would break amounts, and writes nothing.
    out = cli(settings, "publish", str(rates_file(tmp_path / "c", "d-usd", reference="USD")),
              "--reason", "oops")
    assert out.returncode == 2 and "amounts in USD" in out.stderr, out.stderr
    assert "the last table published (2026-12-05-usd) is not in force" in out.stderr
    out = cli(settings, "publish", str(rates_file(tmp_path / "c", "d-nogbp", drop="GBP",
                                                  XAU=0.0004, USD=1.20)), "--reason", "x")
    assert out.returncode == 2 and "GBP" in out.stderr and "--allow-dropped" in out.stderr
    out = cli(settings, "publish", str(rates_file(tmp_path / "c", "2026-12-05", XAU=0.0004,
                                                  USD=1.3)),
              "--reason", "x")
    assert out.returncode == 2 and "version of its own" in out.stderr, out.stderr
    out = cli(settings, "publish", str(path), "--reason", "again")
    assert out.returncode == 0 and "in force already" in out.stdout, out.stdout
    out = cli(settings, "history")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert len(lines) == 2 and "2026-12-05" in lines[0] and "treasury-job" in lines[0]
    assert "daily ECB rates" in lines[0] and "2026-12-05-usd" in lines[1]

    # A restarted worker starts with the table in force, not its file's.
    assert worker.stop() == 0
    worker = start_worker(settings)
    gold = decide("XAU", 3.0, timeout_s=60)
    assert gold.get("amount_ref") == pytest.approx(3.0 / 0.0004, abs=1e-4), worker.tail()
    reader.close()
    print(f"published table in force on the worker {took:.1f} s after the command started")



@pytest.mark.e2e
def test_features_built_offline_take_the_table_in_force_when_asked(stack_settings, tmp_path):
    # An analyst builds a training set after the rates were replaced on the control topic:
    # with --in-force its amounts are converted as every worker converts them now, not
    # with the machine's (older) rates file.
    import csv

    from fraudstream.streams.traffic.history import write_csv

    settings = stack_settings
    card = f"card_off_{uuid.uuid4().hex[:6]}"
    txns = [{"transaction_id": f"off-{card}-{i}", "event_time": T0_MS + i * 60_000,
             "card_id": card, "customer_id": None, "merchant_id": "m_off",
             "terminal_id": None, "amount": 100.0, "currency": "USD", "mcc": "5411",
             "country": "US", "card_country": "US", "lat": None, "lon": None,
             "device_id": None, "ip": None, "channel": "ecom"} for i in range(2)]
    history = tmp_path / "history.csv"
    write_csv(history, txns, [])
    usd = SHIPPED.rate("USD")
    assert usd is not None
    out = cli(settings, "publish", str(rates_file(tmp_path, "fx-offline", USD=usd * 2)),
              "--reason", "USD halved against EUR")
    assert out.returncode == 0, out.stderr

    def max_1h(*flags: str, on: Settings = settings) -> tuple[float, str]:
        target = tmp_path / f"features{len(flags)}.csv"
        run = control_cli(on, str(history), "--keep-order", "--out", str(target), *flags,
                          command="features")
        assert run.returncode == 0, run.stderr
        with target.open() as fh:
            rows = list(csv.DictReader(fh))
        return float(rows[1]["card_max_1h"]), run.stderr

    from_file, _ = max_1h()
    in_force_now, said = max_1h("--in-force")
    assert from_file == pytest.approx(100.0 / usd)
    assert in_force_now == pytest.approx(from_file / 2)
    assert "rates fx-offline (EUR), as in force on" in said

    # Asked for the tables in force, with no broker to read them from: one line, not the
    # files in silence.
    down = settings.replace(kafka={"bootstrap": f"127.0.0.1:{free_port()}",
                                   "connect_timeout_s": 2.0})
    run = control_cli(down, str(history), "--out", str(tmp_path / "x.csv"), "--in-force",
                      command="features")
    assert run.returncode == 3 and not (tmp_path / "x.csv").exists()
    assert run.stderr.count("\n") == 1 and "cannot reach Kafka" in run.stderr, run.stderr
