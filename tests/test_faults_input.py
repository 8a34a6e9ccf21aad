"""Bad input that must neither stop a partition nor leak a card number: records far over the
size limit (1 MB, 5 MB), dead letters the broker refuses, card numbers in any identifier
field, control characters in identifiers. End to end on the embedded broker with a real
worker, and the policies as pure unit tests."""

from __future__ import annotations

import asyncio
import hashlib
import random
import time
import urllib.request
from pathlib import Path

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer
from confluent_kafka.admin import AdminClient

from fraudstream.schemas.codec import Codecs, make_registry
from fraudstream.schemas.validate import LABEL_IDS, TRANSACTION_IDS, contains_pan, mask_pans
from fraudstream.scorers.rules import RuleSet, RulesScorer
from fraudstream.streams.dead_letters import DeadLetters
from fraudstream.streams.embedded.broker import free_port
from fraudstream.streams.pipeline import BatchResult, Limits, Pipeline, RawRecord
from fraudstream.streams.settings import Settings, TopicSettings
from fraudstream.streams.topics import assign_all
from fraudstream.streams.traffic.generator import TrafficGenerator
from fraudstream.streams.traffic.world import GeneratorConfig
from fraudstream.streams.worker.delivery import BatchCommitter, KafkaSink
from tests.conftest import T0_MS, consume_all, produce

KIB = 1024
MB = 1024 * 1024


def pan(rng: random.Random, prefix: str = "4") -> str:
    """A random 16-digit number that passes the Luhn check (random digits: no repeated
    runs a compressor could hide)."""
    body = prefix + "".join(rng.choice("0123456789") for _ in range(15 - len(prefix)))
    for check in "0123456789":
        if contains_pan(body + check):
            return body + check
    raise AssertionError("unreachable")


def generated(n: int, seed: int) -> list[dict]:
    gen = TrafficGenerator(GeneratorConfig(seed=seed))
    return [gen.next_transaction(T0_MS - n * 5 + 5 * i) for i in range(n)]


def produce_big(settings: Settings, topic: str, records: list[tuple[bytes, bytes]]) -> None:
    """In order, one partition (same key), with a producer that allows 10 MB records."""
    producer = Producer({**settings.kafka.client_config(), "linger.ms": 5,
                         "message.max.bytes": 10 * MB})
    for key, value in records:
        producer.produce(topic, key=key, value=value)
        producer.poll(0)
    assert producer.flush(60) == 0


def read_everything(settings: Settings, topics: list[str], idle_s: float = 2.0) -> list:
    """Every record of ``topics`` from the beginning, until none came for ``idle_s``."""
    consumer = Consumer(settings.kafka.consumer_config("tests-grep"))
    assign_all(consumer, topics, OFFSET_BEGINNING)
    out: list = []
    last = time.monotonic()
    try:
        while time.monotonic() - last < idle_s:
            msgs = [m for m in consumer.consume(1000, 0.2) if not m.error()]
            if msgs:
                out += msgs
                last = time.monotonic()
    finally:
        consumer.close()
    return out


# -- 1. Records far over the size limit ----------------------------------------------------


