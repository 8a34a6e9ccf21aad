"""``python -m fraudstream.loadtest.batching``: backlog drains under batch policies, each on a
fresh embedded broker, one after another in the same run.

``--events`` generated transactions are produced to a new broker, then ``fraudstream
worker`` drains them with its settings changed as a ``--variant`` says (``LABEL:JSON``, the
JSON a :meth:`Settings.replace` mapping, e.g. ``always500:{"worker":{"batch_min":500}}``).
Per variant it prints the drain rate (first decision to last, on the decisions topic), who
decided (the model, the rules, or a fallback by cause, read from every decision), how
many decisions came past the budget and by how much at most (``late_ms``), and the
worker's status lines. The defaults compare the worker's own policy with fixed batches of
``BATCH_MAX`` and with batches sized to the whole budget.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from fraudstream.loadtest.drain import backlog_drain
from fraudstream.loadtest.harness import fresh_stack, pre_produce, write_result
from fraudstream.streams.embedded.broker import EmbeddedBroker, free_port
from fraudstream.streams.embedded.registry import EmbeddedRegistry

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_VARIANTS = ("default:{}", 'always500:{"worker":{"batch_min":500}}',
                    'share1:{"worker":{"batch_share":1.0}}')


def drain(label: str, overrides: dict[str, Any], events: int, models: Path | None,
          seed: int) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="fraudstream-batching-"))
    with EmbeddedRegistry() as reg, EmbeddedBroker(log_path=workdir / "broker.log") as broker:
        stack = fresh_stack(
            broker, reg, workdir, "batching",
            worker={"metrics_port": free_port(), "status_interval_s": 2.0,
                    **overrides.get("worker", {})},
            scoring={"models_dir": models or workdir / "no-models",
                     **overrides.get("scoring", {})},
            features=overrides.get("features", {}))
        settings, codecs = stack.settings, stack.codecs
        pre_produce(settings, codecs, events, seed)
        result: dict[str, Any] = {}
        with backlog_drain(settings, codecs, workdir, events, [], result):
            pass
    worker = result["worker"]
    status = [line.split("status: ", 1)[1] for line in
              (workdir / "worker.log").read_text(errors="replace").splitlines()
              if "status: " in line and " 0 tx/s" not in line]
    return {"label": label, "overrides": overrides, "rate": worker["rate"],
            "events": worker["events"], "decided_by": worker["decided_by"],
            "past_budget": worker["past_budget"], "late_ms_max": worker["late_ms_max"],
            "status": status, "workdir": str(workdir)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fraudstream.loadtest.batching",
                                description=__doc__.split("\n")[0].replace("``", ""))
    p.add_argument("--events", type=int, default=40_000)
    p.add_argument("--models", type=Path, help="a registry with an ACTIVE version "
                   "(default: none, the rules decide)")
    p.add_argument("--variant", action="append", default=[],
                   help=f"LABEL:JSON settings overrides (default: {' '.join(DEFAULT_VARIANTS)})")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out", type=Path, default=ROOT / "results")
    args = p.parse_args(argv)
    results = []
    for spec in args.variant or DEFAULT_VARIANTS:
        label, _, raw = spec.partition(":")
        r = drain(label, json.loads(raw or "{}"), args.events, args.models, args.seed)
        results.append(r)
        print(f"{label:>12}: {r['rate']:,.0f}/s; decided by {r['decided_by']}; "
              f"{r['past_budget']:,} past the budget (by up to {r['late_ms_max']:.0f} ms)",
              file=sys.stderr)
        for line in r["status"]:
            print(f"{'':>14}{line[:200]}", file=sys.stderr)
    write_result(args.out, "batching", results,
                 printed=[{k: v for k, v in r.items() if k != "status"} for r in results])
    return 0


if __name__ == "__main__":
    sys.exit(main())
