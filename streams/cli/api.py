"""``fraudstream api``: serve POST /v1/decisions (:mod:`fraudstream.streams.api.http`)
with uvicorn until SIGINT/SIGTERM, and /metrics, /healthz and /readyz on the metrics
port."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import time
from typing import Any

from fraudstream.streams.errors import StartError
from fraudstream.streams.settings import Settings

DESCRIPTION = """\
A synchronous scoring endpoint for systems that call and wait: each transaction goes
through the streaming workers, and the caller gets the decision they published on the
decisions topic, or a rules-only stand-in flagged fallback:timeout when its deadline
comes first. Settings: FRAUDSTREAM_API_*."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--port", type=int, default=None,
                   help="serve the API on this port (default: FRAUDSTREAM_API_PORT)")
    p.add_argument("--metrics-port", type=int, default=None,
                   help="serve /metrics, /healthz and /readyz on this port (default: "
                        "FRAUDSTREAM_API_METRICS_PORT)")
    p.add_argument("--loglevel", default="warning")


def run(args: argparse.Namespace, settings: Settings) -> int:
    api = settings.api
    if args.port is not None:
        settings = settings.replace(api={"port": args.port})
        api = settings.api
    if bool(api.tls_certfile) != bool(api.tls_keyfile):
        raise StartError("FRAUDSTREAM_API_TLS_CERTFILE and FRAUDSTREAM_API_TLS_KEYFILE "
                         "come together")
    from fraudstream.streams.api.auth import BearerTokens

    try:
        tokens = BearerTokens([t.strip().encode() for t in api.tokens.split(",") if t.strip()],
                              api.tokens_file, api.anonymous)
    except (OSError, UnicodeDecodeError) as exc:
        raise StartError(f"FRAUDSTREAM_API_TOKENS_FILE={api.tokens_file}: {exc}") from None
    if not tokens.tokens and not api.anonymous:
        raise StartError("no bearer token configured: set FRAUDSTREAM_API_TOKENS or "
                         "FRAUDSTREAM_API_TOKENS_FILE (or FRAUDSTREAM_API_ANONYMOUS=true "
                         "behind a gateway that authenticates)")
    logging.basicConfig(level=args.loglevel.upper(),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    import uvicorn

    from fraudstream.schemas.codec import Codecs, make_registry
    from fraudstream.schemas.fx import Rates
    from fraudstream.scorers.rules import RuleSet
    from fraudstream.streams.api.http import ApiMetrics, create_app, encoder
    from fraudstream.streams.api.service import DecisionService
    from fraudstream.streams.control.follow import ControlFollower
    from fraudstream.streams.health import Probes, serve
    from fraudstream.streams.worker.probes import Heartbeat

    c = settings.codec
    codecs = Codecs(make_registry(c.registry_url, c.registry_username, c.registry_password),
                    settings.topics)
    follower = ControlFollower(settings, models=False)
    in_force = [follower.initial(RuleSet.load(settings.scoring.rules_path))]
    lock = threading.Lock()

    def rules():  # type: ignore[no-untyped-def]
        newer = follower.take()
        if newer is not None:
            with lock:
                in_force[0] = newer
        return in_force[0]

    rates_in_force = [follower.rates]

    def rates() -> Rates:
        """The table requests are read with: the control topic's, as a worker's."""
        newer = follower.take_rates()
        if newer is not None:
            rates_in_force[0] = newer  # (read on the event loop only)
        return rates_in_force[0]

    service = DecisionService(settings, codecs, rules)
    metrics = ApiMetrics(service, tokens)
    probes = Probes()
    heartbeat = Heartbeat(lambda: service.loop)

    def event_loop() -> str | None:
        heartbeat.ping()
        late = time.monotonic() - heartbeat.at
        return None if late < 10.0 else f"the event loop has not run for {late:.0f} s"

    probes.live.append(("kafka_threads", lambda: None if service.alive()
                        else "a Kafka thread of the API stopped, or its reader is stuck"))
    probes.live.append(("event_loop", event_loop))
    probes.ready.append(("decisions_reader", lambda: None if service.ready()[0]
                         else service.ready()[1]))
    server: list[Any] = []  # the uvicorn server, once made
    probes.ready.append(("http", lambda: None if server and server[0].started
                         else "the HTTP port is not served yet"))
    port = args.metrics_port if args.metrics_port is not None else api.metrics_port
    try:
        served = serve(metrics.registry, port, "0.0.0.0", probes)
    except OSError as exc:
        raise StartError(f"FRAUDSTREAM_API_METRICS_PORT={port}: {exc}") from None
    app = create_app(settings, service, metrics, tokens, encoder(settings, codecs),
                     rates, on_start=follower.start,
                     on_stop=follower.stop)
    # The request coroutines and the Kafka threads share one interpreter: a short switch
    # interval lets a decision read by the reader thread reach its request sooner.
    sys.setswitchinterval(0.001)
    print(f"fraudstream api: http{'s' if api.tls_certfile else ''}://{api.host}:{api.port}"
          f"/v1/decisions (docs at /docs); metrics on :{served}", flush=True)
    # uvicorn shuts down gracefully on SIGINT/SIGTERM (requests in hand answered, at most
    # 10 s), then raises the signal again for the handlers it found: these make that a
    # clean exit 0.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    server.append(uvicorn.Server(uvicorn.Config(
        app, host=api.host, port=api.port, log_level=args.loglevel, access_log=False,
        ssl_certfile=api.tls_certfile or None, ssl_keyfile=api.tls_keyfile or None,
        timeout_graceful_shutdown=10)))
    server[0].run()
    if not server[0].started:  # the port could not be bound: uvicorn logged why
        raise StartError(f"FRAUDSTREAM_API_PORT={api.port}: the API could not serve it")
    return 0
