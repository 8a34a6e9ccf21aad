"""Amounts in one reference currency: the rates table, the validator, rules and features."""

from __future__ import annotations

import pytest

from fraudstream.schemas.codec import Codecs, make_registry
from fraudstream.schemas.fx import Rates, RatesError
from fraudstream.schemas.validate import ValidationError, validate_history_transaction
from fraudstream.scorers.rules import RuleSet, RulesScorer
from fraudstream.state.engine import FeatureEngine, MemoryStore, TxnEvent
from fraudstream.state.features import DAY_MS, FeatureConfig
from fraudstream.streams.pipeline import Limits, Pipeline, RawRecord
from fraudstream.streams.settings import TopicSettings

T0 = 1_767_225_600_000 + 15 * 3_600_000  # 2026-01-01 15:00 UTC, a fixed instant
RATES = Rates.load()


def txn(i: int, amount: float, currency: str, **changes: object) -> dict:
    base = {
        "transaction_id": f"fx{i}", "event_time": T0 + i * 60_000, "card_id": "card_fx",
        "customer_id": None, "merchant_id": f"m{i}", "terminal_id": None, "amount": amount,
        "currency": currency, "mcc": "5816", "country": "NG", "card_country": "GB",
        "lat": None, "lon": None, "device_id": None, "ip": None, "channel": "ecom",
    }
    base.update(changes)
    return base


def test_the_shipped_table_is_versioned_and_in_euro():
    assert RATES.reference == "EUR" and RATES.rate("EUR") == 1.0
    assert RATES.version
    for code in ("USD", "GBP", "JPY", "NGN", "INR", "BRL", "THB", "MAD", "CAD", "AUD"):
        assert RATES.rate(code) is not None, code


def test_21691_ngn_is_judged_like_about_13_eur():
    ngn = validate_history_transaction(txn(1, 21_691.97, "NGN"), RATES)
    assert ngn["amount"] == 21_691.97 and ngn["currency"] == "NGN"
    assert 12.0 < ngn["amount_ref"] < 15.0
    eur = validate_history_transaction(txn(2, round(ngn["amount_ref"], 2), "EUR"), RATES)
    scorer = RulesScorer(RuleSet.default())
    s_ngn, s_eur = scorer.score_batch([ngn, eur], None)
    # The same rules fire on both: the country mismatch and the MCC, no amount rule.
    assert s_ngn.reasons == s_eur.reasons
    assert not [r for r in s_ngn.reasons if "AMOUNT" in r]
    assert s_ngn.outcome == s_eur.outcome and s_ngn.score == pytest.approx(s_eur.score)
    # A really large amount in NGN is still large: about 6,250 EUR.
    big = validate_history_transaction(txn(3, 10_000_000.0, "NGN"), RATES)
    [s_big] = scorer.score_batch([big], None)
    assert "R105_VERY_HIGH_AMOUNT" in s_big.reasons


def test_a_card_spending_in_three_currencies_gets_sums_in_euro():
    engine = FeatureEngine(FeatureConfig(), MemoryStore())
    spend = [(100.0, "EUR"), (100.0, "USD"), (10_000.0, "JPY")]
    events = [TxnEvent(0, i, validate_history_transaction(txn(i, a, c), RATES))
              for i, (a, c) in enumerate(spend)]
    vectors = engine.process(events).vectors
    euros = [a / RATES.rate(c) for a, c in spend]
    last = vectors[-1]
    assert last["card_count_24h"] == 3
    assert last["card_sum_24h"] == pytest.approx(sum(euros))
    assert last["card_max_24h"] == pytest.approx(max(euros))
    assert last["card_mean_24h"] == pytest.approx(sum(euros) / 3)
    # 10,000 JPY is about 62 EUR: smaller than the first two, not 100x them.
    assert euros[2] < euros[0]


