"""The model state on the control topic, as ``fraudstream model`` changes it.

``model publish V [--shadow]`` puts a version in force on every worker: its files go to the
artifacts topic, then the model state (``{"active": V, "shadow": W or null}``) to the
control topic, made from the state in force (fenced, :mod:`fraudstream.schemas.control`).

Once a model state is published, ``promote``, ``shadow`` and ``rollback`` change that state
too, rather than the local folder's pointers: a worker applies the published state at
start, so a folder changed by hand would be undone by its next restart, and would have
moved one machine only. They then need ``--reason`` (the audit trail). ``rollback`` goes
back to the active version before the current one in the published history, as the local
registry does with its own. Where the control topic cannot be read, they change the folder
and say so.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Collection

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient

from fraudstream.schemas.control import ControlRecord, Heads, active_version
from fraudstream.scorers.onnx_model import ArtifactError
from fraudstream.scorers.registry import Registry
from fraudstream.streams.cli.rules import _not_sent, _who
from fraudstream.streams.control.topic import changes
from fraudstream.streams.settings import Settings

#: How long ``promote``, ``shadow`` and ``rollback`` wait for the broker before they act on
#: the folder alone.
PROBE_S = 3.0


def published_change(args: argparse.Namespace, settings: Settings,
                     registry: Registry) -> int | None:
    """``promote``, ``shadow`` or ``rollback`` published, when a model state is in force on
    the control topic: the command's exit code. None: none is (or the topic cannot be
    read), so the folder's pointers are the state: the caller changes them."""
    version = getattr(args, "version", None)
    if version is not None and not getattr(args, "off", False):
        try:  # refused here already, as the folder's own change would be
            registry.load(version, sealed=True)
        except (ArtifactError, OSError) as exc:
            if version in registry.versions():
                print(f"fraudstream model: {' '.join(str(exc).split())}", file=sys.stderr)
                return 1
            # not here: it may have been published from another machine (checked below)
    try:
        AdminClient({**settings.kafka.client_config(), "log_level": 0}).list_topics(
            settings.topics.control, timeout=PROBE_S)  # (the line below says it, once)
    except KafkaException as exc:
        why = exc.args[0].str() if exc.args and hasattr(exc.args[0], "str") else exc
        print(f"fraudstream model: the control topic cannot be read ({why}): "
              f"only {registry.root} changes; a model state published there stays in "
              "force on the workers", file=sys.stderr)
        return None
    in_force, applied = changes(settings)
    state = in_force.get("model")
    if state is None:
        return None
    if not (args.reason or "").strip():
        print(f"fraudstream model: the model state is published on "
              f"{settings.topics.control} (active {active_version(state)}, by "
              f"{state.published_by}): this change goes to every worker; say why with "
              "--reason", file=sys.stderr)
        return 2
    if args.action == "rollback":
        states = [active_version(r) for r in applied if r.kind == "model"]
        current = active_version(state)
        while states and states[-1] == current:
            states.pop()
        if not states or states[-1] is None:
            print("fraudstream model: nothing to roll back to: no earlier active version "
                  f"published on {settings.topics.control}", file=sys.stderr)
            return 1
        version = states[-1]
    published = {v for r in applied if r.kind == "model" and isinstance(r.document, dict)
                 for v in (r.document.get("active"), r.document.get("shadow"))}
    return publish_model(argparse.Namespace(
        version=None if args.action == "shadow" and (args.off or version is None)
        else version, shadow=args.action == "shadow", reason=args.reason, by=args.by),
        settings, registry, in_force, sent=published)


def publish_model(args: argparse.Namespace, settings: Settings, registry: Registry,
                  now_in_force: Heads | None = None, sent: Collection[str | None] = ()
                  ) -> int:
    """``fraudstream model publish V [--shadow]``: the version's files to the artifacts
    topic (checked as a worker loads them first), then the model state with it. A
    version of ``sent`` (published before) that is not in the folder is not sent again: its
    files are on the artifacts topic. ``args.version`` None with ``--shadow``: no shadow."""
    from fraudstream.streams.control.artifacts import ArtifactTransferError, upload

    if not args.reason.strip():
        print("fraudstream model: --reason must say why", file=sys.stderr)
        return 2
    if now_in_force is None:
        now_in_force = changes(settings)[0]
    if not args.shadow:
        from fraudstream.streams.cli.canary import rollout_of

        running = rollout_of(now_in_force.get("canary"))
        if running is not None and running.status == "running":
            # The rollout's gates judge its version against the champion it started with.
            print(f"fraudstream model: rollout {running.rollout} of {running.version} "
                  f"against {running.champion} is running: a new active version would "
                  "change the champion it is judged against; abort it first (fraudstream "
                  "model canary --abort --reason ...)", file=sys.stderr)
            return 2
    if args.version is not None and (args.version not in sent
                                     or args.version in registry.versions()):
        try:
            upload(settings, registry, args.version)
        except (ArtifactError, ArtifactTransferError, OSError) as exc:
            print(f"fraudstream model: {' '.join(str(exc).split())}", file=sys.stderr)
            return 1
    state = now_in_force.get("model")
    doc = dict(state.document) if state is not None else {"active": None, "shadow": None}
    doc["shadow" if args.shadow else "active"] = args.version
    if doc["active"] is None:
        print("fraudstream model: no active version published yet: publish one without "
              "--shadow first", file=sys.stderr)
        return 2
    code = _not_sent(settings, ControlRecord.make(
        "model", args.version or doc["active"], doc, _who(args.by), int(time.time() * 1000),
        args.reason.strip()).after(state), "model")
    if code:
        return code
    print(f"models in force: active {doc['active']}, shadow {doc['shadow'] or 'none'} "
          f"(published to {settings.topics.control})")
    return 0
