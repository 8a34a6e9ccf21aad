"""What every part of ``python -m fraudstream.loadtest`` shares: the settings of a run on a fresh
embedded stack, starting a project process with them, progress lines on stderr, producing
generated transactions, and reading the decisions topic from its start."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer

from fraudstream.schemas.codec import Codecs, make_registry
from fraudstream.streams.embedded.broker import EmbeddedBroker
from fraudstream.streams.embedded.registry import EmbeddedRegistry
from fraudstream.streams.processes import die_with_parent
from fraudstream.streams.settings import Settings, TopicSettings
from fraudstream.streams.topics import assign_all, ensure_topics
from fraudstream.streams.traffic.generator import TrafficGenerator
from fraudstream.streams.traffic.world import GeneratorConfig

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Stack:
    """A run's settings on a fresh embedded stack; ``uid`` is the suffix of its topic names
    and of its worker's app id."""

    uid: str
    settings: Settings
    codecs: Codecs


def fresh_stack(broker: EmbeddedBroker, registry: EmbeddedRegistry, workdir: Path, app: str,
                partitions: int = 4, **sections: Mapping[str, Any]) -> Stack:
    """Settings for a run on a new embedded broker and registry: topics of its own
    (``TopicSettings.suffixed``), a worker app id ``<app>-<uid>`` with its state under
    ``workdir/state-<uid>``, a 6 s group session timeout, and ``sections`` (a
    :meth:`Settings.replace` mapping) over those. Creates the topics; the codecs use the
    registry."""
    uid = uuid.uuid4().hex[:6]
    extra = dict(sections)
    settings = Settings(topics=TopicSettings.suffixed(uid)).replace(
        kafka={"bootstrap": broker.bootstrap, "session_timeout_ms": 6000,
               "partitions": partitions, "embedded": True, **extra.pop("kafka", {})},
        codec={"registry_url": registry.url, **extra.pop("codec", {})},
        worker={"app_id": f"{app}-{uid}", "data_dir": workdir / f"state-{uid}",
                **extra.pop("worker", {})},
        **extra)
    ensure_topics(settings)
    return Stack(uid, settings, Codecs(make_registry(registry.url), settings.topics))


def _spawn(args: list[str], settings: Settings, log: Path,
           python: str = sys.executable) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FRAUDSTREAM_")}
    env.update(settings.to_env())
    with open(log, "ab") as out:
        return subprocess.Popen([python, *args], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=out, start_new_session=True, preexec_fn=die_with_parent)


def write_result(out: Path, name: str, result: Any, printed: Any = None) -> Path:
    """``<out>/<name>-<time>.json`` with ``result``; prints ``printed`` (default: the
    result) as one JSON line on stdout and the file's path on stderr."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(result, indent=2, default=str))
    print(json.dumps(result if printed is None else printed, default=str))
    print(f"written to {path}", file=sys.stderr)
    return path


def _progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def pre_produce(settings: Settings, codecs: Codecs, n: int, seed: int) -> None:
    gen = TrafficGenerator(GeneratorConfig(seed=seed, id_prefix=f"b{uuid.uuid4().hex[:6]}"))
    producer = Producer({**settings.kafka.client_config(), "linger.ms": 20})
    now = int(time.time() * 1000)
    topic = settings.topics.transactions
    for i in range(n):
        txn = gen.next_transaction(now + i // 50)
        while True:
            try:
                producer.produce(topic, key=txn["card_id"].encode(),
                                 value=codecs.transaction.encode(txn))
                break
            except BufferError:
                producer.poll(0.05)
    assert producer.flush(60) == 0


def read_decisions(settings: Settings, codecs: Codecs, stop: Callable[[list], bool],
                   timeout_s: float) -> list[tuple[float, dict]]:
    """(receive time, decision) from the start of ``decisions`` until ``stop(received)``
    says so or the timeout."""
    consumer = Consumer(settings.kafka.consumer_config(f"bench-{uuid.uuid4().hex[:6]}"))
    assign_all(consumer, [settings.topics.decisions], OFFSET_BEGINNING)
    out: list[tuple[float, dict]] = []
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline and not stop(out):
            # consume() waits for its whole count or the timeout: a short timeout keeps
            # this reader from adding latency of its own
            for msg in consumer.consume(1000, 0.005):
                if not msg.error():
                    out.append((time.time(), codecs.decision.decode(msg.value())))
    finally:
        consumer.close()
    return out

