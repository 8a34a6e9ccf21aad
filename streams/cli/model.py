"""``fraudstream model list | promote V | rollback | shadow V | shadow --off | seal V |
publish V [--shadow] | history | canary V | canary --status | canary --abort``.

Acts on the registry folder (``FRAUDSTREAM_SCORING_MODELS_DIR``); running workers pick a
change up within ``FRAUDSTREAM_SCORING_RELOAD_INTERVAL_S``. Once a model state is published
on the control topic, ``promote``, ``shadow`` and ``rollback`` publish the change there
instead (:mod:`fraudstream.streams.cli.model_state`): a folder's pointers would be undone
by that state at the next start of its worker, and would move one machine only. A version
that cannot be served (altered files, degenerate weights or thresholds, a probe batch
scored all alike) is refused here already, with one line on stderr and exit code 1, and the
pointers stay as they were. ``publish`` puts a version in force on every worker through
the control topic: workers fetch its files from the artifacts topic (no shared folder);
``canary`` rolls it out in steps (:mod:`fraudstream.streams.cli.canary`). ``list`` checks
every version as a worker would and shows a broken one as broken, with the reason.
"""

from __future__ import annotations

import argparse
import sys

from fraudstream.scorers.onnx_model import ArtifactError
from fraudstream.scorers.registry import Registry
from fraudstream.streams.cli.rules import who_and_why
from fraudstream.streams.settings import Settings


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", required=True)
    sub.add_parser("list", help="versions, with the active and shadow ones marked, and "
                                "whether each can be served")
    q = sub.add_parser("promote", help="make a version the active one")
    q.add_argument("version")
    _published_change(q)
    q = sub.add_parser("rollback", help="make the previously active version active again")
    _published_change(q)
    q = sub.add_parser("shadow", help="score a version on live traffic, never deciding")
    q.add_argument("version", nargs="?")
    q.add_argument("--off", action="store_true", help="stop the shadow")
    _published_change(q)
    q = sub.add_parser("seal", help="check a version trained by an older fraudstream and "
                                    "write its SHA256SUMS, so that it can be promoted")
    q.add_argument("version")
    q = sub.add_parser("publish", help="put a version in force on every worker, through "
                                       "the control topic (its files on the artifacts topic)")
    q.add_argument("version")
    q.add_argument("--shadow", action="store_true", help="as the shadow, not the active one")
    who_and_why(q)
    sub.add_parser("history", help="every model state and rollout published on the "
                                   "control topic, and every autopilot event")
    q = sub.add_parser("canary", help="roll a version out in steps, judged by gates against "
                                      "the active version, rolled back when one fails")
    from fraudstream.streams.cli.canary import add_arguments as canary_arguments

    canary_arguments(q)


def _published_change(q: argparse.ArgumentParser) -> None:
    who_and_why(q, "why (required once a model state is published on the control topic: "
                   "kept in its audit trail)", default=None)


def run(args: argparse.Namespace, settings: Settings) -> int:
    registry = Registry(settings.scoring.models_dir)
    if args.action in ("promote", "rollback", "shadow"):
        from fraudstream.streams.cli.model_state import published_change

        code = published_change(args, settings, registry)
        if code is not None:
            return code
    if args.action == "canary":
        from fraudstream.streams.cli.canary import run as canary

        return canary(args, settings, registry)
    if args.action in ("publish", "history"):
        from fraudstream.streams.cli.model_state import publish_model
        from fraudstream.streams.cli.rules import history

        return publish_model(args, settings, registry) if args.action == "publish" \
            else history(settings, ("model", "canary"), autopilot=True)
    try:
        if args.action == "list":
            broken = 0
            for e in registry.entries():
                marks = ",".join(m for m, on in (("active", e.active), ("shadow", e.shadow)) if on)
                state = {"ok": f"ok {e.detail[:12]}"}.get(e.status, f"{e.status}: {e.detail}")
                broken += e.status == "broken"
                print(f"{e.version}\t{marks or '-'}\t{e.created_at}\t"
                      f"AP {e.average_precision:.3f}\t{state}")
            if not registry.versions():
                print(f"no versions in {registry.root}", file=sys.stderr)
            elif broken:
                print(f"fraudstream model: {broken} version(s) cannot be served",
                      file=sys.stderr)
        elif args.action == "promote":
            registry.promote(args.version)
            print(f"active: {args.version}")
        elif args.action == "rollback":
            print(f"active: {registry.rollback()}")
        elif args.action == "seal":
            print(f"sealed: {args.version} {registry.seal(args.version)}")
        elif args.off or args.version is None:
            registry.shadow(None)
            print("shadow: off")
        else:
            registry.shadow(args.version)
            print(f"shadow: {args.version}")
    except (ArtifactError, OSError) as exc:
        print(f"fraudstream model: {' '.join(str(exc).split())}", file=sys.stderr)
        return 1
    return 0
