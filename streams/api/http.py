"""The HTTP face of ``fraudstream api`` (FastAPI): authentication, input checks, status
codes, metrics; the decision itself comes from :mod:`fraudstream.streams.api.service`.

``POST /v1/decisions`` takes one transaction as a JSON object, with the fields of the
``transactions`` topic, and answers with the decision. Statuses:

- 200: the decision. ``X-Fraudstream-Decision-Source`` says ``stream`` (the record the
  worker published on ``decisions``: its sha256 and partition:offset are in
  ``X-Fraudstream-Decision-Sha256`` and ``-Offset``) or ``standin`` (the rules without
  velocity features, ``fallback`` true and ``fallback:timeout`` among the reasons: no
  streamed decision came in time). ``X-Fraudstream-Replayed: true`` on a retry answered
  with the first answer. ``Server-Timing`` gives produce and decision times.
- 400: the body is not a JSON object, or the timeout header is not a number in range;
  422: a field is missing or wrong, in the words of the dead-letter reasons
  (``{"error": "validation", "field": ..., "reason": ...}``), card numbers masked;
- 401: no bearer token, or not one of those in force (``WWW-Authenticate``; the tokens
  file is read again when it changes: :mod:`fraudstream.streams.api.auth`);
- 429: too many requests in flight; 503: the broker did not take the transaction in time.
  Both with ``Retry-After``.

The caller's deadline is the header ``X-Fraudstream-Timeout-Ms`` (default
``FRAUDSTREAM_API_TIMEOUT_MS``), counted from the request's arrival.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from typing import Any

import orjson
from fastapi import FastAPI, Request, Response
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from fraudstream.schemas.codec import parsed_schema
from fraudstream.schemas.fx import Rates
from fraudstream.schemas.validate import (
    PAN_REASON,
    ValidationError,
    contains_pan,
    mask_pans,
    validate_transaction,
)
from fraudstream.streams.api.auth import BearerTokens
from fraudstream.streams.api.service import Answer, DecisionService, Overloaded, Unavailable
from fraudstream.streams.settings import Settings

log = logging.getLogger("fraudstream.api")

TIMEOUT_HEADER = "x-fraudstream-timeout-ms"
_FIELDS = [f["name"] for f in parsed_schema("transaction")["fields"]]
_LATENCY_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0,
                    2.5, 5.0, 10.0)


class ApiMetrics:
    """``fraudstream_api_*``: requests by status, latency by where the answer came from,
    stand-ins, requests in flight, decisions read."""

    def __init__(self, service: DecisionService, tokens: BearerTokens) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("fraudstream_api_requests", "Requests answered, by HTTP "
                                "status", ["status"], registry=r)
        self.latency = Histogram("fraudstream_api_request_seconds", "Arrival to answer, by "
                                 "where the answer came from (stream, standin, replayed, "
                                 "error)", ["source"], buckets=_LATENCY_BUCKETS, registry=r)
        self.standins = Counter("fraudstream_api_standins", "Stand-in decisions (the rules "
                                "without velocity features), by cause", ["cause"], registry=r)
        Gauge("fraudstream_api_in_flight", "Transactions waiting for their decision",
              registry=r).set_function(lambda: service.in_flight)
        Gauge("fraudstream_api_decisions_read", "Records read from the decisions topic "
              "since start", registry=r).set_function(lambda: service.read)
        Gauge("fraudstream_api_decisions_matched", "Of them, those a request here waited "
              "for", registry=r).set_function(lambda: service.matched)
        Gauge("fraudstream_api_reader_ready", "1 once the decisions reader is positioned",
              registry=r).set_function(lambda: float(service.reading.is_set()))
        Gauge("fraudstream_api_standins_published", "Stand-ins the broker took on "
              "decisions.standins since start", registry=r).set_function(
            lambda: service.standins_published)
        Gauge("fraudstream_api_standins_unpublished", "Stand-ins answered but not on "
              "decisions.standins (refused, or timed out) since start",
              registry=r).set_function(lambda: service.standins_unpublished)
        Gauge("fraudstream_api_standins_adopted", "Stand-ins read on decisions.standins "
              "and remembered for retries (another instance's) since start",
              registry=r).set_function(lambda: service.standins_adopted)
        Gauge("fraudstream_api_standins_conflicting", "Stand-ins read on "
              "decisions.standins for a transaction this instance answered otherwise "
              "first (its caller and another instance's got different verdicts)",
              registry=r).set_function(lambda: service.standins_conflicting)
        Gauge("fraudstream_api_standins_unreadable", "Records on decisions.standins that "
              "could not be read as decisions (logged)",
              registry=r).set_function(lambda: service.standins_unreadable)
        # A scrape looks at the tokens file too, so an idle API shows a change not taken.
        Gauge("fraudstream_api_tokens", "Bearer tokens in force (the setting's and the "
              "tokens file's)", registry=r).set_function(lambda: len(tokens.current()))
        Gauge("fraudstream_api_tokens_file_stale", "1 while the tokens file's last change "
              "was not taken (unreadable, or no token left): the tokens before it stay",
              registry=r).set_function(lambda: float(tokens.file_stale()))


#: (status, headers, body) of an answer.
Reply = tuple[int, dict[str, str], bytes]


def _json(status: int, body: Any, headers: dict[str, str] | None = None) -> Reply:
    return status, {"content-type": "application/json", **(headers or {})}, orjson.dumps(body)


def _refused(status: int, kind: str, reason: str, field: str | None = None,
             headers: dict[str, str] | None = None) -> Reply:
    masked = (mask_pans(reason.encode()) or b"").decode(errors="replace")
    body = {"error": kind, "reason": masked} | ({"field": field} if field else {})
    return _json(status, body, headers)


def read_transaction(body: bytes, settings: Settings, rates: Rates,
                     now_ms: int) -> dict[str, Any]:
    """The validated transaction of a request body; ValueError (not an object) or
    :class:`ValidationError` (a field, in the dead-letter reasons' words)."""
    try:
        rec = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"invalid JSON: {exc}") from None
    if not isinstance(rec, dict):
        raise ValueError(f"JSON value is a {type(rec).__name__}, not an object")
    for name in rec:
        if name not in _FIELDS:
            value = rec[name]
            if isinstance(value, str) and contains_pan(value) or contains_pan(str(name)):
                raise ValidationError(str(name)[:64] if not contains_pan(str(name))
                                      else "(field name)", PAN_REASON)
            raise ValidationError(str(name)[:64], "not a field of a transaction")
    w = settings.worker
    return validate_transaction(rec, now_ms=now_ms, max_future_ms=w.max_future_ms,
                                max_amount=w.max_amount, rates=rates)


