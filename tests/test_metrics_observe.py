"""A batch's decision latencies go into the histogram in one update, with the same
buckets and sum as observing them one by one (what Grafana's quantiles read)."""

from __future__ import annotations

import random

from prometheus_client import CollectorRegistry, Histogram

from fraudstream.streams.worker.metrics import LATENCY_BUCKETS, observe_many


def _samples(h: Histogram) -> dict[tuple[str, str], float]:
    return {(s.name, s.labels.get("le", "")): s.value
            for metric in h.collect() for s in metric.samples if not s.name.endswith("_created")}


def test_observe_many_counts_every_value_in_the_bucket_observe_would():
    rng = random.Random(7)
    values = [rng.uniform(0.0, 3.0) for _ in range(500)]
    values += [0.0, *LATENCY_BUCKETS, 1e9]  # on the bounds: le is inclusive
    one = Histogram("one", "", buckets=LATENCY_BUCKETS, registry=CollectorRegistry())
    many = Histogram("many", "", buckets=LATENCY_BUCKETS, registry=CollectorRegistry())
    for v in values:
        one.observe(v)
    observe_many(many, values[:100])
    observe_many(many, values[100:])
    observe_many(many, [])
    a = {(n.replace("one", "h"), le): v for (n, le), v in _samples(one).items()}
    b = {(n.replace("many", "h"), le): v for (n, le), v in _samples(many).items()}
    assert a.keys() == b.keys()
    for key in a:
        assert abs(a[key] - b[key]) < 1e-6, key
    assert b[("h_count", "")] == len(values)
    assert b[("h_bucket", "+Inf")] == len(values)
