"""``fraudstream model list | promote V | rollback | shadow V | shadow --off``.

Acts on the registry folder (``FRAUDSTREAM_SCORING_MODELS_DIR``); running workers pick a
change up within ``FRAUDSTREAM_SCORING_RELOAD_INTERVAL_S``. A version that cannot be
served is refused here already, and the pointers stay as they were.
"""

from __future__ import annotations

import argparse
import json
import sys

from scorers.onnx_model import ArtifactError
from scorers.registry import Registry
from streams.settings import Settings


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", required=True)
    sub.add_parser("list", help="versions, with the active and shadow ones marked")
    q = sub.add_parser("promote", help="make a version the active one")
    q.add_argument("version")
    sub.add_parser("rollback", help="make the previously active version active again")
    q = sub.add_parser("shadow", help="score a version on live traffic, never deciding")
    q.add_argument("version", nargs="?")
    q.add_argument("--off", action="store_true", help="stop the shadow")


def run(args: argparse.Namespace, settings: Settings) -> int:
    registry = Registry(settings.scoring.models_dir)
    try:
        if args.action == "list":
            for e in registry.entries():
                marks = ",".join(m for m, on in (("active", e.active), ("shadow", e.shadow)) if on)
                meta = json.loads((registry.root / e.version / "metadata.json").read_text())
                ens = meta.get("metrics", {}).get("test", {}).get("ensemble", {})
                print(f"{e.version}\t{marks or '-'}\t{e.created_at}\t"
                      f"AP {ens.get('average_precision', float('nan')):.3f}")
            if not registry.versions():
                print(f"no versions in {registry.root}", file=sys.stderr)
        elif args.action == "promote":
            registry.promote(args.version)
            print(f"active: {args.version}")
        elif args.action == "rollback":
            print(f"active: {registry.rollback()}")
        elif args.off or args.version is None:
            registry.shadow(None)
            print("shadow: off")
        else:
            registry.shadow(args.version)
            print(f"shadow: {args.version}")
    except ArtifactError as exc:
        print(f"fraudstream model: {exc}", file=sys.stderr)
        return 1
    return 0
