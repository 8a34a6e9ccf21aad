"""Restart benchmarks on the embedded stack: how long a worker takes to decide again after
a crash, and what 10 crashes under steady traffic cost.

    python -m fraudstream.loadtest.restart imports [--runs 5]
    python -m fraudstream.loadtest.restart restart [--runs 3] [--session-timeout-ms 6000]
    python -m fraudstream.loadtest.restart crashloop [--kills 10 --events 100000 --rate 1000]

``imports``: the import time of ``fraudstream.streams.worker.app`` and of the worker's CLI path
(``python -X importtime``), median over ``--runs`` fresh interpreters.

``restart``: one embedded broker and registry, one worker fed steady traffic (``--rate``,
produced with ``--linger-ms``). ``--runs`` times each: SIGKILL the worker, start it again
(a) with its data dir kept, (b) with its data dir wiped, and time the restart to its first
new decision (``decided_at`` at or after the restart), split by the new worker's log:
built (imports done, the worker wired), partitions assigned (group join), ready (the
changelog restored), first decision.

``crashloop``: ``--events`` transactions at ``--rate``/s while the worker is SIGKILLed
``--kills`` times, evenly spaced, and started again at once each time. Then it reads every
decision and prints: missing (sent, never decided), conflicting (decided twice with
different bytes), duplicates (the same decision again) and the share decided by the model
(``--models``: a registry folder with an active version; trained small once, if empty).

``--root DIR`` runs the worker from another checkout (e.g. a ``git worktree`` of an older
commit) with that checkout's own interpreter (``DIR/.venv/bin/python``: ``make venv``
there), to compare before and after; settings that checkout does not know are left out of
its environment. (This interpreter would import this checkout's packages whatever the
working directory: the editable install maps ``fraudstream.*`` here.) A root whose
interpreter loads another checkout's code is refused.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer

from fraudstream.schemas.codec import Codecs, make_registry
from fraudstream.streams.embedded.broker import EmbeddedBroker
from fraudstream.streams.embedded.registry import EmbeddedRegistry
from fraudstream.streams.processes import die_with_parent, stop_process
from fraudstream.streams.settings import Settings
from fraudstream.streams.topics import assign_all, ensure_topics
from fraudstream.streams.traffic.generator import TrafficGenerator
from fraudstream.streams.traffic.world import GeneratorConfig

ROOT = Path(__file__).resolve().parent.parent

# ---------------------------------------------------------------------------- imports


def _importtime_s(code: str, root: Path) -> float:
    """Sum of the top-level cumulative import times ``-X importtime`` reports, seconds."""
    out = subprocess.run([python_of(root), "-X", "importtime", "-c", code], cwd=root,
                         env={**os.environ, "PYTHONPATH": str(root)}, capture_output=True,
                         text=True, check=True)
    total = 0
    for line in out.stderr.splitlines():
        parts = line.split("|")
        if len(parts) == 3 and parts[1].strip().isdigit() and not parts[2].startswith("  "):
            total += int(parts[1])
    return total / 1e6


def _wall_s(code: str, root: Path) -> float:
    t0 = time.perf_counter()
    subprocess.run([python_of(root), "-c", code], cwd=root, check=True,
                   env={**os.environ, "PYTHONPATH": str(root)})
    return time.perf_counter() - t0


CLI_WORKER_PATH = """
import inspect
from fraudstream.streams.cli import main as cli
kw = {"only": "worker"} if "only" in inspect.signature(cli.build_parser).parameters else {}
cli.build_parser(**kw).parse_args(["worker"])
import fraudstream.streams.worker.app, fraudstream.streams.topics, faust
"""


def run_imports(args: argparse.Namespace) -> dict[str, Any]:
    root = Path(args.root).resolve()
    out: dict[str, Any] = {"root": str(root), "runs": args.runs}
    for label, code in (("import fraudstream.streams.worker.app",
                         "import fraudstream.streams.worker.app"),
                        ("fraudstream worker path", CLI_WORKER_PATH)):
        imp = [_importtime_s(code, root) for _ in range(args.runs)]
        wall = [_wall_s(code, root) for _ in range(args.runs)]
        out[label] = {"importtime_s": round(statistics.median(imp), 3),
                      "wall_s": round(statistics.median(wall), 3),
                      "importtime_all": [round(x, 3) for x in imp],
                      "wall_all": [round(x, 3) for x in wall]}
        print(f"{label:26s} importtime median {statistics.median(imp):.3f} s "
              f"(runs {', '.join(f'{x:.2f}' for x in imp)}); interpreter wall median "
              f"{statistics.median(wall):.3f} s", flush=True)
    return out


# ---------------------------------------------------------------------------- the stack


class Stack:
    """An embedded broker and registry, the topics, and a codec set."""

    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args, self.workdir = args, workdir
        self.broker = EmbeddedBroker(log_path=workdir / "tansu.log")
        self.registry = EmbeddedRegistry()

    def __enter__(self) -> Stack:
        self.broker.__enter__()
        self.registry.__enter__()
        uid = uuid.uuid4().hex[:6]
        a = self.args
        self.settings = Settings().replace(
            kafka={"bootstrap": self.broker.bootstrap, "partitions": a.partitions,
                   "embedded": True, "session_timeout_ms": a.session_timeout_ms},
            codec={"registry_url": self.registry.url},
            worker={"app_id": f"restart-{uid}", "data_dir": self.workdir / "state",
                    "metrics_port": 0, "commit_interval_s": 0.5},
            scoring={"models_dir": Path(a.models) if getattr(a, "models", None)
                     else self.workdir / "no-models"},
        )
        if a.instance_id is not None:
            self.settings = self.settings.replace(worker={"instance_id": a.instance_id})
        ensure_topics(self.settings)
        self.codecs = Codecs(make_registry(self.registry.url), self.settings.topics)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.registry.__exit__(*exc)
        self.broker.__exit__(*exc)


def python_of(root: Path) -> str:
    """The interpreter that runs ``root``'s own code: its venv's, or this one for this
    checkout. Raises SystemExit when it would load another checkout's packages."""
    own = root / ".venv" / "bin" / "python"
    python = str(own) if own.exists() else sys.executable
    out = subprocess.run(
        [python, "-c", "import fraudstream.streams.pipeline as p; print(p.__file__)"],
        cwd=root, capture_output=True, text=True)
    loaded = Path(out.stdout.strip() or "?").resolve()
    if out.returncode != 0 or not loaded.is_relative_to(root.resolve()):
        raise SystemExit(f"--root {root}: {python} loads {loaded}, not that checkout's code: "
                         f"run make venv in {root} first")
    return python


