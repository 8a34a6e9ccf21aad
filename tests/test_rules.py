"""The declarative rules scorer: what a fraud analyst editing a rules file can rely on."""

from __future__ import annotations

import math
import textwrap
from pathlib import Path
from typing import Any

import pytest

from fraudstream.schemas.fx import Rates
from fraudstream.scorers.base import Outcome, Score, Scorer
from fraudstream.scorers.rules import DEFAULT_RULES_PATH, RuleSet, RulesScorer
from fraudstream.scorers.rules_file import RulesError

RATES = Rates.load()


def txn(**overrides: Any) -> dict[str, Any]:
    """An ordinary in-country card-present purchase; override fields per test."""
    event: dict[str, Any] = {
        "transaction_id": "t-1",
        "event_time": 1_767_225_600_000,
        "card_id": "card_000042",
        "customer_id": "cust_42",
        "merchant_id": "m_grocer_7",
        "terminal_id": "term_1",
        "amount": 42.5,
        "currency": "EUR",
        "mcc": "5411",
        "country": "DE",
        "card_country": "DE",
        "lat": 52.52,
        "lon": 13.40,
        "device_id": None,
        "ip": None,
        "channel": "pos",
    }
    event.update(overrides)
    if "amount_ref" not in overrides:  # as the validator converts it
        event["amount_ref"] = RATES.to_reference(event["amount"], event["currency"])
    return event


@pytest.fixture(scope="module")
def default_scorer() -> RulesScorer:
    return RulesScorer(RuleSet.default())


def score_one(scorer: RulesScorer, event: dict[str, Any], features: Any = None) -> Score:
    [result] = scorer.score_batch([event], None if features is None else [features])
    return result


def write_rules(tmp_path: Path, rules: str, *, header: str | None = None) -> Path:
    header = header if header is not None else (
        'version = "t.1"\n[thresholds]\nreview = 0.5\ndecline = 0.85\n'
    )
    path = tmp_path / "rules.toml"
    path.write_text(header + textwrap.dedent(rules), encoding="utf-8")
    return path


def scorer_from(tmp_path: Path, rules: str) -> RulesScorer:
    return RulesScorer(RuleSet.load(write_rules(tmp_path, rules)))


# --------------------------------------------------------------------------- default file


def test_default_file_loads_and_reports_its_version(default_scorer: RulesScorer) -> None:
    ruleset = RuleSet.load(DEFAULT_RULES_PATH)
    assert ruleset.version == "2026.12.1"
    assert default_scorer.version == f"rules@{ruleset.version}"
    assert isinstance(default_scorer, Scorer)
    assert len(ruleset.rules) >= 10


def test_normal_transaction_is_approved_without_reasons(default_scorer: RulesScorer) -> None:
    result = score_one(default_scorer, txn())
    assert result == Score(score=0.0, outcome=Outcome.APPROVE, reasons=[], hard=False)
    assert result.outcome == "approve"


@pytest.mark.parametrize("amount", [0.5, 42.5, 25_000.0])
@pytest.mark.parametrize("channel", ["pos", "ecom", "atm"])
def test_blocklisted_card_is_declined_whatever_its_amount(
    default_scorer: RulesScorer, amount: float, channel: str
) -> None:
    result = score_one(
        default_scorer, txn(card_id="card_blocked_demo_0001", amount=amount, channel=channel)
    )
    assert result.outcome == Outcome.DECLINE
    assert result.hard
    assert result.reasons[0] == "R001_BLOCKED_CARD"
    assert result.score == 1.0


def test_country_mismatch_and_high_risk_mcc_goes_to_review(
    default_scorer: RulesScorer,
) -> None:
    result = score_one(default_scorer, txn(mcc="6051", country="FR", card_country="DE"))
    assert result.outcome == Outcome.REVIEW
    assert set(result.reasons) == {"R201_HIGH_RISK_MCC", "R301_COUNTRY_MISMATCH"}
    assert not result.hard
    assert 0.5 <= result.score < 0.85


