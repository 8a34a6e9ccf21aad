"""Baseline: a plain confluent-kafka loop (``python -m fraudstream.loadtest.baseline_kafka``).

Consume in batches (``consumer.consume(500, timeout)``), decode each Avro transaction with
the project's codec, produce one small record per transaction (key: transaction_id, value:
the amount) to a scratch output topic, ``producer.poll(0)`` after each batch and one flush
at the end. No state, features, scoring, dedupe or offset commits: what a Python process on
librdkafka pays per event here before any of the worker's own work. The producer has the
worker's producer configuration (``fraudstream.streams.worker.delivery.KafkaSink``).

Prints one JSON line once ``--count`` records were consumed and produced: ``rate`` runs from
the first record consumed to the end of the final flush (every output record acknowledged,
as a decision must be before the worker's rate counts it); ``rate_until_produced`` stops at
the last produce() call, before the producer's queue is delivered.
"""

from __future__ import annotations

import argparse
import json
import time
import uuid

from confluent_kafka import OFFSET_BEGINNING, Consumer

from fraudstream.schemas.codec import Codecs, DecodeError, make_registry
from fraudstream.streams.settings import Settings
from fraudstream.streams.topics import assign_all, ensure_topics
from fraudstream.streams.worker.delivery import KafkaSink


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--topic", required=True, help="the transactions to read")
    parser.add_argument("--out-topic", required=True, help="scratch topic to write to")
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--timeout-s", type=float, default=0.02,
                        help="consume() timeout: a partial last batch waits this long")
    args = parser.parse_args()
    settings = Settings.from_env()
    c = settings.codec
    codecs = Codecs(make_registry(c.registry_url, c.registry_username, c.registry_password),
                    settings.topics)
    ensure_topics(settings, names=[args.out_topic])
    consumer = Consumer(settings.kafka.consumer_config(f"baseline-{uuid.uuid4().hex[:6]}"))
    assign_all(consumer, [args.topic], OFFSET_BEGINNING)
    producer = KafkaSink(settings.kafka.client_config()).producer
    # the producer's first send waits for metadata and its idempotent producer id: done
    # before the clock starts, as the worker's producer is ready before its first decision
    producer.produce(args.out_topic, key=b"warm-up", value=b"")
    if producer.flush(30):
        raise RuntimeError(f"could not produce to {args.out_topic}")
    decode = codecs.transaction.decode
    produce, poll = producer.produce, producer.poll
    out_topic = args.out_topic
    seen = errors = 0
    first = last = 0.0
    try:
        while seen < args.count:
            msgs = consumer.consume(args.batch, args.timeout_s)
            if not msgs:
                continue
            if not seen:
                first = time.perf_counter()
            for msg in msgs:
                if msg.error():
                    continue
                seen += 1
                try:
                    txn = decode(msg.value())
                except DecodeError:
                    errors += 1
                    continue
                value = b"%.2f" % txn["amount"]
                while True:
                    try:
                        produce(out_topic, key=txn["transaction_id"].encode(), value=value)
                        break
                    except BufferError:  # local queue full: serve callbacks and retry
                        poll(0.05)
            poll(0)
            last = time.perf_counter()
        left = producer.flush(60)
        flushed = time.perf_counter()
    finally:
        consumer.close()
    print(json.dumps({"events": seen, "decode_errors": errors, "unflushed": left,
                      "seconds": flushed - first, "rate": (seen - 1) / (flushed - first),
                      "seconds_until_produced": last - first,
                      "rate_until_produced": (seen - 1) / (last - first)}), flush=True)


if __name__ == "__main__":
    main()
