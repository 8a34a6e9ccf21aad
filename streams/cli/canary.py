"""``fraudstream model canary VERSION --reason TEXT [--steps 5,25,50,100] [--step-duration S]
[--gate NAME=VALUE ...] | --status | --abort --reason TEXT``, and ``fraudstream controller``.

``canary VERSION`` checks the version as a worker loads it, sends its files to the
artifacts topic, and publishes a rollout at its first step against the active version in
force (the champion). The controller (:mod:`fraudstream.streams.control.rollout`) then
moves it: a step passes when its duration is over, each variant has enough decisions, and
no gate failed; a failed gate rolls it back at once; the last step passing promotes it.
``--status`` shows the rollout and the running step's gates, computed from the topics as
the controller computes them. ``--abort`` stops it: every card goes back to the champion.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from datetime import UTC, datetime

from fraudstream.schemas.control import ControlRecord
from fraudstream.scorers.canary import (
    CanaryError,
    GateResult,
    Gates,
    Rollout,
    Step,
    check_steps,
)
from fraudstream.scorers.onnx_model import ArtifactError
from fraudstream.scorers.registry import Registry
from fraudstream.streams.cli.rules import who_and_why
from fraudstream.streams.control.topic import heads, latest
from fraudstream.streams.settings import Settings

GATE_NAMES = [f.name for f in dataclasses.fields(Gates)]


def add_arguments(q: argparse.ArgumentParser) -> None:
    q.add_argument("version", nargs="?", help="the version to roll out (trained here, in "
                                              "FRAUDSTREAM_SCORING_MODELS_DIR)")
    q.add_argument("--steps", default=None,
                   help="percent of cards per step, each optionally with its duration in "
                        "seconds (5:300,25,50,100); the last is 100: the promotion "
                        "(default: FRAUDSTREAM_CANARY_STEPS)")
    q.add_argument("--step-duration", type=float, default=None, metavar="S",
                   help="seconds a step lasts at least, unless given with it (default: "
                        "FRAUDSTREAM_CANARY_STEP_DURATION_S)")
    q.add_argument("--gate", action="append", default=[], metavar="NAME=VALUE",
                   help=f"a gate's limit, one of: {', '.join(GATE_NAMES)} (defaults: "
                        "FRAUDSTREAM_CANARY_<NAME>)")
    q.add_argument("--status", action="store_true", help="the rollout and its gates now")
    q.add_argument("--abort", action="store_true", help="stop the rollout: every card goes "
                                                        "back to the champion")
    who_and_why(q, default="")


def parse_steps(text: str, default_s: float) -> tuple[Step, ...]:
    steps = []
    for item in text.split(","):
        share, _, seconds = item.strip().partition(":")
        try:
            steps.append(Step(float(share) / 100.0, float(seconds) if seconds else default_s))
        except ValueError:
            raise CanaryError(f"--steps: {item!r} is not PERCENT[:SECONDS]") from None
    check_steps(steps)
    return tuple(steps)


def gates_of(settings: Settings) -> Gates:
    """The gates' defaults of this deployment (``FRAUDSTREAM_CANARY_*``)."""
    return Gates(**{name: getattr(settings.canary, name) for name in GATE_NAMES})


def parse_gates(items: list[str], base: Gates) -> Gates:
    values: dict[str, float] = {}
    for item in items:
        name, _, value = item.partition("=")
        if name not in GATE_NAMES:
            raise CanaryError(f"--gate {item!r}: no gate {name!r}; one of {GATE_NAMES}")
        try:
            values[name] = int(value) if name.startswith("min_") else float(value)
        except ValueError:
            raise CanaryError(f"--gate {item!r}: {value!r} is not a number") from None
    return dataclasses.replace(base, **values)


def run(args: argparse.Namespace, settings: Settings, registry: Registry) -> int:
    from fraudstream.streams.cli.rules import _who

    try:
        if args.status:
            return status(settings)
        if not args.reason.strip():
            raise CanaryError("--reason must say why")
        if args.abort:
            return abort(settings, _who(args.by), args.reason.strip())
        if args.version is None:
            raise CanaryError("name the version to roll out, or --status, or --abort")
        c = settings.canary
        steps = parse_steps(args.steps or c.steps, args.step_duration
                            if args.step_duration is not None else c.step_duration_s)
        return start(settings, registry, args.version, steps,
                     parse_gates(args.gate, gates_of(settings)), _who(args.by),
                     args.reason.strip())
    except CanaryError as exc:
        print(f"fraudstream model canary: {exc}", file=sys.stderr)
        return 2


def rollout_of(record: ControlRecord | None) -> Rollout | None:
    """The rollout in a state record; None when there is none, or when it cannot be read
    (said on stderr: workers refused it and serve the champion only)."""
    if record is None:
        return None
    try:
        return Rollout.from_document(record.document)
    except CanaryError as exc:
        print(f"the latest rollout record ({record.published_by}, {record.reason}) cannot be "
              f"applied: {exc}; workers serve the champion only", file=sys.stderr)
        return None