def _known_settings(root: Path) -> set[str]:
    out = subprocess.run([python_of(root), "-m", "fraudstream", "settings"], cwd=root,
                         env={**os.environ, "PYTHONPATH": str(root)}, capture_output=True,
                         text=True, check=True)
    return {line.split("=", 1)[0] for line in out.stdout.splitlines() if "=" in line}


class Worker:
    """``fraudstream worker`` (of ``root``) as a process of its own, logging at info."""

    def __init__(self, settings: Settings, root: Path, log: Path) -> None:
        self.root, self.log = root, log
        known = _known_settings(root)
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("FRAUDSTREAM_")}
        self.env.update({k: v for k, v in settings.to_env().items() if k in known})
        self.env["PYTHONPATH"] = str(root)
        self.python = python_of(root)
        self.proc: subprocess.Popen[bytes] | None = None
        self.started = 0.0
        self.log_offset = 0

    def start(self) -> float:
        self.log_offset = self.log.stat().st_size if self.log.exists() else 0
        with open(self.log, "ab") as out:
            self.started = time.time()
            self.proc = subprocess.Popen(
                [self.python, "-m", "fraudstream", "worker", "--loglevel", "info"],
                env=self.env, cwd=self.root, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True, preexec_fn=die_with_parent)
        return self.started

    def kill(self) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        stop_process(self.proc, 30.0)

    def this_run(self) -> str:
        with open(self.log, "rb") as f:
            f.seek(self.log_offset)
            return f.read().decode(errors="replace")


_STAMP = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})\]")

#: Log lines that mark the phases of a start (first match of each, in this run).
PHASES = (
    ("built", re.compile(r"\[\^Worker\]: Starting")),  # imports done, the worker wired
    ("join", re.compile(r"\(Re-\)joining group")),  # Faust's conductor has waited
    ("assigned", re.compile(r"Setting newly assigned partitions")),
    ("ready", re.compile(r"Worker ready")),  # the changelog restored
)


