"""/healthz and /readyz beside /metrics, on one port per process.

``GET /healthz`` (liveness) and ``GET /readyz`` (readiness) answer 200 with ``ok`` or 503
with one line per failing check (``name: why``), so a probe's log says what is wrong.
Every check is a function run in the HTTP server's thread, never on the event loop: a
process whose event loop is blocked still answers, and answers 503.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

#: A check returns None when it passes, else why it fails (one line).
Check = Callable[[], str | None]


class Probes:
    """Named liveness and readiness checks."""

    def __init__(self) -> None:
        self.live: list[tuple[str, Check]] = []
        self.ready: list[tuple[str, Check]] = []

    @staticmethod
    def run(checks: Iterable[tuple[str, Check]]) -> list[str]:
        failed = []
        for name, check in checks:
            try:
                why = check()
            except Exception as exc:  # a check that breaks fails, it does not crash
                why = f"check failed: {type(exc).__name__}: {exc}"
            if why is not None:
                failed.append(f"{name}: {why}")
        return failed


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _Server6(_Server):
    address_family = socket.AF_INET6


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base's name
        """Probes come every few seconds: no access log."""


def serve(registry: Any, port: int, address: str = "0.0.0.0",
          probes: Probes | None = None) -> int:
    """Serve /metrics from ``registry``, and /healthz and /readyz from ``probes`` (200
    when every check passes; without probes both are 200 while the process serves), on
    ``address``:``port`` (0: a free port) in a daemon thread; returns the port. Raises
    OSError when the port is taken or the address is not this host's."""
    from prometheus_client import make_wsgi_app

    metrics = make_wsgi_app(registry)
    probes = probes or Probes()

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        path = environ.get("PATH_INFO", "")
        if path in ("/healthz", "/readyz"):
            failed = Probes.run(probes.live if path == "/healthz" else probes.ready)
            body = ("\n".join(failed) if failed else "ok").encode() + b"\n"
            start_response("503 Service Unavailable" if failed else "200 OK",
                           [("Content-Type", "text/plain; charset=utf-8"),
                            ("Content-Length", str(len(body)))])
            return [body]
        return metrics(environ, start_response)

    server_class = _Server6 if ":" in address else _Server
    server = make_server(address, port, app, server_class=server_class,
                         handler_class=_QuietHandler)
    threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
    return int(server.server_port)