def encoder(settings: Settings, codecs: Any) -> Callable[[dict[str, Any]], bytes]:
    """A validated transaction as the topic takes it (Avro or JSON, as configured)."""
    if settings.codec.input_format == "json":
        return lambda txn: orjson.dumps({f: txn[f] for f in _FIELDS})
    return lambda txn: codecs.transaction.encode({f: txn[f] for f in _FIELDS})  # type: ignore[no-any-return]


def _openapi_body() -> dict[str, Any]:
    """The request body's schema for /docs, from the transaction's Avro schema."""
    kinds = {"string": "string", "double": "number", "long": "integer"}
    props: dict[str, Any] = {}
    required = []
    for f in parsed_schema("transaction")["fields"]:
        t = f["type"]
        if isinstance(t, list):
            t = next(x for x in t if x != "null")
        else:
            required.append(f["name"])
        if isinstance(t, dict):  # event_time: timestamp-millis, or ISO-8601 text
            props[f["name"]] = {"oneOf": [{"type": "integer"},
                                          {"type": "string", "format": "date-time"}]}
        else:
            props[f["name"]] = {"type": kinds.get(t, "string")}
    schema = {"type": "object", "properties": props, "required": required,
              "additionalProperties": False}
    return {"requestBody": {"required": True,
                            "content": {"application/json": {"schema": schema}}}}


class DecisionsHandler:
    """``POST /v1/decisions`` without a web framework: (lower-cased headers, body) in,
    :data:`Reply` out. FastAPI's routing, dependency solving and middleware stack cost
    about a third of the API process's time per request (py-spy, docs/performance.md), so
    :class:`FastPath` sends this route here directly; FastAPI serves the rest and /docs."""

    def __init__(self, settings: Settings, service: DecisionService, metrics: ApiMetrics,
                 tokens: BearerTokens, encode: Callable[[dict[str, Any]], bytes],
                 rates: Callable[[], Rates]) -> None:
        self.settings = settings
        self.api = settings.api
        self.service = service
        self.metrics = metrics
        self.tokens = tokens
        self.encode = encode
        #: The rates table in force (the control topic's, else the rates file's).
        self.rates = rates
        self.retry = {"retry-after": str(self.api.retry_after_s)}
        self.default_s = self.api.timeout_ms / 1000.0

    def timeout_of(self, headers: dict[str, str]) -> float:
        raw = headers.get(TIMEOUT_HEADER)
        if raw is None:
            return self.default_s
        try:
            ms = float(raw)
        except ValueError:
            ms = float("nan")
        if not 0 < ms <= self.api.max_timeout_ms:
            raise ValueError(f"{TIMEOUT_HEADER}: expected milliseconds in (0, "
                             f"{self.api.max_timeout_ms:g}], got {raw[:32]!r}")
        return ms / 1000.0

    def answered(self, status: int, source: str, t0: float) -> None:
        self.metrics.requests.labels(str(status)).inc()
        self.metrics.latency.labels(source).observe(time.perf_counter() - t0)

    async def __call__(self, headers: dict[str, str], body: bytes, t0: float) -> Reply:
        if not self.tokens.authorized(headers.get("authorization")):
            self.answered(401, "error", t0)
            return _refused(401, "unauthorized", "a valid bearer token is required",
                            headers={"www-authenticate": 'Bearer realm="fraudstream"'})
        try:
            deadline = t0 + self.timeout_of(headers)
            rates = self.rates()
            txn = read_transaction(body, self.settings, rates,
                                   int(self.service.clock() * 1000))
        except ValidationError as exc:
            self.answered(422, "error", t0)
            return _refused(422, "validation", exc.reason, exc.field)
        except ValueError as exc:
            self.answered(400, "error", t0)
            return _refused(400, "request", str(exc))
        try:
            answer = await self.service.decide(txn, self.encode(txn), deadline,
                                               rates.version)
        except Overloaded as exc:
            self.answered(429, "error", t0)
            return _refused(429, "overloaded", str(exc), headers=self.retry)
        except Unavailable as exc:
            self.answered(503, "error", t0)
            return _refused(503, "unavailable", str(exc), headers=self.retry)
        source = "replayed" if answer.replayed else answer.source
        if answer.source == "standin" and not answer.replayed:
            self.metrics.standins.labels("timeout").inc()
        self.answered(200, source, t0)
        return _json(200, answer.decision, _headers(answer, t0))