def phase_times(log_text: str) -> dict[str, float]:
    """Wall-clock time (epoch seconds) of the first line of each phase."""
    out: dict[str, float] = {}
    for line in log_text.splitlines():
        m = _STAMP.match(line)
        if not m:
            continue
        for name, pattern in PHASES:
            if name not in out and pattern.search(line):
                out[name] = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
    return out


class Traffic(threading.Thread):
    """Transactions at ``rate``/s (``total`` of them, or until stopped), batched by the
    producer for ``linger_ms``; every transaction_id sent is kept."""

    def __init__(self, stack: Stack, rate: float, linger_ms: int, total: int | None,
                 seed: int = 7) -> None:
        super().__init__(daemon=True)
        self.stack, self.rate, self.total = stack, rate, total
        self.producer = Producer({**stack.settings.kafka.client_config(),
                                  "linger.ms": linger_ms, "batch.num.messages": 100_000})
        self.gen = TrafficGenerator(GeneratorConfig(seed=seed,
                                                    id_prefix=f"r{uuid.uuid4().hex[:6]}"))
        self.sent: list[str] = []
        self.halt = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        topic = self.stack.settings.topics.transactions
        encode = self.stack.codecs.transaction.encode
        start = time.monotonic()
        try:
            while not self.halt.is_set() and (self.total is None or len(self.sent) < self.total):
                due = int((time.monotonic() - start) * self.rate) + 1
                if self.total is not None:
                    due = min(due, self.total)
                now_ms = int(time.time() * 1000)
                while len(self.sent) < due:
                    txn = self.gen.next_transaction(now_ms)
                    try:
                        self.producer.produce(topic, key=txn["card_id"].encode(),
                                              value=encode(txn))
                    except BufferError:
                        self.producer.poll(0.01)
                        continue
                    self.sent.append(txn["transaction_id"])
                self.producer.poll(0)
                time.sleep(0.005)
            if self.producer.flush(60) != 0:
                raise RuntimeError("transactions not acknowledged by the broker")
        except BaseException as exc:
            self.error = exc


class Decisions(threading.Thread):
    """Every record of ``decisions`` from the beginning: (transaction_id, value bytes,
    who decided: ``model``, ``rules`` or ``fallback:<cause>``, decided_at in epoch s)."""

    def __init__(self, stack: Stack) -> None:
        super().__init__(daemon=True)
        self.stack = stack
        self.records: list[tuple[str, bytes, str, float]] = []
        self.halt = threading.Event()

    def run(self) -> None:
        s = self.stack.settings
        consumer = Consumer(s.kafka.consumer_config(f"restart-reader-{uuid.uuid4().hex[:6]}"))
        assign_all(consumer, [s.topics.decisions], OFFSET_BEGINNING)
        decode = self.stack.codecs.decision.decode
        try:
            while not self.halt.is_set():
                for msg in consumer.consume(1000, 0.05):
                    if msg.error():
                        continue
                    d = decode(msg.value())
                    at = d["decided_at"]
                    at = at.timestamp() if hasattr(at, "timestamp") else at / 1000.0
                    who = ("rules" if d["stage"] == "rules" else "model") if not d["fallback"] \
                        else next((r for r in d["reasons"] if r.startswith("fallback:")),
                                  "fallback:?")
                    self.records.append((d["transaction_id"], msg.value(), who, at))
        finally:
            consumer.close()

    def first_at_or_after(self, t: float, start_index: int = 0) -> float | None:
        for rec in self.records[start_index:]:
            if rec[3] >= t:
                return rec[3]
        return None


def _wait(cond: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.05)


def _workdir(args: argparse.Namespace) -> Path:
    return Path(tempfile.mkdtemp(prefix=f"fraudstream-{args.command}-"))


def _done(args: argparse.Namespace, workdir: Path) -> None:
    if args.keep:
        print(f"logs kept in {workdir}", flush=True)
    else:
        shutil.rmtree(workdir, ignore_errors=True)


# ---------------------------------------------------------------------------- restart


