"""Fixtures on real parts: the embedded broker (Tansu) and Schema Registry, started once per
session; workers run as real ``fraudstream worker`` processes; redis-server (the Redis
feature backend) runs as a real process too."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer

from fraudstream.schemas.codec import Codecs, make_registry
from fraudstream.streams.embedded.broker import EmbeddedBroker, free_port
from fraudstream.streams.embedded.registry import EmbeddedRegistry
from fraudstream.streams.processes import die_with_parent, stop_process
from fraudstream.streams.settings import Settings, TopicSettings
from fraudstream.streams.topics import assign_all, ensure_topics

ROOT = Path(__file__).resolve().parent.parent

#: The one base instant of the tests' data: 2026-01-05T00:00:00Z (a Monday, midnight UTC).
#: Event and label times in tests are this plus or minus offsets, never the wall clock,
#: so generated traffic (``TrafficGenerator`` picks cards by the hour of its ``now_ms``),
#: features and decisions are the same on any day, at any hour, in any time zone. It must
#: stay in the past of every date the suite runs at: the worker sends an event_time more
#: than ``FRAUDSTREAM_WORKER_MAX_FUTURE_MS`` ahead of its wall clock to the DLQ (the
#: worker's state expiry follows event time, so data this old is still current for it).
#: What still reads the wall clock in tests is time itself, not data: deadlines
#: (``time.monotonic``), Kafka record timestamps, decided_at.
T0_MS = 1_767_571_200_000
DAY_MS = 86_400_000


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedBroker]:
    log = tmp_path_factory.mktemp("broker") / "tansu.log"
    with EmbeddedBroker(log_path=log) as b:
        yield b


@pytest.fixture(scope="session")
def registry() -> Iterator[EmbeddedRegistry]:
    with EmbeddedRegistry() as r:
        yield r


@pytest.fixture
def stack_settings(broker: EmbeddedBroker, registry: EmbeddedRegistry, tmp_path: Path) -> Settings:
    """Settings for one test: its own topics and consumer group on the shared broker."""
    uid = uuid.uuid4().hex[:8]
    topics = TopicSettings.suffixed(uid)
    settings = Settings(topics=topics).replace(
        kafka={"bootstrap": broker.bootstrap, "session_timeout_ms": 6000, "partitions": 3,
               "embedded": True},
        codec={"registry_url": registry.url},
        worker={"app_id": f"fraudstream-{uid}", "data_dir": tmp_path / "state",
                "commit_interval_s": 0.5, "metrics_port": 0},
        # not the checkout's models/ folder: a test decides with a model only by choice
        scoring={"models_dir": tmp_path / "no-models"},
    )
    ensure_topics(settings)
    return settings


@pytest.fixture
def codecs(stack_settings: Settings) -> Codecs:
    return Codecs(make_registry(stack_settings.codec.registry_url), stack_settings.topics)


class WorkerProcess:
    """A real ``fraudstream worker`` process."""

    def __init__(self, settings: Settings, log: Path) -> None:
        self.settings = settings
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> WorkerProcess:
        env = {k: v for k, v in os.environ.items() if not k.startswith("FRAUDSTREAM_")}
        env.update(self.settings.to_env())
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "fraudstream", "worker", "--loglevel", "info"],
                env=env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
                start_new_session=True, preexec_fn=die_with_parent,
            )
        return self

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> int | None:
        """SIGTERM (SIGKILL after 30 s); the exit code."""
        stop_process(self.proc, 30.0)
        return self.proc.returncode if self.proc else None

    def tail(self, lines: int = 40) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


@pytest.fixture
def start_worker(
    stack_settings: Settings, tmp_path: Path
) -> Iterator[Callable[..., WorkerProcess]]:
    started: list[WorkerProcess] = []

    def _start(settings: Settings | None = None) -> WorkerProcess:
        w = WorkerProcess(settings or stack_settings, tmp_path / f"worker-{len(started)}.log")
        started.append(w.start())
        return w

    yield _start
    for w in started:
        w.stop()


def produce(
    settings: Settings, topic: str, records: list[tuple[bytes | None, bytes]],
    compression: str = "none",
) -> None:
    producer = Producer({**settings.kafka.client_config(), "linger.ms": 5,
                         "compression.type": compression})
    for key, value in records:
        producer.produce(topic, key=key, value=value)
    assert producer.flush(30) == 0


def consume_all(
    settings: Settings, topic: str, expected: int, timeout_s: float = 60.0,
    settle_s: float = 1.0, keys: set[bytes] | None = None,
) -> list[Any]:
    """Every record of ``topic`` from the beginning: waits until ``expected`` arrived
    (with ``keys``: until every one of these keys arrived, however many repeats came
    first), then ``settle_s`` more to catch extras (duplicates must be visible)."""
    consumer = Consumer(settings.kafka.consumer_config("tests-reader"))
    assign_all(consumer, [topic], OFFSET_BEGINNING)
    out: list[Any] = []
    missing = set(keys) if keys is not None else set()
    deadline = time.monotonic() + timeout_s
    settle_until: float | None = None
    try:
        while time.monotonic() < deadline:
            for msg in consumer.consume(1000, 0.2):
                if not msg.error():
                    out.append(msg)
                    missing.discard(msg.key())
            if len(out) >= expected and not missing:
                settle_until = settle_until or time.monotonic() + settle_s
                if time.monotonic() >= settle_until:
                    break
    finally:
        consumer.close()
    return out


def expired_in_log(worker: WorkerProcess, what: str) -> int:
    """Entries the worker's ``what`` expiry ("dedupe", "features") logged as deleted, over
    all its runs so far (one run may catch only part of a batch's partitions)."""
    text = worker.log.read_text(errors="replace") if worker.log.exists() else ""
    return sum(int(n) for n in re.findall(rf"{what}: expired (\d+) ", text))


class RedisServer:
    """A real ``redis-server`` on a loopback port, no persistence. :meth:`stop` and
    :meth:`start` again on the same port simulate an outage and a recovery."""

    def __init__(self, port: int, log: Path) -> None:
        self.port = port
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 10.0) -> RedisServer:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server missing: `make test-deps` (apt-get install redis-server)")
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                 "--appendonly", "no", "--daemonize", "no"],
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                preexec_fn=die_with_parent,
            )
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=0.5,
                             socket_connect_timeout=0.5)
        deadline = time.monotonic() + timeout_s
        try:
            while True:
                if self.proc.poll() is not None:
                    pytest.fail(f"redis-server exited ({self.proc.returncode}): {self.tail()}")
                try:
                    if client.ping():
                        return self
                except (redis.exceptions.RedisError, OSError):
                    if time.monotonic() > deadline:
                        self.stop()
                        pytest.fail(f"redis-server not answering PING: {self.tail()}")
                    time.sleep(0.02)
        finally:
            client.close()

    def stop(self) -> None:
        stop_process(self.proc, 10.0)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def tail(self, lines: int = 20) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One redis-server for the session (tests keep apart by key prefix)."""
    server = RedisServer(free_port(), tmp_path_factory.mktemp("redis") / "redis.log").start()
    yield server
    server.stop()


@pytest.fixture
def start_redis(tmp_path: Path) -> Iterator[Callable[..., RedisServer]]:
    """Start a separate redis-server (default: a free port) that the test may stop and
    start again; every one still running is stopped at the end of the test."""
    started: list[RedisServer] = []

    def _start(port: int | None = None) -> RedisServer:
        server = RedisServer(port or free_port(), tmp_path / f"redis-{len(started)}.log")
        started.append(server.start())
        return server

    yield _start
    for server in started:
        server.stop()


def _events(seed: int, days: float, per_day: int) -> list[tuple[str, dict]]:
    from fraudstream.streams.traffic.generator import arrival_events, generate_history
    from fraudstream.streams.traffic.world import GeneratorConfig

    txns, labels = generate_history(
        GeneratorConfig(seed=seed, n_cards=400, label_delay_days=0.5,
                        label_delay_spread_days=0.2, id_prefix=f"c{seed}"),
        T0_MS - int((days + 1) * DAY_MS), days, per_day)
    return arrival_events(txns, labels)


@pytest.fixture(scope="session")
def models_registry(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Two trained versions (different seeds) in a model registry folder."""
    from fraudstream.schemas.fx import Rates
    from fraudstream.scorers import train as T
    from fraudstream.scorers.registry import Registry
    from fraudstream.scorers.rules import RuleSet, RulesScorer

    root = tmp_path_factory.mktemp("models")
    for seed in (5, 6):  # _events converts amounts with the shipped rates table
        T.train(_events(seed, 8.0, 2500), root,
                T.TrainConfig(trees=40, seed=seed, rates=Rates.load()),
                f"{seed:02d}" * 32, RulesScorer(RuleSet.default()))
        time.sleep(1.0)  # versions are named by the second
    return Registry(root)
