"""``python -m fraudstream.loadtest.control [--publications 7]``: what a fenced change on
the control topic costs its publisher.

On a fresh embedded broker, each publication of a rules change does what ``fraudstream
rules publish`` does after its checks: read the rules in force (the whole topic, replayed
through :class:`fraudstream.schemas.control.Heads`), write the change made from them (its
audit and state records, acknowledged), then read the topic back up to its own record to
learn whether it is in force. Prints the median, min and max of each step in ms.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from fraudstream.schemas.control import ControlRecord
from fraudstream.scorers.rules import DEFAULT_RULES_PATH
from fraudstream.scorers.rules_file import inline_document, read_toml
from fraudstream.streams.control import topic as control
from fraudstream.streams.embedded.broker import EmbeddedBroker
from fraudstream.streams.settings import Settings
from fraudstream.streams.topics import ensure_topics


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--publications", type=int, default=7)
    args = p.parse_args(argv)
    document = inline_document(read_toml(DEFAULT_RULES_PATH), DEFAULT_RULES_PATH.parent)
    workdir = Path(tempfile.mkdtemp(prefix="fraudstream-control-bench-"))
    steps: dict[str, list[float]] = {"read the state": [], "write": [], "read back": []}
    with EmbeddedBroker(log_path=workdir / "tansu.log") as broker:
        settings = Settings().replace(kafka={"bootstrap": broker.bootstrap, "embedded": True})
        ensure_topics(settings, names=[settings.topics.control])
        for i in range(args.publications):
            t0 = time.perf_counter()
            head = control.latest(settings, "rules")
            t1 = time.perf_counter()
            record = ControlRecord.make("rules", f"bench-{i}", {**document,
                                        "version": f"bench-{i}"}, "bench", 1_767_571_200_000
                                        + i, "a timed publication").after(head)
            control.write_acked(settings, settings.topics.control,
                                ((k, record.encode())
                                 for k in (record.audit_key(), record.state_key())),
                                15.0, linger_ms=0)
            t2 = time.perf_counter()
            control.confirm(settings, record, 30.0)
            t3 = time.perf_counter()
            for name, took in zip(steps, (t1 - t0, t2 - t1, t3 - t2), strict=True):
                steps[name].append(took * 1000.0)
    for name, ms in steps.items():
        print(f"{name}: median {statistics.median(ms):.0f} ms (min {min(ms):.0f}, max "
              f"{max(ms):.0f}) over {len(ms)} publications")
    return 0


if __name__ == "__main__":
    sys.exit(main())
