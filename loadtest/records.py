"""``python -m fraudstream.loadtest.records``: what reading one transaction record costs,
decode and validation apart.

Generated transactions (the project's generator, ``--n`` of them over 2,000 cards) are
encoded once as the producer writes them (Confluent wire format, ``transaction.avsc``).
Then, per record, medians over ``--rounds`` passes over all of them:

- ``decode``: ``Codecs.transaction.decode``, as the worker calls it;
- ``fastavro``: the same bytes read by ``fastavro.schemaless_reader`` alone (what the
  codec's decode did before it read the project's own schema by hand), for a ratio in
  the same run;
- ``validate``: ``validate_transaction`` on the decoded dicts;
- ``read``: decode then validate, the long way of reading a record (the worker's for a
  record out of the ordinary);
- ``one_pass``: the same records read and validated in one pass
  (``schemas/transaction_fast.py``), as the worker reads the common record; the run checks
  that it gives what ``read`` gives for every record;
- ``encode``: ``Codecs.decision.encode`` of each transaction's decision as the pipeline
  builds it (a model decision with three reason codes; the stage times and
  ``decided_at`` shared by a batch of 500), and ``fastavro_encode``, the same records
  written by ``fastavro.schemaless_writer`` alone, for a ratio in the same run;
  ``encode_with_dicts``: the record's dicts built as well (its common fields, then merged
  with the verdict), and ``encode_from_parts``: ``DecisionWriter.encode_decided`` from the
  transaction and the verdict, as the worker writes a decision now.
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import fastavro

from fraudstream.loadtest.harness import write_result
from fraudstream.schemas.codec import Codecs, make_registry, parsed_schema
from fraudstream.schemas.fx import Rates
from fraudstream.schemas.validate import validate_transaction
from fraudstream.streams.settings import TopicSettings
from fraudstream.streams.traffic.generator import DAY_MS, GeneratorConfig, generate_history

ROOT = Path(__file__).resolve().parent.parent
#: A fixed start: the same records on every run, whatever the date.
START_MS = 1_790_000_000_000
NOW_MS = START_MS + 30 * DAY_MS


def _median_us(fn: Callable[[Any], Any], items: list[Any], rounds: int) -> float:
    samples = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for item in items:
            fn(item)
        samples.append((time.perf_counter() - t0) / len(items) * 1e6)
    return statistics.median(samples)


def run(n: int, rounds: int) -> dict[str, Any]:
    codec = Codecs(make_registry("mock://loadtest-records"), TopicSettings()).transaction
    per_day = 20_000
    txns, _labels = generate_history(GeneratorConfig(seed=3, n_cards=2000, id_prefix="rb"),
                                     START_MS, n / per_day + 0.05, per_day)
    records = [codec.encode(t) for t in txns[:n]]
    decoded = [codec.decode(r) for r in records]
    rates = Rates.load()
    schema = parsed_schema("transaction")

    def fastavro_decode(data: bytes) -> Any:
        return fastavro.schemaless_reader(io.BytesIO(data[5:]), schema, None)

    def validate(rec: dict[str, Any]) -> dict[str, Any]:
        return validate_transaction(rec, NOW_MS, 300_000, 1e6, rates=rates)

    def read(data: bytes) -> dict[str, Any]:
        return validate(codec.decode(data))

    _header, checked = codec.checked_reader() or (b"", None)
    assert checked is not None

    def one_pass(data: bytes) -> dict[str, Any] | None:
        return checked(data, 5, NOW_MS + 300_000, 1e6, rates)

    assert all(one_pass(r) == read(r) for r in records)

    assert all(fastavro_decode(r) == d for r, d in zip(records, decoded, strict=True))
    decision_codec = Codecs(make_registry("mock://loadtest-records-out"),
                            TopicSettings()).decision
    decisions = _decisions([validate(d) for d in decoded])
    decision_schema = parsed_schema("decision")

    def fastavro_encode(d: dict[str, Any]) -> bytes:
        out = io.BytesIO()
        fastavro.schemaless_writer(out, decision_schema, d)
        return out.getvalue()

    assert all(decision_codec.encode(d)[5:] == fastavro_encode(d) for d in decisions[:1000])
    writer = decision_codec.writer
    assert writer is not None
    parts = [(d, {k: d[k] for k in ("decision", "score", "model_version", "stage",
                                    "fallback")}) for d in decisions]

    def with_dicts(part: tuple[dict[str, Any], dict[str, Any]]) -> bytes:
        d, verdict = part
        common = {"transaction_id": d["transaction_id"], "card_id": d["card_id"],
                  "timings_ms": d["timings_ms"], "late_ms": d["late_ms"],
                  "event_time": d["event_time"], "source_timestamp": d["source_timestamp"],
                  "decided_at": d["decided_at"], "amount": d["amount"],
                  "currency": d["currency"], "amount_ref": d["amount_ref"],
                  "rules_version": d["rules_version"], "rates_version": d["rates_version"]}
        return decision_codec.encode({**common, **verdict, "reasons": d["reasons"]})

    def from_parts(part: tuple[dict[str, Any], dict[str, Any]]) -> bytes:
        d, verdict = part
        return writer.encode_decided(d, verdict, d["reasons"], d["source_timestamp"],
                                     d["amount_ref"], d["timings_ms"], d["late_ms"],
                                     d["decided_at"], d["rules_version"], d["rates_version"])

    assert all(with_dicts(x) == from_parts(x) for x in parts)
    costs = {
        "decode": _median_us(codec.decode, records, rounds),
        "fastavro": _median_us(fastavro_decode, records, rounds),
        "validate": _median_us(validate, decoded, rounds),
        "read": _median_us(read, records, rounds),
        "one_pass": _median_us(one_pass, records, rounds),
        "encode": _median_us(decision_codec.encode, decisions, rounds),
        "fastavro_encode": _median_us(fastavro_encode, decisions, rounds),
        "encode_with_dicts": _median_us(with_dicts, parts, rounds),
        "encode_from_parts": _median_us(from_parts, parts, rounds),
    }
    return {"records": len(records), "rounds": rounds, "us_per_record": costs,
            "decode_vs_fastavro": costs["decode"] / costs["fastavro"],
            "one_pass_vs_read": costs["one_pass"] / costs["read"],
            "encode_vs_fastavro": costs["encode"] / costs["fastavro_encode"]}


def _decisions(txns: list[dict[str, Any]], batch: int = 500) -> list[dict[str, Any]]:
    """Each transaction's decision record as the pipeline builds it, a batch's decisions
    sharing their stage times and ``decided_at``."""
    reasons = ("card_count_1h", "amount_z_card_30d", "merchant_fraud_rate_7d", "ip_cards_24h")
    out = []
    for start in range(0, len(txns), batch):
        timings = {"decode": 1.5, "dedupe": 0.2, "features": 6.0, "rules": 0.8,
                   "model": 4.0, "total": 13.0 + start % 7}
        decided_at = NOW_MS + start
        for i, txn in enumerate(txns[start:start + batch]):
            common = {"transaction_id": txn["transaction_id"], "card_id": txn["card_id"],
                      "timings_ms": timings, "late_ms": 0.0, "event_time": txn["event_time"],
                      "source_timestamp": txn["event_time"] + 40, "decided_at": decided_at,
                      "amount": txn["amount"], "currency": txn["currency"],
                      "amount_ref": round(txn["amount_ref"], 4), "rules_version": "2026.12.1",
                      "rates_version": "2026-12-01"}
            verdict = {"decision": "approve", "score": (i % 97) / 97.0,
                       "reasons": list(reasons[i % 2:i % 2 + 3]),
                       "model_version": "v20261204-065412-05050505", "stage": "model",
                       "fallback": False}
            out.append({**common, **verdict})
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fraudstream.loadtest.records",
                                description=__doc__.split("\n")[0].replace("``", ""))
    p.add_argument("--n", type=int, default=20_000, help="transactions")
    p.add_argument("--rounds", type=int, default=7, help="timed passes over all of them")
    p.add_argument("--out", type=Path, default=ROOT / "results")
    args = p.parse_args(argv)
    r = run(args.n, args.rounds)
    c = r["us_per_record"]
    print(f"{r['records']:,} transactions, median of {r['rounds']} passes, us per record: "
          f"decode {c['decode']:.2f} (fastavro alone {c['fastavro']:.2f}, ratio "
          f"{r['decode_vs_fastavro']:.2f})  validate {c['validate']:.2f}  "
          f"decode+validate {c['read']:.2f}  one pass {c['one_pass']:.2f} (ratio "
          f"{r['one_pass_vs_read']:.2f})  decision encode {c['encode']:.2f} (fastavro "
          f"alone {c['fastavro_encode']:.2f}, ratio {r['encode_vs_fastavro']:.2f})  "
          f"with its dicts built {c['encode_with_dicts']:.2f}, from its parts "
          f"{c['encode_from_parts']:.2f}",
          file=sys.stderr)
    write_result(args.out, "records", r)
    return 0


if __name__ == "__main__":
    sys.exit(main())