def test_either_signal_alone_is_approved_with_its_reason(default_scorer: RulesScorer) -> None:
    mismatch = score_one(default_scorer, txn(country="FR", card_country="DE"))
    assert (mismatch.outcome, mismatch.reasons) == (Outcome.APPROVE, ["R301_COUNTRY_MISMATCH"])
    unknown_card_country = score_one(default_scorer, txn(country="FR", card_country=None))
    assert unknown_card_country.reasons == []


def test_channel_amount_thresholds(default_scorer: RulesScorer) -> None:
    ecom = score_one(default_scorer, txn(channel="ecom", amount=1800.0))
    assert ecom.reasons == ["R101_HIGH_AMOUNT_ECOM"]
    assert ecom.outcome == Outcome.REVIEW
    # The same amount at a terminal is not an e-commerce risk.
    assert score_one(default_scorer, txn(channel="pos", amount=1800.0)).reasons == []
    assert score_one(default_scorer, txn(channel="atm", amount=900.0)).reasons == [
        "R102_HIGH_AMOUNT_ATM"
    ]
    gambling = score_one(default_scorer, txn(mcc="7995", amount=400.0))
    assert gambling.reasons == ["R103_HIGH_AMOUNT_GAMBLING", "R201_HIGH_RISK_MCC"]


def test_tiny_ecom_amount_is_a_weak_hint(default_scorer: RulesScorer) -> None:
    result = score_one(default_scorer, txn(channel="ecom", amount=0.99))
    assert result.reasons == ["R401_TINY_AMOUNT_ECOM"]
    assert result.outcome == Outcome.APPROVE


def test_ip_cidr_blocklist_matches(default_scorer: RulesScorer) -> None:
    inside = score_one(default_scorer, txn(channel="ecom", ip="192.0.2.77"))
    assert inside.outcome == Outcome.DECLINE
    assert inside.reasons == ["R004_BLOCKED_IP"]
    mapped = score_one(default_scorer, txn(channel="ecom", ip="::ffff:192.0.2.1"))
    assert mapped.reasons == ["R004_BLOCKED_IP"]
    for ip in ("192.0.3.1", "10.0.0.1", "2001:db8::1", "not-an-ip", "", None):
        assert score_one(default_scorer, txn(channel="ecom", ip=ip)).reasons == []


def test_ip_blocklist_from_a_sibling_file(tmp_path: Path) -> None:
    (tmp_path / "bad_ips.txt").write_text(
        "# known-bad ranges\n198.51.100.0/25\n\n2001:db8:dead::/48\n203.0.113.9\n"
    )
    scorer = scorer_from(tmp_path, """
        [[rules]]
        id = "B_IP"
        kind = "blocklist"
        field = "ip"
        weight = 1.0
        file = "bad_ips.txt"
    """)
    hits = ["198.51.100.5", "198.51.100.127", "2001:db8:dead:beef::1", "203.0.113.9"]
    misses = ["198.51.100.128", "2001:db8:beef::1", "203.0.113.10"]
    results = scorer.score_batch([txn(ip=ip) for ip in hits + misses])
    assert [r.outcome for r in results] == [Outcome.DECLINE] * 4 + [Outcome.APPROVE] * 3


@pytest.mark.parametrize(
    ("field", "value"),
    [("merchant_id", "merchant_blocked_demo_0001"), ("device_id", "device_blocked_demo_0001")],
)
def test_other_blocklists_decline(default_scorer: RulesScorer, field: str, value: str) -> None:
    result = score_one(default_scorer, txn(**{field: value}))
    assert result.outcome == Outcome.DECLINE and result.hard


# --------------------------------------------------------------------------- features


def test_feature_rules_fire_only_when_the_feature_is_present_and_over_the_bound(
    default_scorer: RulesScorer,
) -> None:
    event = txn()
    assert score_one(default_scorer, event).reasons == []  # no features at all
    assert score_one(default_scorer, event, {}).reasons == []  # feature missing
    assert score_one(default_scorer, event, {"other": 99.0}).reasons == []
    assert score_one(default_scorer, event, {"card_count_1m": 5.0}).reasons == []  # at bound
    assert score_one(default_scorer, event, {"card_count_1m": math.nan}).reasons == []
    fast = score_one(default_scorer, event, {"card_count_1m": 6.0})
    assert fast.reasons == ["R501_CARD_VELOCITY_1M"]
    burst = score_one(default_scorer, event, {"card_count_1m": 11.0})
    assert burst.reasons == ["R502_CARD_BURST_1M", "R501_CARD_VELOCITY_1M"]
    assert burst.outcome == Outcome.REVIEW


