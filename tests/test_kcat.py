"""A client that is not ours reads the output: kcat (Debian) consumes ``decisions``; the
values are decoded with the schema published in the registry under the id they carry."""

from __future__ import annotations

import io
import json
import shutil
import struct
import subprocess
import urllib.request

import fastavro
import pytest

from fraudstream.schemas.codec import Codecs, make_registry
from fraudstream.streams.embedded.broker import EmbeddedBroker, free_ports
from fraudstream.streams.topics import ensure_topics
from fraudstream.streams.traffic.generator import TrafficGenerator
from fraudstream.streams.traffic.world import GeneratorConfig
from tests.apiversions_proxy import ApiVersionsProxy
from tests.conftest import T0_MS, WorkerProcess, consume_all, produce

pytestmark = pytest.mark.e2e


@pytest.fixture
def kcat_broker(tmp_path):
    """A broker reached through the ApiVersions proxy (see tests/apiversions_proxy.py)."""
    port, proxy_port = free_ports(2)
    proxy = ApiVersionsProxy(upstream_port=port, port=proxy_port).start()
    broker = EmbeddedBroker(port, log_path=tmp_path / "tansu.log", advertised_port=proxy_port)
    broker.start()
    yield broker
    broker.stop()
    proxy.stop()


def kcat_values(bootstrap: str, topic: str, count: int) -> list[bytes]:
    """Raw values via kcat: ``%R`` = 4-byte big-endian length, then ``%s`` the bytes."""
    out = subprocess.run(
        ["kcat", "-C", "-b", bootstrap, "-t", topic, "-o", "beginning", "-c", str(count),
         "-f", "%R%s", "-q"],
        capture_output=True, timeout=60, check=True,
    ).stdout
    values, pos = [], 0
    while pos < len(out):
        (size,) = struct.unpack(">i", out[pos:pos + 4])
        values.append(out[pos + 4:pos + 4 + size])
        pos += 4 + size
    return values


@pytest.mark.skipif(shutil.which("kcat") is None, reason="kcat not installed (make test-deps)")
def test_kcat_reads_decisions_decodable_with_the_published_schema(
    kcat_broker, registry, stack_settings, tmp_path
):
    settings = stack_settings.replace(kafka={"bootstrap": kcat_broker.bootstrap})
    ensure_topics(settings)
    codecs = Codecs(make_registry(registry.url), settings.topics)
    gen = TrafficGenerator(GeneratorConfig(seed=11))
    now = T0_MS
    txns = [gen.next_transaction(now + i) for i in range(300)]
    worker = WorkerProcess(settings, tmp_path / "worker.log").start()
    try:
        produce(settings, settings.topics.transactions,
                [(t["card_id"].encode(), codecs.transaction.encode(t)) for t in txns])
        consume_all(settings, settings.topics.decisions, len(txns), settle_s=0)
        values = kcat_values(kcat_broker.bootstrap, settings.topics.decisions, len(txns))
    finally:
        worker.stop()

    assert len(values) == len(txns)
    decoded = []
    schemas: dict[int, object] = {}
    for value in values:
        assert value[0] == 0, "Confluent wire format: magic byte 0"
        (schema_id,) = struct.unpack(">I", value[1:5])
        if schema_id not in schemas:
            with urllib.request.urlopen(f"{registry.url}/schemas/ids/{schema_id}") as resp:
                published = json.loads(json.load(resp)["schema"])
            assert published["name"] == "Decision"
            schemas[schema_id] = fastavro.parse_schema(published)
        decoded.append(fastavro.schemaless_reader(io.BytesIO(value[5:]), schemas[schema_id]))
    assert {d["transaction_id"] for d in decoded} == {t["transaction_id"] for t in txns}
    assert all(d["decision"] in ("approve", "review", "decline") for d in decoded)
