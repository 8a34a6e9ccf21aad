"""Baseline: a Faust agent that only consumes (``python -m fraudstream.loadtest.bare_faust``).

Same broker, same fetch wait and batching as the worker, no work per event. Prints one
JSON line when ``--count`` events have arrived: the rate from the first to the last.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time

import faust

from fraudstream.streams.settings import Settings
from fraudstream.streams.worker.app import _set_fetch_max_wait


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--topic", required=True)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--app-id", required=True)
    parser.add_argument("--data-dir", default=None,
                        help="Faust's data directory (default: <app-id>-data in the cwd)")
    args = parser.parse_args()
    settings = Settings.from_env()
    _set_fetch_max_wait(settings.kafka.fetch_max_wait_ms)
    app = faust.App(
        args.app_id,
        broker=f"kafka://{settings.kafka.bootstrap}",
        broker_session_timeout=settings.kafka.session_timeout_ms / 1000.0,
        consumer_auto_offset_reset="earliest",
        web_enabled=False,
        topic_partitions=settings.kafka.partitions,
        **({"datadir": args.data_dir} if args.data_dir else {}),
    )
    topic = app.topic(args.topic, value_type=bytes, value_serializer="raw")
    seen = {"n": 0, "first": 0.0}

    @app.agent(topic)
    async def consume(stream):  # type: ignore[no-untyped-def]
        async for _value in stream:
            if seen["n"] == 0:
                seen["first"] = time.perf_counter()
            seen["n"] += 1
            if seen["n"] == args.count:
                elapsed = time.perf_counter() - seen["first"]
                print(json.dumps({"events": seen["n"], "seconds": elapsed,
                                  "rate": (seen["n"] - 1) / elapsed}), flush=True)
                sys.stdout.flush()  # the benchmark stops this process once it read the line

    logging.getLogger("httpx").setLevel(logging.WARNING)
    worker = faust.Worker(app, loglevel="warning", quiet=True, redirect_stdouts=False)
    worker.execute_from_commandline()


if __name__ == "__main__":
    main()