def test_features_must_align_with_events(default_scorer: RulesScorer) -> None:
    with pytest.raises(ValueError, match="align"):
        default_scorer.score_batch([txn(), txn()], [{}])


# --------------------------------------------------------------------------- combination


def test_score_batch_returns_one_score_per_event_in_order(default_scorer: RulesScorer) -> None:
    events = [
        txn(transaction_id="a"),
        txn(transaction_id="b", card_id="card_blocked_demo_0002"),
        txn(transaction_id="c", channel="ecom", amount=1.0),
        txn(transaction_id="d", channel="unknown-channel", amount=6000.0),
        txn(transaction_id="e"),
    ]
    results = default_scorer.score_batch(events)
    assert [r.outcome for r in results] == ["approve", "decline", "approve", "review", "approve"]
    assert [r.reasons[:1] for r in results] == [
        [], ["R001_BLOCKED_CARD"], ["R401_TINY_AMOUNT_ECOM"], ["R105_VERY_HIGH_AMOUNT"], [],
    ]
    assert default_scorer.score_batch([]) == []


def test_combined_score_guardrails_and_reason_order(tmp_path: Path) -> None:
    scorer = scorer_from(tmp_path, """
        [[rules]]
        id = "LOW"
        kind = "amount"
        op = ">"
        value = 10
        weight = 0.2

        [[rules]]
        id = "HIGH"
        kind = "amount"
        op = ">"
        value = 20
        weight = 0.4

        [[rules]]
        id = "WATCH"
        kind = "country"
        countries = ["NL"]
        weight = 0.1
        action = "review"

        [[rules]]
        id = "OFF"
        kind = "amount"
        op = ">"
        value = 0
        weight = 1.0
        enabled = false
    """)
    both = score_one(scorer, txn(amount=30.0))
    assert both.reasons == ["HIGH", "LOW"]
    assert both.score == pytest.approx(1 - 0.8 * 0.6)
    assert both.outcome == Outcome.REVIEW and not both.hard
    # A review guardrail forces review on a score far below the threshold...
    watched = score_one(scorer, txn(amount=15.0, country="NL"))
    assert watched.reasons == ["WATCH", "LOW"]
    assert watched.score == pytest.approx(1 - 0.9 * 0.8)
    assert (watched.outcome, watched.hard) == (Outcome.REVIEW, True)
    assert score_one(scorer, txn(amount=5.0)).reasons == []


def test_decline_beats_review_guardrail(tmp_path: Path) -> None:
    scorer = scorer_from(tmp_path, """
        [[rules]]
        id = "WATCH"
        kind = "mcc"
        mcc = [5411]
        weight = 0.1
        action = "review"

        [[rules]]
        id = "BLOCK"
        kind = "blocklist"
        field = "merchant_id"
        values = ["m_grocer_7"]
        weight = 0.05
    """)
    result = score_one(scorer, txn())
    assert result.reasons == ["BLOCK", "WATCH"]
    assert (result.outcome, result.hard) == (Outcome.DECLINE, True)


def test_learn_batch_is_a_no_op(default_scorer: RulesScorer) -> None:
    before = default_scorer.score_batch([txn(country="FR")])
    assert default_scorer.learn_batch([{"card_count_1m": 1.0}], [1]) is None
    assert default_scorer.score_batch([txn(country="FR")]) == before


# --------------------------------------------------------------------------- malformed


AMOUNT_RULE = """
[[rules]]
id = "R9_BAD"
kind = "amount"
op = ">"
value = 10
weight = 0.5
"""


