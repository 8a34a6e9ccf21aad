"""Peer: the same stateful job written with Quix Streams, the Python library a user would
pick instead of this service.

Run by ``python -m fraudstream.loadtest`` with the interpreter of the environment that holds
quixstreams (``make bench-deps``), by path and isolated (``python -I .../quix_peer.py``):
quixstreams pins confluent-kafka below the project's version, so the two cannot share one
environment, and this file imports nothing of the project.

The job, with Quix's defaults otherwise (at-least-once, 5 s commit interval, RocksDB state
with a changelog topic): read the pre-produced transactions from the start, decode each
with Quix's ``AvroDeserializer`` through the Schema Registry (the Confluent wire format the
project writes), keep per card (the record key) the count and the sum of amounts in a
RocksDB state store, and produce one JSON record per transaction (transaction_id, count,
sum) to a scratch topic.

Prints one JSON line: ``rate`` runs from the first record processed to the end of the
final checkpoint commit after the ``--count``-th (output and changelog flushed, offsets
committed; as the worker's rate counts only decisions the broker acknowledged);
``rate_until_processed`` stops when the last record was processed.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from typing import Any

import quixstreams
from quixstreams import Application, State
from quixstreams.models.serializers.avro import AvroDeserializer
from quixstreams.models.serializers.schema_registry import SchemaRegistryClientConfig


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--registry-url", required=True)
    parser.add_argument("--topic", required=True, help="the transactions to read")
    parser.add_argument("--out-topic", required=True, help="scratch topic to write to")
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--group", required=True, help="consumer group (a new one: from the start)")
    parser.add_argument("--state-dir", required=True)
    args = parser.parse_args()

    app = Application(broker_address=args.bootstrap, consumer_group=args.group,
                      auto_offset_reset="earliest", state_dir=args.state_dir,
                      loglevel="WARNING")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    transactions = app.topic(args.topic, value_deserializer=AvroDeserializer(
        schema_registry_client_config=SchemaRegistryClientConfig(url=args.registry_url)))
    out = app.topic(args.out_topic, value_serializer="json")
    seen = {"n": 0, "first": 0.0, "last": 0.0, "committed": 0.0}

    def per_card(txn: dict[str, Any], state: State) -> dict[str, Any]:
        if not seen["n"]:
            seen["first"] = time.perf_counter()
        count, total = state.get("card", (0, 0.0))
        count, total = count + 1, total + txn["amount"]
        state.set("card", (count, total))
        seen["n"] += 1
        if seen["n"] == args.count:
            seen["last"] = time.perf_counter()
            app.stop()  # the run loop ends with a forced checkpoint commit
        return {"transaction_id": txn["transaction_id"], "count": count, "sum": total}

    app.dataframe(transactions).apply(per_card, stateful=True).to_topic(out)

    # the end of the final commit: Application has no public hook for it, so the forced
    # commit of its processing context is wrapped (quixstreams is pinned; without the
    # attribute the clock stops when run() returns, shutdown included, and says so)
    ctx = getattr(app, "_processing_context", None)
    commit = getattr(ctx, "commit_checkpoint", None)
    if commit is not None:
        def commit_and_time(force: bool = False, revoking: bool = False) -> None:
            commit(force=force, revoking=revoking)
            if force and seen["last"] and not seen["committed"]:
                seen["committed"] = time.perf_counter()

        ctx.commit_checkpoint = commit_and_time  # type: ignore[union-attr]
    app.run()
    end = seen["committed"] or time.perf_counter()
    n, first = seen["n"], seen["first"]
    if n < args.count:
        raise SystemExit(f"stopped after {n} of {args.count} records")
    print(json.dumps({
        "events": n, "quixstreams": quixstreams.__version__,
        "until": "final commit" if seen["committed"] else "run() returned",
        "seconds": end - first, "rate": (n - 1) / (end - first),
        "seconds_until_processed": seen["last"] - first,
        "rate_until_processed": (n - 1) / (seen["last"] - first)}), flush=True)


if __name__ == "__main__":
    main()