def run_restart(args: argparse.Namespace) -> dict[str, Any]:
    root = Path(args.root).resolve()
    workdir = _workdir(args)
    result: dict[str, Any] = {"root": str(root), "session_timeout_ms": args.session_timeout_ms,
                              "instance_id": args.instance_id, "rate": args.rate, "runs": {}}
    with Stack(args, workdir) as stack:
        reader = Decisions(stack)
        reader.start()
        worker = Worker(stack.settings, root, workdir / "worker.log")
        worker.start()
        traffic = Traffic(stack, args.rate, args.linger_ms, None)
        traffic.start()
        try:
            _wait(lambda: len(reader.records) >= args.warm, 180, "the first worker's decisions")
            for mode in ("kept", "wiped"):
                rows = result["runs"][mode] = []
                for i in range(args.runs):
                    time.sleep(args.between_s)
                    worker.kill()
                    if mode == "wiped":
                        shutil.rmtree(stack.settings.worker.data_dir, ignore_errors=True)
                    mark = len(reader.records)
                    t0 = worker.start()
                    _wait(lambda t0=t0, mark=mark: reader.first_at_or_after(t0, mark)
                          is not None, 180,
                          f"a decision after restart {mode} {i + 1}")
                    first = reader.first_at_or_after(t0, mark)
                    assert first is not None
                    phases = phase_times(worker.this_run())
                    row = {"first_decision_s": round(first - t0, 2)}
                    for name, _ in PHASES:
                        if name in phases:
                            row[f"{name}_s"] = round(phases[name] - t0, 2)
                    rows.append(row)
                    print(f"restart, data dir {mode}, run {i + 1}: " + ", ".join(
                        f"{k[:-2]} {v:.2f} s" for k, v in row.items()), flush=True)
        finally:
            traffic.halt.set()
            traffic.join(30)
            worker.stop()
            reader.halt.set()
            reader.join(10)
    result["median"] = {mode: {key: round(statistics.median(r[key] for r in rows if key in r), 2)
                               for key in rows[0]} for mode, rows in result["runs"].items()}
    for mode, med in result["median"].items():
        print(f"median, data dir {mode}: " + ", ".join(f"{k[:-2]} {v:.2f} s"
                                                       for k, v in med.items()), flush=True)
    _done(args, workdir)
    return result


# ---------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m fraudstream.loadtest.restart", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    def common(q: argparse.ArgumentParser) -> None:
        q.add_argument("--root", default=str(ROOT),
                       help="checkout whose worker runs (default: this one)")
        q.add_argument("--out", help="also write the result as JSON here")
        q.add_argument("--keep", action="store_true",
                       help="keep the work folder (logs) instead of deleting it")

    def stack(q: argparse.ArgumentParser) -> None:
        q.add_argument("--partitions", type=int, default=3)
        q.add_argument("--session-timeout-ms", type=int, default=6000)
        q.add_argument("--instance-id", default=None,
                       help="FRAUDSTREAM_WORKER_INSTANCE_ID for the worker (default: its "
                            "own default; 'none': dynamic membership)")
        q.add_argument("--linger-ms", type=int, default=50)

    q = sub.add_parser("imports", help="import time of the worker")
    common(q)
    q.add_argument("--runs", type=int, default=5)

    q = sub.add_parser("restart", help="restart to first decision")
    common(q)
    stack(q)
    q.add_argument("--runs", type=int, default=3)
    q.add_argument("--rate", type=float, default=200.0)
    q.add_argument("--warm", type=int, default=2000,
                   help="decisions before the first kill (state to restore)")
    q.add_argument("--between-s", type=float, default=3.0)

    q = sub.add_parser("crashloop", help="SIGKILLs under steady traffic")
    common(q)
    stack(q)
    q.add_argument("--events", type=int, default=100_000)
    q.add_argument("--rate", type=float, default=1000.0)
    q.add_argument("--kills", type=int, default=10)
    q.add_argument("--models", default=None, help="model registry (default: a small one, "
                                                  "trained into a temporary folder)")
    q.add_argument("--drain-timeout", type=float, default=300.0)
    q.add_argument("--settle-s", type=float, default=3.0)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.command == "crashloop":
        from fraudstream.loadtest.crashloop import run_crashloop

        result = run_crashloop(args)
    else:
        result = {"imports": run_imports, "restart": run_restart}[args.command](args)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