def current_rollout(settings: Settings) -> Rollout | None:
    """The rollout in force (see :func:`rollout_of`)."""
    return rollout_of(latest(settings, "canary"))


def start(settings: Settings, registry: Registry, version: str, steps: tuple[Step, ...],
          gates: Gates, by: str, reason: str) -> int:
    from fraudstream.streams.cli.rules import exit_code
    from fraudstream.streams.control.artifacts import ArtifactTransferError, upload
    from fraudstream.streams.control.rollout import publish_rollout

    now_in_force = heads(settings)
    state = now_in_force.get("model")
    champion = state.document.get("active") if state is not None else None
    if champion is None:
        raise CanaryError("no active version published: a canary is judged against one "
                          "(fraudstream model publish V)")
    if version == champion:
        raise CanaryError(f"{version} is already the active version")
    head = now_in_force.get("canary")
    running = rollout_of(head)
    if running is not None and running.status == "running":
        raise CanaryError(f"rollout {running.rollout} of {running.version} is running: "
                          "--abort it first")
    try:
        upload(settings, registry, version)
    except (ArtifactError, ArtifactTransferError, OSError) as exc:
        print(f"fraudstream model canary: {' '.join(str(exc).split())}", file=sys.stderr)
        return 1
    now = int(time.time() * 1000)
    rollout = Rollout(rollout=f"{version}@{now}", version=version, champion=champion,
                      steps=steps, gates=gates, step=0, step_started_at=now, started_at=now)
    code = exit_code("model canary", lambda: publish_rollout(settings, rollout, by, reason,
                                                            head))
    if code:
        return code
    print(f"rollout {rollout.rollout}: {version} on {steps[0].share:.0%} of cards against "
          f"{champion}; steps {', '.join(f'{s.share:.0%}' for s in steps)} (the controller, "
          "`fraudstream controller`, moves it)")
    return 0


def abort(settings: Settings, by: str, reason: str) -> int:
    from fraudstream.streams.cli.rules import exit_code
    from fraudstream.streams.control.rollout import publish_rollout

    head = latest(settings, "canary")
    running = rollout_of(head)
    if running is None or running.status != "running":
        raise CanaryError("no rollout is running")
    code = exit_code("model canary", lambda: publish_rollout(
        settings, running.moved(int(time.time() * 1000), status="aborted"), by, reason, head))
    if code:
        return code
    print(f"rollout {running.rollout} aborted: {running.champion} serves every card")
    return 0


def status(settings: Settings) -> int:
    from fraudstream.streams.control.rollout import StepReader, codecs_for

    r = current_rollout(settings)
    if r is None:
        print("no rollout in force")
        return 0
    at = datetime.fromtimestamp(r.step_started_at / 1000, tz=UTC).isoformat(timespec="seconds")
    print(f"rollout {r.rollout}: {r.status}; {r.version} against {r.champion}; step "
          f"{r.step + 1} of {len(r.steps)} ({r.share:.0%} of cards) since {at}")
    if r.status != "running":
        verdict = r.verdict or {}
        if verdict.get("failed"):
            print(f"  failed: {', '.join(verdict['failed'])}")
        for gate in verdict.get("gates", []):
            print("  " + GateResult(**{k: math.nan if v is None else v
                                       for k, v in gate.items()}).line())
        return 0
    reader = StepReader(settings, codecs_for(settings), r)
    try:
        quiet = 0
        while quiet < 3:  # read until three polls in a row bring nothing
            quiet = quiet + 1 if reader.poll(0.5) == 0 else 0
        for variant, s in reader.stats.items():
            figures = ", ".join(f"{k} {v}" if isinstance(v, int) else f"{k} {v:.4g}"
                                for k, v in s.summary().items())
            print(f"  {variant}: {figures}")
        for g in reader.judge(r):
            print(f"  {g.line()}")
    finally:
        reader.close()
    return 0


def run_controller(args: argparse.Namespace, settings: Settings) -> int:
    """``fraudstream controller``: drive rollouts until SIGINT/SIGTERM."""
    from fraudstream.streams.control.lease import Lease
    from fraudstream.streams.control.rollout import Controller, RolloutMetrics
    from fraudstream.streams.processes import serve_until_signalled

    metrics = RolloutMetrics()
    port = args.metrics_port if args.metrics_port is not None \
        else settings.canary.controller_metrics_port
    lease = Lease(settings, "controller", settings.canary.controller_lease_session_s)
    controller = Controller(settings, metrics, lease=lease)
    return serve_until_signalled(metrics.registry, port, lease.around(controller.run))