def test_a_rule_may_name_its_currency(tmp_path):
    path = tmp_path / "rules.toml"
    path.write_text(
        'version = "t.1"\n[thresholds]\nreview = 0.5\ndecline = 0.85\n'
        '[[rules]]\nid = "JPY_BIG"\nkind = "amount"\nin_currency = "JPY"\nop = ">"\n'
        'value = 50000\nweight = 0.6\n'
        '[[rules]]\nid = "EUR_BIG"\nkind = "amount"\nop = ">"\nvalue = 300\nweight = 0.6\n')
    rules = RuleSet.load(path)
    scorer = RulesScorer(rules)
    jpy = validate_history_transaction(txn(1, 60_000.0, "JPY"), RATES)  # about 370 EUR
    usd = validate_history_transaction(txn(2, 60_000.0, "USD"), RATES)
    small_jpy = validate_history_transaction(txn(3, 40_000.0, "JPY"), RATES)  # ~247 EUR
    s_jpy, s_usd, s_small = scorer.score_batch([jpy, usd, small_jpy], None)
    assert set(s_jpy.reasons) == {"JPY_BIG", "EUR_BIG"}
    assert s_usd.reasons == ["EUR_BIG"]  # a JPY rule never reads another currency's amount
    assert s_small.reasons == []


def test_a_currency_missing_from_the_table_goes_to_the_dlq_with_the_reason():
    codecs = Codecs(make_registry("mock://fx"), TopicSettings())
    pipeline = Pipeline(codecs, RulesScorer(RuleSet.default()),
                        Limits(max_record_bytes=65536, max_future_ms=300_000,
                               max_amount=1_000_000.0, rates=RATES))
    records = [RawRecord("transactions", 0, i, b"card_fx", codecs.transaction.encode(t), T0)
               for i, t in enumerate([txn(1, 10.0, "XAU"), txn(2, 21_691.97, "NGN")])]
    out = pipeline.process(records, lambda p, keys: [None] * len(keys))
    assert out.dlq_reasons == {"validation:currency": 1}
    letter = codecs.dead_letter.decode(out.dead_letters[0][1])
    assert letter["field"] == "currency"
    assert letter["reason"] == (
        f"currency: no exchange rate for 'XAU' in rates table {RATES.version}")
    [(_key, value)] = out.decisions
    decision = codecs.decision.decode(value)
    # The decision keeps the original amount and currency, and the euro value judged.
    assert (decision["amount"], decision["currency"]) == (21_691.97, "NGN")
    assert decision["amount_ref"] == pytest.approx(21_691.97 / RATES.rate("NGN"), abs=1e-3)
    assert decision["rates_version"] == RATES.version  # the table that converted it
    assert decision["decision"] != "decline"


def test_the_absurd_bound_is_in_the_reference_currency():
    with pytest.raises(ValidationError) as err:
        validate_history_transaction(txn(1, 2_000_000.0, "USD"), RATES, max_amount=1_000_000.0)
    assert err.value.field == "amount" and "EUR" in err.value.reason


@pytest.mark.parametrize(("text", "message"), [
    ('version = "x"\nreference = "EUR"\n[rates]\nUSD = 1.1\n', "reference currency must be 1.0"),
    ('version = "x"\nreference = "EUR"\n[rates]\nEUR = 1.0\nUSD = -1\n', "rates.USD"),
    ('version = "x"\nreference = "EUR"\n[rates]\nEUR = 1.0\nusd = 1.1\n', "rates.usd"),
    ('reference = "EUR"\n[rates]\nEUR = 1.0\n', "'version'"),
    ('version = "x"\nreference = "EUR"\n[rates\n', "not valid TOML"),
])
def test_a_broken_rates_file_is_refused_naming_the_key(tmp_path, text, message):
    path = tmp_path / "rates.toml"
    path.write_text(text)
    with pytest.raises(RatesError) as err:
        Rates.load(path)
    assert message in str(err.value) and str(path) in str(err.value)


def test_a_replaced_table_changes_the_conversion_without_code(tmp_path):
    path = tmp_path / "rates.toml"
    path.write_text('version = "2027-01-02"\nreference = "USD"\n[rates]\nUSD = 1.0\n'
                    'EUR = 0.5\n')
    rates = Rates.load(path)
    t = validate_history_transaction(txn(1, 10.0, "EUR", event_time=T0 + DAY_MS), rates)
    assert t["amount_ref"] == 20.0 and rates.version == "2027-01-02"