@pytest.mark.e2e
def test_1mb_and_5mb_records_go_to_the_dlq_bounded_and_the_partition_moves_on(
        stack_settings, codecs, start_worker):
    """A record of 1 MB and one of 5 MB, each followed by good transactions on the same
    partition: the worker stays up, decides every good one, and each big record reaches
    the DLQ as ``oversize`` with its first 64 KiB, its size and its sha256."""
    txns = generated(150, seed=21)
    key = b"card_big"
    big = {size: codecs.transaction.encode(dict(txns[0], transaction_id=f"big-{size}",
                                                device_id="d" * 100,
                                                customer_id="x" * size))
           for size in (MB, 5 * MB)}
    records = [(key, codecs.transaction.encode(t)) for t in txns[:50]]
    records.append((key, big[MB]))
    records += [(key, codecs.transaction.encode(t)) for t in txns[50:100]]
    records.append((key, big[5 * MB]))
    records += [(key, codecs.transaction.encode(t)) for t in txns[100:]]
    worker = start_worker()
    produce_big(stack_settings, stack_settings.topics.transactions, records)

    ids = {t["transaction_id"].encode() for t in txns}
    decided = consume_all(stack_settings, stack_settings.topics.decisions, len(txns),
                          timeout_s=90, keys=ids)
    assert {m.key() for m in decided} == ids, worker.tail()
    dead = consume_all(stack_settings, stack_settings.topics.dlq, 2, timeout_s=30)
    assert worker.running, worker.tail()
    assert "Worker ready" in worker.log.read_text()
    letters = sorted((codecs.dead_letter.decode(m.value()) for m in dead),
                     key=lambda d: d["value_size"])
    assert [d["value_size"] for d in letters] == [len(big[MB]), len(big[5 * MB])]
    for d in letters:
        original = big[d["value_size"] > 2 * MB and 5 * MB or MB]
        assert d["error_kind"] == "oversize" and d["truncated"] is True
        assert d["value"] == original[:64 * KIB]
        assert d["value_sha256"] == hashlib.sha256(original).hexdigest()
        assert f"record of {len(original)} bytes is over 65536" in d["reason"]
        assert len(dead[0].value()) < 70 * KIB