class FastPath:
    """ASGI: ``POST /v1/decisions`` straight to :class:`DecisionsHandler`; everything
    else (and the lifespan) to the FastAPI app. A body over ``max_bytes`` gets 413."""

    def __init__(self, app: Any, handler: DecisionsHandler, max_bytes: int) -> None:
        self.app = app
        self.handler = handler
        self.max_bytes = max_bytes

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] != "/v1/decisions" \
                or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                status, headers, content = _refused(
                    413, "request", f"the body is over {self.max_bytes} bytes")
                break
            chunks.append(chunk)
            more = message.get("more_body", False)
        else:
            headers_in = {k.decode("latin-1"): v.decode("latin-1")
                          for k, v in scope["headers"]}
            status, headers, content = await self.handler(headers_in, b"".join(chunks), t0)
        await send({"type": "http.response.start", "status": status,
                    "headers": [(k.encode("latin-1"), v.encode("latin-1"))
                                for k, v in headers.items()]
                    + [(b"content-length", str(len(content)).encode())]})
        await send({"type": "http.response.body", "body": content})


def create_app(settings: Settings, service: DecisionService, metrics: ApiMetrics,
               tokens: BearerTokens, encode: Callable[[dict[str, Any]], bytes],
               rates: Callable[[], Rates], on_start: Callable[[], None] = lambda: None,
               on_stop: Callable[[], None] = lambda: None) -> FastPath:
    """The ASGI app: :class:`FastPath` in front of FastAPI (lifespan, /docs, probes)."""
    handler = DecisionsHandler(settings, service, metrics, tokens, encode, rates)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> Any:
        import asyncio

        service.start(asyncio.get_running_loop())
        on_start()
        try:
            yield
        finally:
            on_stop()
            service.stop()

    app = FastAPI(title="fraudstream", version="1", lifespan=lifespan,
                  description="Real-time fraud decisions: the streaming pipeline's, "
                              "within the caller's deadline.")

    @app.post("/v1/decisions", openapi_extra=_openapi_body(),
              summary="Decide one transaction within the caller's deadline")
    async def decisions(request: Request) -> Response:
        """Documented here; served by :class:`FastPath` (this runs only without it)."""
        status, headers, content = await handler(dict(request.headers), await request.body(),
                                                 time.perf_counter())
        return Response(content, status, headers)

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> Response:
        ok = service.alive()
        return Response(b"ok\n" if ok else b"a Kafka thread stopped\n", 200 if ok else 503)

    @app.get("/readyz", include_in_schema=False)
    async def readyz() -> Response:
        ok, why = service.ready()
        return Response(b"ok\n" if ok else why.encode() + b"\n", 200 if ok else 503)

    return FastPath(app, handler, settings.codec.max_record_bytes)


def _headers(answer: Answer, t0: float) -> dict[str, str]:
    marks = {**answer.marks_ms, "total": (time.perf_counter() - t0) * 1000.0}
    headers = {"x-fraudstream-decision-source": answer.source,
               "server-timing": ", ".join(f"{k};dur={v:.2f}" for k, v in marks.items())}
    if answer.sha256 is not None:
        headers["x-fraudstream-decision-sha256"] = answer.sha256
        headers["x-fraudstream-decision-offset"] = f"{answer.partition}:{answer.offset}"
    if answer.replayed:
        headers["x-fraudstream-replayed"] = "true"
    return headers
