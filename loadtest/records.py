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
- ``read``: decode then validate, the worker's whole cost of reading a record.
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

    assert all(fastavro_decode(r) == d for r, d in zip(records, decoded, strict=True))
    costs = {
        "decode": _median_us(codec.decode, records, rounds),
        "fastavro": _median_us(fastavro_decode, records, rounds),
        "validate": _median_us(validate, decoded, rounds),
        "read": _median_us(read, records, rounds),
    }
    return {"records": len(records), "rounds": rounds, "us_per_record": costs,
            "decode_vs_fastavro": costs["decode"] / costs["fastavro"]}


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
          f"decode+validate {c['read']:.2f}", file=sys.stderr)
    write_result(args.out, "records", r)
    return 0


if __name__ == "__main__":
    sys.exit(main())
