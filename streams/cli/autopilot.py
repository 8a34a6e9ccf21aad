"""``fraudstream autopilot``: run the retraining loop until SIGINT/SIGTERM
(:mod:`fraudstream.streams.autopilot.loop`); ``--status`` prints its latest events."""

from __future__ import annotations

import argparse
import json
from datetime import UTC, datetime

from fraudstream.streams.autopilot.events import Event
from fraudstream.streams.settings import Settings


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--metrics-port", type=int, default=None,
                   help="serve the autopilot's /metrics on this port (default: "
                        "FRAUDSTREAM_AUTOPILOT_METRICS_PORT)")
    p.add_argument("--status", action="store_true",
                   help="print the last events and where a restart would resume, then exit")
    p.add_argument("--last", type=int, default=12, help="with --status: how many events")


def run(args: argparse.Namespace, settings: Settings) -> int:
    from fraudstream.streams.autopilot.events import read_events, resume, superseded

    if args.status:
        events = read_events(settings)
        stale = superseded(events)
        for e, old in list(zip(events, stale, strict=True))[-args.last:]:
            print(line(e, old))
        r = resume(events)
        print(f"phase {r.phase}" + (f" ({r.version} against {r.champion})" if r.version
                                    else ""))
        return 0
    from fraudstream.streams.autopilot.loop import Autopilot, AutopilotMetrics
    from fraudstream.streams.control.lease import Lease
    from fraudstream.streams.processes import serve_until_signalled

    metrics = AutopilotMetrics()
    lease = Lease(settings, "autopilot", settings.autopilot.lease_session_s)
    pilot = Autopilot(settings, metrics, lease=lease)
    port = args.metrics_port if args.metrics_port is not None \
        else settings.autopilot.metrics_port
    return serve_until_signalled(metrics.registry, port, lease.around(pilot.run))


def line(e: Event, stale: bool = False) -> str:
    """One event as a line of ``--status`` and ``model history``."""
    at = datetime.fromtimestamp(e.at / 1000, tz=UTC).isoformat(timespec="seconds")
    trigger = e.details.get("trigger")
    return (f"{at}\tautopilot\t{e.kind}\t{e.version or '-'}\t{e.reason}"
            + (f"\t{json.dumps({'trigger': trigger})}" if trigger else "")
            + ("\t(superseded: written after another autopilot took the lease; not "
               "resumed from)" if stale else ""))
