"""The embedded Schema Registry: the subset of the Confluent Schema Registry REST API that
producers, the worker and Avro-aware tools (kcat ``-s avro``) use, kept in memory.

Like the embedded broker it exists for the demo and the tests, so that separate processes
share schema ids over a real HTTP API. Production points ``FRAUDSTREAM_CODEC_REGISTRY_URL``
at the team's own registry (Confluent Schema Registry, Karapace, Apicurio in ccompat mode).

Endpoints: ``POST /subjects/{subject}/versions``, ``POST /subjects/{subject}`` (lookup),
``GET /schemas/ids/{id}``, ``GET /subjects``, ``GET /subjects/{subject}/versions``,
``GET /subjects/{subject}/versions/{version|latest}``. No compatibility checks.
"""

from __future__ import annotations

import json
import re
import signal
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote, urlsplit

_CONTENT = "application/vnd.schemaregistry.v1+json"


class _Store:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.ids: dict[str, int] = {}  # canonical schema text -> id
        self.schemas: dict[int, tuple[str, str]] = {}  # id -> (schema text, type)
        self.subjects: dict[str, list[int]] = {}  # subject -> ids by version

    def register(self, subject: str, text: str, kind: str) -> int:
        canon = json.dumps(json.loads(text), sort_keys=True, separators=(",", ":"))
        with self.lock:
            schema_id = self.ids.get(canon)
            if schema_id is None:
                schema_id = self.ids[canon] = len(self.ids) + 1
                self.schemas[schema_id] = (text, kind)
            versions = self.subjects.setdefault(subject, [])
            if schema_id not in versions:
                versions.append(schema_id)
            return schema_id

    def lookup(self, subject: str, text: str) -> tuple[int, int] | None:
        canon = json.dumps(json.loads(text), sort_keys=True, separators=(",", ":"))
        with self.lock:
            schema_id = self.ids.get(canon)
            versions = self.subjects.get(subject, [])
            if schema_id is None or schema_id not in versions:
                return None
            return schema_id, versions.index(schema_id) + 1


class _Handler(BaseHTTPRequestHandler):
    store: _Store
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt: str, *args: Any) -> None:  # quiet
        pass

    def _send(self, status: int, body: Any) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", _CONTENT)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _not_found(self, code: int, message: str) -> None:
        self._send(404, {"error_code": code, "message": message})

    def _body(self) -> dict[str, Any]:
        length = int(self.headers.get("Content-Length") or 0)
        return json.loads(self.rfile.read(length) or b"{}")

    def do_POST(self) -> None:  # noqa: N802
        path = urlsplit(self.path).path
        m = re.fullmatch(r"/subjects/([^/]+)(/versions)?", path)
        if not m:
            return self._not_found(404, "not found")
        subject = unquote(m.group(1))
        try:
            body = self._body()
            text, kind = body["schema"], body.get("schemaType", "AVRO")
            json.loads(text)
        except (ValueError, KeyError):
            return self._send(422, {"error_code": 42201, "message": "Invalid schema"})
        if m.group(2):
            return self._send(200, {"id": self.store.register(subject, text, kind)})
        found = self.store.lookup(subject, text)
        if found is None:
            return self._not_found(40403, "Schema not found")
        schema_id, version = found
        return self._send(
            200, {"subject": subject, "id": schema_id, "version": version, "schema": text}
        )

    def do_GET(self) -> None:  # noqa: N802
        path = urlsplit(self.path).path
        store = self.store
        if m := re.fullmatch(r"/schemas/ids/(\d+)", path):
            found = store.schemas.get(int(m.group(1)))
            if found is None:
                return self._not_found(40403, "Schema not found")
            return self._send(200, {"schema": found[0], "schemaType": found[1]})
        if path == "/subjects":
            return self._send(200, sorted(store.subjects))
        if m := re.fullmatch(r"/subjects/([^/]+)/versions(?:/(\w+))?", path):
            subject = unquote(m.group(1))
            versions = store.subjects.get(subject)
            if not versions:
                return self._not_found(40401, "Subject not found")
            if m.group(2) is None:
                return self._send(200, list(range(1, len(versions) + 1)))
            want = len(versions) if m.group(2) in ("latest", "-1") else int(m.group(2))
            if not 1 <= want <= len(versions):
                return self._not_found(40402, "Version not found")
            schema_id = versions[want - 1]
            text, kind = store.schemas[schema_id]
            return self._send(
                200,
                {"subject": subject, "version": want, "id": schema_id, "schema": text,
                 "schemaType": kind},
            )
        return self._not_found(404, "not found")


class EmbeddedRegistry:
    """An in-memory Schema Registry on a loopback port, served from a thread."""

    def __init__(self, port: int = 0, host: str = "127.0.0.1") -> None:
        handler = type("Handler", (_Handler,), {"store": _Store()})
        self.server = ThreadingHTTPServer((host, port), handler)
        self.server.daemon_threads = True
        self.url = f"http://{host}:{self.server.server_address[1]}"
        self._thread: threading.Thread | None = None

    def start(self) -> EmbeddedRegistry:
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> EmbeddedRegistry:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def run_forever(port: int) -> int:
    """``fraudstream registry``: serve until SIGINT/SIGTERM."""
    registry = EmbeddedRegistry(port)
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=registry.stop).start())
    print(f"embedded schema registry (in memory) on {registry.url}", flush=True)
    try:
        registry.server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        registry.server.server_close()
    print("embedded schema registry stopped", flush=True)
    return 0