@pytest.mark.parametrize(
    ("edit", "key"),
    [
        (('kind = "amount"', 'kind = "amount_typo"'), "kind"),
        (("weight = 0.5\n", ""), "weight"),
        (("weight = 0.5", "weight = 1.5"), "weight"),
        (("weight = 0.5", "weight = 0"), "weight"),
        (("weight = 0.5", "weight = true"), "weight"),
        (('op = ">"', 'op = "=>"'), "op"),
        (("value = 10", 'value = "ten"'), "value"),
        (("value = 10", "valeu = 10"), "valeu"),
        (('op = ">"', 'op = ">"\nchannel = "web"'), "channel"),
        (('op = ">"', 'op = ">"\naction = "block"'), "action"),
        (('op = ">"', 'op = ">"\nmcc = ["79951"]'), "mcc"),
    ],
)
def test_malformed_amount_rule_names_rule_and_key(
    tmp_path: Path, edit: tuple[str, str], key: str
) -> None:
    path = write_rules(tmp_path, AMOUNT_RULE.replace(*edit))
    with pytest.raises(RulesError) as err:
        RuleSet.load(path)
    assert (err.value.rule_id, err.value.key) == ("R9_BAD", key)
    assert "'R9_BAD'" in str(err.value) and f"'{key}'" in str(err.value)
    assert str(path) in str(err.value)


@pytest.mark.parametrize(
    ("rule", "key"),
    [
        ('kind = "blocklist"\nfield = "ip"\nvalues = ["10.0.0.0/33"]', "values"),
        ('kind = "blocklist"\nfield = "ip"\nvalues = ["10.0.0.1/8"]', "values"),
        ('kind = "blocklist"\nfield = "ip"\nfile = "bad.txt"', "file"),  # CIDR in file
        ('kind = "blocklist"\nfield = "ip"\nfile = "missing.txt"', "file"),
        ('kind = "blocklist"\nfield = "card_number"\nvalues = ["x"]', "field"),
        ('kind = "blocklist"\nfield = "card_id"', "values"),
        ('kind = "feature"\nfeature = "card_count_1m"\nop = "gt"\nvalue = 5', "op"),
        ('kind = "feature"\nop = ">"\nvalue = 5', "feature"),
        ('kind = "country"\ncountries = ["Germany"]', "countries"),
        ('kind = "mcc"', "mcc"),
        ('kind = "country_mismatch"\ncountries = ["DE"]', "countries"),
    ],
)
def test_malformed_rule_kinds_name_rule_and_key(tmp_path: Path, rule: str, key: str) -> None:
    (tmp_path / "bad.txt").write_text("10.0.0.0/8\n300.1.2.0/24\n")
    path = write_rules(tmp_path, f'[[rules]]\nid = "R7_BAD"\nweight = 1.0\n{rule}\n')
    with pytest.raises(RulesError) as err:
        RuleSet.load(path)
    assert (err.value.rule_id, err.value.key) == ("R7_BAD", key)
    assert "'R7_BAD'" in str(err.value)


def test_duplicate_and_missing_ids_are_reported(tmp_path: Path) -> None:
    with pytest.raises(RulesError, match=r"rule 'R9_BAD', key 'id': duplicate"):
        RuleSet.load(write_rules(tmp_path, AMOUNT_RULE + AMOUNT_RULE))
    with pytest.raises(RulesError, match=r"rule '#1', key 'id'"):
        RuleSet.load(write_rules(tmp_path, AMOUNT_RULE.replace('id = "R9_BAD"', "")))


@pytest.mark.parametrize(
    ("header", "key"),
    [
        ("[thresholds]\nreview = 0.5\ndecline = 0.9\n", "version"),
        ('version = "x"\n', "thresholds"),
        ('version = "x"\n[thresholds]\nreview = 0.9\ndecline = 0.5\n', "thresholds"),
        ('version = "x"\n[thresholds]\nreview = 0.5\n', "thresholds.decline"),
        ('version = "x"\nversoin = "y"\n[thresholds]\nreview = 0.5\ndecline = 0.9\n',
         "versoin"),
    ],
)
def test_malformed_header_names_the_key(tmp_path: Path, header: str, key: str) -> None:
    with pytest.raises(RulesError) as err:
        RuleSet.load(write_rules(tmp_path, AMOUNT_RULE, header=header))
    assert err.value.key == key


def test_unreadable_files_raise_rules_error(tmp_path: Path) -> None:
    with pytest.raises(RulesError, match="not valid TOML"):
        RuleSet.load(write_rules(tmp_path, "[[rules]\n"))
    with pytest.raises(RulesError, match="cannot read"):
        RuleSet.load(tmp_path / "nope.toml")