@pytest.mark.e2e
def test_a_dead_letter_the_client_refuses_is_sent_again_without_its_value(
        stack_settings, codecs):
    """A dead-letter bound set over the producer's message.max.bytes: the dead letter of a
    1.5 MB record is refused by the producer (the crash loop of the old worker); it goes
    out again without the value, and the batch's decision is published."""
    pipeline = Pipeline(codecs, RulesScorer(RuleSet.default()),
                        Limits(65536, 300_000, 1e6, dead_letter_max_bytes=2 * MB),
                        clock=lambda: T0_MS / 1000)
    good = generated(1, seed=22)[0]
    huge = codecs.transaction.encode(dict(good, transaction_id="huge",
                                          customer_id="y" * (3 * MB // 2)))
    recs = [RawRecord(stack_settings.topics.transactions, 0, 7, b"k", huge, T0_MS),
            RawRecord(stack_settings.topics.transactions, 0, 8, b"k",
                      codecs.transaction.encode(good), T0_MS)]
    result = pipeline.process(recs, lambda p, keys: [None] * len(keys))
    assert len(result.dead_letters) == 1 and len(result.dead_letters[0][1]) > MB
    sink = KafkaSink(stack_settings.kafka.client_config())
    lost: list[str] = []
    committer = BatchCommitter(Journal(), sink, stack_settings.topics.decisions,
                               stack_settings.topics.dlq, dead_letters=pipeline.dead_letters,
                               on_lost=lost.append)
    asyncio.run(committer.commit(result))
    assert lost == []
    [dead] = consume_all(stack_settings, stack_settings.topics.dlq, 1, timeout_s=20)
    letter = codecs.dead_letter.decode(dead.value())
    assert letter["value"] is None and letter["truncated"] is True
    assert letter["source_offset"] == 7 and letter["value_size"] == len(huge)
    assert letter["value_sha256"] == hashlib.sha256(huge).hexdigest()
    assert "value dropped: MSG_SIZE_TOO_LARGE" in letter["reason"]
    [decision] = consume_all(stack_settings, stack_settings.topics.decisions, 1, timeout_s=20)
    assert decision.key() == good["transaction_id"].encode()


class Journal:
    """A dedupe state that holds nothing (unit tests of the commit step)."""

    def record(self, entries) -> None:
        pass

    async def flush(self) -> None:
        pass


class RefusingSink:
    """Refuses every record of ``refuse`` (a pure unit test of the policy)."""

    def __init__(self, refuse: str, times: int) -> None:
        self.refuse, self.times = refuse, times
        self.published: list[tuple[str, list]] = []

    async def publish(self, batches, tolerant=()) -> list:
        refused = []
        for topic, records in batches:
            if topic == self.refuse and self.times > 0:
                assert topic in tolerant
                refused += [(topic, i, "TOPIC_AUTHORIZATION_FAILED: denied")
                            for i in range(len(records))]
            else:
                self.published.append((topic, list(records)))
        if refused:
            self.times -= 1
        return refused


def _letters(codecs: Codecs, n: int) -> tuple[DeadLetters, BatchResult]:
    dl = DeadLetters(codecs.dead_letter, 64 * KIB)
    out = BatchResult()
    out.decisions = [(b"t1", b"decision")]
    out.dead_letters = [dl.build(RawRecord("transactions", 2, 40 + i, b"card_1",
                                           b"garbage %d" % i, T0_MS),
                                 "decode", None, "not Avro", T0_MS) for i in range(n)]
    return dl, out


@pytest.fixture
def unit_codecs() -> Codecs:
    return Codecs(make_registry("mock://faults-input"), TopicSettings())


def test_a_refused_dead_letter_is_retried_without_its_value(unit_codecs, caplog):
    dl, result = _letters(unit_codecs, 2)
    sink = RefusingSink("dlq", times=1)
    lost: list[str] = []
    committer = BatchCommitter(Journal(), sink, "decisions", "dlq", dead_letters=dl,
                               on_lost=lost.append)
    asyncio.run(committer.commit(result))
    assert lost == []
    assert sink.published[0] == ("decisions", [(b"t1", b"decision")])
    [(topic, again)] = sink.published[1:]
    assert topic == "dlq" and [k for k, _ in again] == [b"card_1", b"card_1"]
    letters = [unit_codecs.dead_letter.decode(v) for _, v in again]
    assert [d["source_offset"] for d in letters] == [40, 41]
    assert all(d["value"] is None and d["truncated"] and d["value_size"] == 9 for d in letters)
    assert all("value dropped: TOPIC_AUTHORIZATION_FAILED" in d["reason"] for d in letters)
    assert "transactions[2]@40" in caplog.text


def test_a_dead_letter_refused_twice_is_logged_counted_and_skipped(unit_codecs, caplog):
    """The batch is not failed (its partition would stall): an error line names the source
    record, the callback counts it (fraudstream_dead_letters_lost_total)."""
    dl, result = _letters(unit_codecs, 2)
    sink = RefusingSink("dlq", times=2)
    lost: list[str] = []
    committer = BatchCommitter(Journal(), sink, "decisions", "dlq", dead_letters=dl,
                               on_lost=lost.append)
    asyncio.run(committer.commit(result))  # does not raise
    assert len(lost) == 2 and all(w.startswith("TOPIC_AUTHORIZATION_FAILED") for w in lost)
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 2
    assert "transactions[2]@40 (decode -: not Avro" in errors[0].getMessage()
    assert "LOST" in errors[0].getMessage()


def test_a_dead_letter_is_bounded_masked_and_hashed(unit_codecs):
    rng = random.Random(5)
    number = pan(rng)
    dl = DeadLetters(unit_codecs.dead_letter, 1000)
    clean = b"x" * 5000
    with_pan = b"a" * 995 + number.encode() + b"b" * 5000  # the number straddles the cut
    key = b"k" * 5000
    _, v1 = dl.build(RawRecord("t", 0, 1, key, clean, 0), "oversize", None, "too big", 0)
    _, v2 = dl.build(RawRecord("t", 0, 2, b"c" + number.encode(), with_pan, 0),
                     "oversize", None, "too big", 0)
    a, b = (unit_codecs.dead_letter.decode(v) for v in (v1, v2))
    assert a["value"] == clean[:1000] and len(a["key"]) == 1024 and a["truncated"]
    assert a["value_sha256"] == hashlib.sha256(clean).hexdigest() and a["value_size"] == 5000
    assert number[:5].encode() not in b["value"] and b["value"].endswith(b"*****")
    assert number.encode() not in b["key"] and b["key"].endswith(number[-4:].encode())
    assert b["value_sha256"] is None and b["value_size"] == len(with_pan)
    # a number far past the cut: the kept bytes are clean, but no hash goes out
    far = b"z" * 3000 + number.encode() + b"z"
    _, v4 = dl.build(RawRecord("t", 0, 4, None, far, 0), "oversize", None, "too big", 0)
    d = unit_codecs.dead_letter.decode(v4)
    assert d["value"] == far[:1000] and d["value_sha256"] is None and d["truncated"]
    # small and clean: whole, not truncated
    _, v3 = dl.build(RawRecord("t", 0, 3, None, b"tiny", 0), "decode", None, "bad", 0)
    c = unit_codecs.dead_letter.decode(v3)
    assert c["value"] == b"tiny" and not c["truncated"] and c["key"] is None


def test_old_dead_letters_still_read_and_new_ones_read_with_the_old_schema(unit_codecs):
    """The new fields have defaults: a reader of the old schema reads the new records."""
    import io
    import json

    import fastavro

    from fraudstream.schemas.codec import schema_text

    new = json.loads(schema_text("dead_letter"))
    old = dict(new, fields=[f for f in new["fields"]
                            if f["name"] not in ("value_size", "value_sha256", "truncated")])
    dl = DeadLetters(unit_codecs.dead_letter, 1000)
    _, value = dl.build(RawRecord("t", 0, 1, None, b"v", 0), "decode", None, "bad", 0)
    buf = io.BytesIO(value[5:])
    rec = fastavro.schemaless_reader(buf, fastavro.parse_schema(new),
                                     fastavro.parse_schema(old))
    assert rec["reason"] == "bad" and "truncated" not in rec
    out = io.BytesIO()
    fastavro.schemaless_writer(out, fastavro.parse_schema(old), dict(rec))
    back = fastavro.schemaless_reader(io.BytesIO(out.getvalue()), fastavro.parse_schema(old),
                                      fastavro.parse_schema(new))
    assert back["truncated"] is False and back["value_sha256"] is None


# -- 2 and 7. Card numbers and control characters in identifiers ---------------------------


def test_mask_pans_finds_a_number_glued_to_an_avro_length_byte(unit_codecs):
    """Avro writes a 16-character string after a length byte 0x20 (a space): with a digit
    before it ("cust_123 4111...") the run is 19 digits and was left unmasked. A 24-28
    character string has a digit for its length byte: two digits glued on."""
    rng = random.Random(7)
    base = generated(1, seed=3)[0]
    for _ in range(50):
        number = pan(rng)
        t = dict(base, customer_id="cust_123", merchant_id=number)
        assert number.encode() not in mask_pans(unit_codecs.transaction.encode(t), glued=True)
        # 26 characters: the length byte is "4", after a customer_id ending in a digit
        t = dict(base, customer_id="cust_1", merchant_id=f"{number}-shop-0001")
        assert b"cust_14" + number.encode() in unit_codecs.transaction.encode(t)
        assert number[:12].encode() not in mask_pans(unit_codecs.transaction.encode(t),
                                                     glued=True)


def test_contains_pan_spares_uuids_and_dates():
    """A dash joins UUID groups and dates: inside a longer identifier only contiguous or
    space-grouped digits count; 0.21% of uuid4s had a Luhn-valid dash-joined run."""
    import uuid

    rng = random.Random(11)
    assert not any(contains_pan(str(uuid.UUID(int=rng.getrandbits(128), version=4)))
                   for _ in range(20000))
    assert not contains_pan("order-2026-01-05-000123456789")
    number = pan(rng)
    spaced = " ".join(number[i:i + 4] for i in range(0, 16, 4))
    for value in (number, spaced, spaced.replace(" ", "-"), f"ord-{number}", f"{number}|x",
                  f"ref {spaced} ok", f" {spaced.replace(' ', '-')} ",
                  "".join(chr(0xFF10 + int(c)) for c in number),
                  "".join(chr(0x0660 + int(c)) for c in number)):
        assert contains_pan(value), value


CONTROLS = {"rtl": "\u202e", "nul": "\x00", "esc": "\x1b[31m", "newline": "\n", "c1": "\x85",
            "zero_width": "\u200b", "line_separator": "\u2028", "bom": "\ufeff"}


@pytest.mark.parametrize("field", TRANSACTION_IDS)
def test_a_card_number_or_a_control_character_in_any_identifier_is_refused(
        unit_codecs, field):
    pipeline = Pipeline(unit_codecs, RulesScorer(RuleSet.default()),
                        Limits(65536, 300_000, 1e6), clock=lambda: T0_MS / 1000)
    good = dict(generated(1, seed=4)[0], ip="10.0.0.1")
    number = pan(random.Random(field))
    values = [number, f"id-{number}"] + [
        f"ab{c}cd" if field != "ip" else f"fe80::1%eth{c}0" for c in CONTROLS.values()]
    recs = [RawRecord("transactions", 0, i, b"k",
                      unit_codecs.transaction.encode(dict(good, **{field: v})), T0_MS)
            for i, v in enumerate(values)]
    result = pipeline.process(recs, lambda p, keys: [None] * len(keys))
    assert result.decisions == []
    letters = [unit_codecs.dead_letter.decode(v) for _, v in result.dead_letters]
    assert [d["field"] for d in letters] == [field] * len(values)
    assert all("raw card number" in d["reason"] for d in letters[:2])
    assert all("control character U+" in d["reason"] for d in letters[2:])
    for _, v in result.dead_letters:
        assert number.encode() not in v


@pytest.mark.parametrize("field", LABEL_IDS)
def test_a_label_with_a_card_number_or_control_in_an_identifier_is_refused(
        unit_codecs, field):
    pipeline = Pipeline(unit_codecs, RulesScorer(RuleSet.default()),
                        Limits(65536, 300_000, 1e6), clock=lambda: T0_MS / 1000)
    label = {"transaction_id": "t1", "card_id": "card_1", "merchant_id": "m1",
             "is_fraud": True, "fraud_type": "card_testing", "source": "chargeback",
             "event_time": T0_MS, "label_time": T0_MS + 1000}
    number = pan(random.Random(field))
    recs = [RawRecord("labels", 0, i, b"k",
                      unit_codecs.label.encode(dict(label, **{field: v})), T0_MS)
            for i, v in enumerate((number, "a\x1b[2Jb"))]
    result = pipeline.process([], lambda p, keys: [], labels=recs)
    letters = [unit_codecs.dead_letter.decode(v) for _, v in result.dead_letters]
    assert [d["field"] for d in letters] == [field, field]


def test_codes_with_a_trailing_newline_are_refused(unit_codecs):
    """``$`` matched before a final newline: "FR\\n" passed as a country."""
    pipeline = Pipeline(unit_codecs, RulesScorer(RuleSet.default()),
                        Limits(65536, 300_000, 1e6), clock=lambda: T0_MS / 1000)
    good = generated(1, seed=4)[0]
    recs = [RawRecord("transactions", 0, i, b"k",
                      unit_codecs.transaction.encode(dict(good, **{f: good[f] + "\n"})), T0_MS)
            for i, f in enumerate(("country", "currency", "mcc", "channel"))]
    result = pipeline.process(recs, lambda p, keys: [None] * len(keys))
    assert [unit_codecs.dead_letter.decode(v)["field"] for _, v in result.dead_letters] == [
        "country", "currency", "mcc", "channel"]


@pytest.mark.e2e
def test_no_card_number_in_any_artifact_of_a_run(stack_settings, codecs, start_worker,
                                                 tmp_path: Path):
    """A card number in every identifier field of transactions and labels, through a real
    worker with the RocksDB store; then every artifact of the run is searched for the
    digits: every topic of the run (decisions, DLQ, changelogs, ...), the worker's data
    dir, its log and its /metrics page. Control characters sent in identifiers come back
    as dead letters naming the field, never in a decision."""
    rng = random.Random(12)
    port = free_port()
    settings = stack_settings.replace(worker={"store": "rocksdb", "metrics_port": port})
    worker = start_worker(settings)
    good = generated(60, seed=23)
    numbers: dict[str, str] = {}  # what -> the 16 digits sent
    forms: dict[str, list[bytes]] = {}  # what -> the byte strings that would be a leak
    txn_bad: list[tuple[bytes, bytes]] = []
    for i, field in enumerate(TRANSACTION_IDS):
        number = numbers[f"txn.{field}"] = pan(rng)
        # a customer_id ending in a digit right before the merchant_id (glued in Avro)
        txn_bad.append((b"card_pan", codecs.transaction.encode(
            {**good[i], "customer_id": "cust_123", "transaction_id": f"pan-{field}",
             field: number})))
        spaced = numbers[f"txn.{field}.spaced"] = pan(rng, "5")
        grouped = " ".join(spaced[j:j + 4] for j in range(0, 16, 4))
        forms[f"txn.{field}.spaced"] = [grouped.encode()]
        txn_bad.append((b"card_pan", codecs.transaction.encode(
            {**good[i], "transaction_id": f"pan-spaced-{field}", field: f"ref {grouped}"})))
    label_bad: list[tuple[bytes, bytes]] = []
    for field in LABEL_IDS:
        number = numbers[f"label.{field}"] = pan(rng)
        label_bad.append((b"card_pan", codecs.label.encode(dict(
            {"transaction_id": good[0]["transaction_id"], "card_id": good[0]["card_id"],
             "merchant_id": good[0]["merchant_id"], "is_fraud": True, "fraud_type": None,
             "source": "chargeback", "event_time": T0_MS, "label_time": T0_MS},
            **{field: number}))))
    for what, number in numbers.items():
        # the number, or its first 12 digits (what masking hides)
        forms.setdefault(what, []).extend([number.encode(), number[:12].encode()])
    controls = [(b"card_ctl", codecs.transaction.encode(dict(
        good[1], transaction_id=f"ctl-{name}", merchant_id=f"m{c}x")))
        for name, c in CONTROLS.items()]
    produce(settings, settings.topics.transactions,
            [(t["card_id"].encode(), codecs.transaction.encode(t)) for t in good]
            + txn_bad + controls)
    produce(settings, settings.topics.labels, label_bad)

    decided = consume_all(settings, settings.topics.decisions, len(good), timeout_s=60,
                          keys={t["transaction_id"].encode() for t in good})
    assert {t["transaction_id"].encode() for t in good} <= {m.key() for m in decided}, (
        worker.tail())
    n_bad = len(txn_bad) + len(label_bad) + len(controls)
    dead = consume_all(settings, settings.topics.dlq, n_bad, timeout_s=30)
    time.sleep(2 * settings.worker.commit_interval_s)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        metrics = resp.read()
    assert b"fraudstream_dead_letters_total" in metrics
    assert worker.stop() == 0, worker.tail()

    uid = settings.worker.app_id.rsplit("-", 1)[1]
    inputs = {settings.topics.transactions, settings.topics.labels}  # what we sent
    topics = [t for t in AdminClient(settings.kafka.client_config()).list_topics(
        timeout=10).topics if uid in t and t not in inputs]
    assert any("changelog" in t for t in topics), topics
    artifacts: dict[str, bytes] = {"/metrics": metrics, "worker log": worker.log.read_bytes()}
    for m in read_everything(settings, topics):
        name = f"topic {m.topic()}[{m.partition()}]@{m.offset()}"
        artifacts[name] = (m.key() or b"") + b"\x00" + (m.value() or b"")
    files = [p for p in Path(settings.worker.data_dir).rglob("*") if p.is_file()]
    assert files
    for p in files:
        artifacts[f"file {p}"] = p.read_bytes()
    leaks = [(what, where) for what, leak in forms.items() for where, data in artifacts.items()
             if any(form in data for form in leak)]
    assert not leaks, leaks[:10]

    assert len(dead) == n_bad, worker.tail()
    letters = [codecs.dead_letter.decode(m.value()) for m in dead]
    fields = sorted(d["field"] for d in letters if "raw card number" in d["reason"])
    assert fields == sorted([*TRANSACTION_IDS, *TRANSACTION_IDS, *LABEL_IDS])
    ctl = [d for d in letters if "control character" in d["reason"]]
    assert len(ctl) == len(CONTROLS) and {d["field"] for d in ctl} == {"merchant_id"}
    decided_ids = {m.key() for m in read_everything(settings, [settings.topics.decisions])}
    assert decided_ids == {t["transaction_id"].encode() for t in good}  # none of ctl-*, pan-*
