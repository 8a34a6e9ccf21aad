"""``python -m loadtest``: how fast one worker decides, and up to what rate it keeps up.

One registry; the first phase (1-3) on one embedded broker and worker, then each live
run (4-6) on a broker and worker of its own:

1. **Pre-produce** ``--events`` generated transactions (``streams.generator``).
2. **Two baselines** on those same records, each a subprocess timed from its first record
   to its last: (a) a bare Faust agent that only consumes (loadtest/bare_faust.py);
   (b) a plain confluent-kafka loop: consume batches of 500, decode the Avro transaction
   with the project's codec, produce one small record each to a scratch topic
   (loadtest/baseline_kafka.py).
3. **Backlog drain**: ``fraudstream worker`` (rules, or the full cascade with ``--models``)
   decides the same records; its rate is taken on the decisions topic, first decision to
   last (group join excluded).
4. **Step mode** (``--steps``, on by default): the worker under open-loop Poisson
   traffic at increasing rates (``--step-start`` x ``--step-factor`` per step, or
   + ``--step-increment``), ``--step-seconds`` each. Open loop: the send times are drawn
   before the step (exponential gaps, seeded with ``--seed``) and never wait for
   decisions; the transactions are generated and encoded before the step too, so the
   sender only calls produce(). Every send is recorded; how late the sender was against
   its schedule is reported per step. After each step the worker drains: the step ends
   once every transaction sent got its decision (or after ``--drain-timeout``).
5. **Latency at 70% of saturation**: one more run at 0.7x the saturation rate (by budget;
   if no step met the budget, 0.7x the lag-only saturation, and the result says so).
6. ``--latency-ratios``: optional extra runs at fixed ratios of the backlog drain rate.

**Fresh broker per live run** (default): after the backlog drain its worker and broker
stop. Each live run then starts a new embedded broker (same topic names, created anew;
the registry is kept), a new worker (new app id and group, empty data dir, the same
models and batch max), waits until ``WARMUP`` transactions got decisions (not measured),
runs, drains, and stops both. Tansu lists every stored record batch of a partition on each
fetch, so on a shared broker each run would pay for the batches of all those before it.
``--shared-broker``: the old method, every live run on the drain's broker and worker.

**Latency**: end-to-end = decision received by this process minus the transaction's Kafka
timestamp (the decision's ``source_timestamp``); "until decided" = the decision's
``decided_at - source_timestamp``. A run's percentiles cover every decision of the
transactions it sent, including those that arrived while it drained.

**Backlog** = transactions sent minus decisions received, sampled every 0.1 s. Consumer lag
read from the embedded broker is not used: Tansu understates high watermarks.

**Lag rule**: a step's lag grew when both hold:
- over the second half of its sending window, the decided rate is below 97% of the sent
  rate (slopes of least-squares lines through the received and sent counts), and
- at the end of its sending window the backlog is above 0.5 s of traffic at the step rate.
In steady state the backlog is rate x mean latency (Little's law) and does not trend;
the first condition catches a trend, the second ignores one too small to matter (or
the noise of decisions arriving in batches). A step whose backlog did not drain within
``--drain-timeout`` also counts as grown.

**Saturation** (by budget) = the highest step rate whose end-to-end p99 is within the
budget (``--budget-ms``, default ``settings.scoring.budget_ms``; the worker gets the same
budget) and whose lag did not grow. **Lag-only saturation** = the highest step rate whose
lag did not grow, whatever its p99. Both are reported as ratios to each baseline, as is
the backlog drain rate. Stepping stops after ``--stop-after`` consecutive steps that fail
both criteria, after two consecutive steps whose lag grew, after a step that did not
drain, or after ``--max-steps``.

**RSS**: each worker's VmRSS (its process and its children, /proc) every 0.5 s from its
start to its stop: peak and at end; the summary gives the highest peak and whose it was.

Live progress goes to stderr, one line a second. The summary goes to stdout; everything
goes to ``results/bench-YYYYmmdd-HHMMSS/``: ``result.json`` and PNG plots
(loadtest/plots.py). Numbers depend on this machine's load: compare ratios of one run.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import select
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, OFFSET_END, Consumer, Producer

from loadtest import plots
from loadtest.proc import tree_cpu_s, tree_rss_kb
from schemas.codec import Codecs, make_registry
from streams.broker import EmbeddedBroker, free_port
from streams.generator import GeneratorConfig, TrafficGenerator
from streams.processes import die_with_parent, stop_process
from streams.registry import EmbeddedRegistry
from streams.settings import Settings, TopicSettings
from streams.status import quantile as percentile
from streams.topics import assign_all, ensure_topics

ROOT = Path(__file__).resolve().parent.parent

LAG_RATE_RATIO = 0.97  # decided / sent rate over a step's second half, below: trending
LAG_BACKLOG_S = 0.5  # backlog at a step's end, in seconds of its traffic, above: not noise
SAMPLE_S = 0.1  # sent / received counts sampled this often
RSS_EVERY_S = 0.5
WARMUP = 50  # transactions a fresh worker must decide before its run starts

#: defaults, and those of --quick (a smoke run of 1-2 minutes)
DEFAULTS = {"events": 50_000, "step_seconds": 15.0, "max_steps": 12, "latency_seconds": 30.0,
            "stop_after": 2, "drain_timeout": 60.0}
QUICK = {"events": 10_000, "step_seconds": 8.0, "max_steps": 5, "latency_seconds": 10.0,
         "stop_after": 1, "drain_timeout": 30.0}


def _spawn(args: list[str], settings: Settings, log: Path) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FRAUDSTREAM_")}
    env.update(settings.to_env())
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, *args], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=out, start_new_session=True, preexec_fn=die_with_parent)


def _json_line(proc: subprocess.Popen[bytes], timeout_s: float,
               what: str = "the bare Faust consumer") -> dict:
    """The first line of ``proc``'s stdout that holds a JSON object."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 1.0)
        if not ready:
            continue
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{what} exited without a result")
        start = line.find(b"{")
        if start >= 0:
            return json.loads(line[start:])
    raise TimeoutError(f"no result from {what}")


def _progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def pre_produce(settings: Settings, codecs: Codecs, n: int, seed: int) -> None:
    gen = TrafficGenerator(GeneratorConfig(seed=seed, id_prefix=f"b{uuid.uuid4().hex[:6]}"))
    producer = Producer({**settings.kafka.client_config(), "linger.ms": 20})
    now = int(time.time() * 1000)
    topic = settings.topics.transactions
    for i in range(n):
        txn = gen.next_transaction(now + i // 50)
        while True:
            try:
                producer.produce(topic, key=txn["card_id"].encode(),
                                 value=codecs.transaction.encode(txn))
                break
            except BufferError:
                producer.poll(0.05)
    assert producer.flush(60) == 0


def read_decisions(settings: Settings, codecs: Codecs, stop: Callable[[list], bool],
                   timeout_s: float) -> list[tuple[float, dict]]:
    """(receive time, decision) from the start of ``decisions`` until ``stop(received)``
    says so or the timeout."""
    consumer = Consumer(settings.kafka.consumer_config(f"bench-{uuid.uuid4().hex[:6]}"))
    assign_all(consumer, [settings.topics.decisions], OFFSET_BEGINNING)
    out: list[tuple[float, dict]] = []
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline and not stop(out):
            # consume() waits for its whole count or the timeout: a short timeout keeps
            # this reader from adding latency of its own
            for msg in consumer.consume(1000, 0.005):
                if not msg.error():
                    out.append((time.time(), codecs.decision.decode(msg.value())))
    finally:
        consumer.close()
    return out


# ------------------------------------------------------------------------ RSS, CPU

class RssSampler(threading.Thread):
    """Samples a process tree's RSS every ``RSS_EVERY_S`` until stopped. ``label`` names
    the worker (the run it served); ``marks`` are (wall clock, label) of events in its life."""

    def __init__(self, pid: int, label: str) -> None:
        super().__init__(name="rss-sampler", daemon=True)
        self.pid, self.label = pid, label
        self.started_at = time.time()
        self.samples: list[tuple[float, int]] = []  # (wall clock, kB)
        self.marks: list[tuple[float, str]] = []
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            kb = tree_rss_kb(self.pid)
            if kb:
                self.samples.append((time.time(), kb))
            self.done.wait(RSS_EVERY_S)

    def stop(self) -> None:
        self.done.set()
        if self.is_alive():
            self.join(5)

    def report(self) -> dict:
        """Peak and end, the series (seconds since the worker started, MB) and the marks."""
        mb = [kb / 1024 for _t, kb in self.samples]
        return {"worker": self.label, "peak_mb": max(mb, default=None),
                "end_mb": mb[-1] if mb else None, "samples": len(mb),
                "series_mb": [[round(t - self.started_at, 1), round(kb / 1024, 1)]
                              for t, kb in self.samples],
                "marks": [[round(t - self.started_at, 1), m] for t, m in self.marks]}


def rss_report(samplers: list[RssSampler]) -> dict:
    """Every worker's RSS, and the highest peak over them: which worker, its end."""
    workers = [s.report() for s in samplers]
    peak = max((w for w in workers if w["peak_mb"] is not None),
               key=lambda w: w["peak_mb"], default=None)
    return {"peak_mb": peak and peak["peak_mb"], "end_mb": peak and peak["end_mb"],
            "peak_worker": peak and peak["worker"], "every_s": RSS_EVERY_S,
            "workers": workers}


# --------------------------------------------------------------------- live traffic

class DecisionReader(threading.Thread):
    """Reads ``decisions`` from its current end while traffic runs. Keeps, for each decision
    of a transaction sent at or after ``since`` (wall clock), the tuple (received,
    source_timestamp, decided_at, fallback, batch_ms, features_ms): times in seconds since
    the epoch, then the worker's own processing time of the decision's batch until the
    decision was encoded, and of its feature stage (the decision's ``timings_ms``)."""

    def __init__(self, settings: Settings, codecs: Codecs, since: float) -> None:
        super().__init__(name="decisions-reader", daemon=True)
        self.settings, self.codecs, self.since = settings, codecs, since
        self.records: list[tuple[float, float, float, bool, float, float]] = []
        self.ready = threading.Event()
        self.done = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        consumer = Consumer(
            self.settings.kafka.consumer_config(f"bench-{uuid.uuid4().hex[:6]}"))
        try:
            assign_all(consumer, [self.settings.topics.decisions], OFFSET_END)
            consumer.consume(1, 0.5)  # resolves the end offsets before anything is produced
            self.ready.set()
            decode, since, records = self.codecs.decision.decode, self.since, self.records
            while not self.done.is_set():
                # consume() waits for its whole count or the timeout: a short timeout
                # keeps this reader from adding latency of its own
                msgs = consumer.consume(1000, 0.005)
                if not msgs:
                    continue
                now = time.time()
                for msg in msgs:
                    if msg.error():
                        continue
                    d = decode(msg.value())
                    src = d["source_timestamp"].timestamp()
                    # the embedded broker's end offset can lie inside the last batch:
                    # older decisions may come first, they are skipped
                    if src >= since:
                        t = d["timings_ms"]
                        records.append((now, src, d["decided_at"].timestamp(), d["fallback"],
                                        t.get("total", 0.0), t.get("features", 0.0)))
        except BaseException as exc:  # reported by LiveTraffic._watch
            self.error = exc
        finally:
            self.ready.set()
            consumer.close()


def poisson_schedule(rng: random.Random, rate: float, seconds: float) -> list[float]:
    """Send offsets (s) of a Poisson process at ``rate`` over ``seconds``."""
    out: list[float] = []
    t = rng.expovariate(rate)
    while t < seconds:
        out.append(t)
        t += rng.expovariate(rate)
    return out


def lag_verdict(samples: list[tuple[float, int, int]], start: float, end: float,
                rate: float) -> dict:
    """The lag rule (module docstring) on the (time, sent, received) samples of one
    sending window."""
    mid = (start + end) / 2
    half = [s for s in samples if mid <= s[0] <= end]
    if len(half) < 3:
        return {"lag_grew": False, "decided_over_sent_2nd_half": None,
                "backlog_end": None, "backlog_end_s": None}
    ts = [t - mid for t, _s, _r in half]
    sent_slope = statistics.linear_regression(ts, [s for _t, s, _r in half]).slope
    recv_slope = statistics.linear_regression(ts, [r for _t, _s, r in half]).slope
    ratio = recv_slope / sent_slope if sent_slope > 0 else 1.0
    backlog_end = half[-1][1] - half[-1][2]
    backlog_s = backlog_end / rate
    return {"lag_grew": ratio < LAG_RATE_RATIO and backlog_s > LAG_BACKLOG_S,
            "decided_over_sent_2nd_half": ratio, "sent_rate_2nd_half": sent_slope,
            "decided_rate_2nd_half": recv_slope, "backlog_end": backlog_end,
            "backlog_end_s": backlog_s}


def _latency_stats(lat: list[float], decided: list[float]) -> dict:
    if not lat:
        return {k: None for k in ("p50_ms", "p90_ms", "p99_ms", "max_ms", "mean_ms",
                                  "to_decided_p50_ms", "to_decided_p99_ms")}
    return {"p50_ms": percentile(lat, 0.50), "p90_ms": percentile(lat, 0.90),
            "p99_ms": percentile(lat, 0.99), "max_ms": max(lat),
            "mean_ms": statistics.fmean(lat),
            "to_decided_p50_ms": percentile(decided, 0.50),
            "to_decided_p99_ms": percentile(decided, 0.99)}


class LiveTraffic:
    """Open-loop Poisson traffic into one running worker on one broker, and the decisions
    coming back.

    One producer and one decisions reader for every run made through it, so its runs form
    one timeline (a "segment"). With a fresh broker per run (the default) each run gets its
    own; with ``--shared-broker`` one serves every run. ``rng`` (send times) and ``gen``
    (transactions) are shared by all, so both modes send the same traffic."""

    def __init__(self, settings: Settings, codecs: Codecs, rng: random.Random,
                 gen: TrafficGenerator, worker: subprocess.Popen[bytes],
                 broker_pid: int | None) -> None:
        self.settings, self.codecs, self.worker = settings, codecs, worker
        self.broker_pid = broker_pid
        self.topic = settings.topics.transactions
        self.rng, self.gen = rng, gen
        self.producer = Producer({**settings.kafka.client_config(), "linger.ms": 5})
        self.t0 = time.time()
        self.reader = DecisionReader(settings, codecs, since=self.t0 - 0.002)
        self.reader.start()
        self.reader.ready.wait(30)
        self.sent = 0
        self.sends: list[float] = []  # wall clock of every send
        self.samples: list[tuple[float, int, int]] = []  # (wall clock, sent, received)
        self.runs: list[dict] = []
        self.latencies: dict[str, list[float]] = {}  # run label -> e2e latencies, ms
        self._send_error: BaseException | None = None

    @property
    def received(self) -> int:
        return len(self.reader.records)

    def _cpu(self) -> dict[str, float]:
        """CPU seconds so far: the worker, the broker, this process (sender, reader)."""
        out = {"worker": tree_cpu_s(self.worker.pid), "bench": sum(os.times()[:2])}
        if self.broker_pid is not None:
            out["broker"] = tree_cpu_s(self.broker_pid)
        return out

    def _send(self, schedule: list[float], keys: list[bytes], values: list[bytes],
              late: list[float], seconds: float) -> None:
        produce, poll, topic = self.producer.produce, self.producer.poll, self.topic
        start_mono, start_wall = time.monotonic(), time.time()
        i, n = 0, len(schedule)
        try:
            while i < n:
                now = time.monotonic() - start_mono
                if schedule[i] > now:
                    poll(0)
                    time.sleep(min(schedule[i] - now, 0.001))
                    continue
                while i < n and schedule[i] <= now:  # every send that is due
                    try:
                        produce(topic, key=keys[i], value=values[i])
                    except BufferError:  # local queue full: serve callbacks, retry
                        poll(0.01)
                        continue
                    late.append(now - schedule[i])
                    self.sends.append(start_wall + now)
                    self.sent += 1
                    i += 1
                poll(0)
            while (left := seconds - (time.monotonic() - start_mono)) > 0:
                poll(0)
                time.sleep(min(left, 0.01))
            self.producer.flush(30)
        except BaseException as exc:  # reported by _watch
            self._send_error = exc

    def _watch(self, label: str, rate: float, start: float,
               until: Callable[[], bool]) -> None:
        """Samples the counts every SAMPLE_S and prints one progress line a second."""
        records = self.reader.records
        next_print = time.monotonic() + 1.0
        last = (time.time(), self.sent, self.received)
        while not until():
            time.sleep(SAMPLE_S)
            now, sent, recv = time.time(), self.sent, self.received
            self.samples.append((now, sent, recv))
            for err in (self.reader.error, self._send_error):
                if err is not None:
                    raise RuntimeError(f"load generator failed: {err!r}") from err
            if self.worker.poll() is not None:
                raise RuntimeError(f"the worker exited with code {self.worker.returncode}")
            if time.monotonic() >= next_print:
                next_print += 1.0
                dt = now - last[0]
                recent = [(r[0] - r[1]) * 1000.0 for r in records[last[2]:recv]]
                p99 = f"{percentile(recent, 0.99):7.1f} ms" if recent else "      - ms"
                shown = f"{rate:>8,.0f}/s" if rate else " " * 10
                _progress(f"  {label:>18} {shown}  t {now - start:5.1f}s  "
                          f"sent {(sent - last[1]) / dt:>7,.0f}/s  "
                          f"decided {(recv - last[2]) / dt:>7,.0f}/s  p99(1s) {p99}  "
                          f"backlog {sent - recv:>7,}")
                last = (now, sent, recv)

    def drain(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        self._watch("drain", 0.0, time.time(),
                    lambda: self.received >= self.sent or time.monotonic() > deadline)
        return self.received >= self.sent

    def run(self, label: str, short: str, kind: str, rate: float, seconds: float,
            drain_timeout: float) -> dict:
        """One open-loop run at ``rate`` for ``seconds``, then a drain; its numbers."""
        if self.received < self.sent:  # what an earlier run left undecided
            self.drain(drain_timeout)
        schedule = poisson_schedule(self.rng, rate, seconds)
        base_ms = int(time.time() * 1000)
        keys, values = [], []
        encode = self.codecs.transaction.encode
        for offset in schedule:
            txn = self.gen.next_transaction(base_ms + int(offset * 1000))
            keys.append(txn["card_id"].encode())
            values.append(encode(txn))
        late: list[float] = []
        sent0, recv0 = self.sent, self.received
        sender = threading.Thread(target=self._send, name="sender", daemon=True,
                                  args=(schedule, keys, values, late, seconds))
        cpu0 = self._cpu()
        start = time.time()
        sender.start()
        self._watch(label, rate, start, lambda: not sender.is_alive())
        sender.join()
        end = start + seconds
        cpu1, elapsed = self._cpu(), time.time() - start
        # share of one core each used while this run sent (100 = one full core)
        cpu = {k: (cpu1[k] - cpu0[k]) / elapsed * 100.0 for k in cpu1}
        in_window = max((r for t, _s, r in self.samples if start <= t <= end),
                        default=recv0) - recv0
        drained = self.drain(drain_timeout)
        drain_s = time.time() - end
        sent = self.sent - sent0
        recs = [r for r in self.reader.records[recv0:] if r[1] >= start - 0.002]
        lat = [(r[0] - r[1]) * 1000.0 for r in recs]
        decided = [(r[2] - r[1]) * 1000.0 for r in recs]
        batch = [r[4] for r in recs]
        features = [r[5] for r in recs]
        self.latencies[label] = lat
        verdict = lag_verdict(self.samples, start, end, rate)
        if not drained:
            verdict["lag_grew"] = True
        result = {
            "label": label, "short": short, "kind": kind, "rate": rate, "seconds": seconds,
            "start_s": start - self.t0, "end_s": end - self.t0,
            "sent": sent, "sent_rate": sent / seconds,
            "received_in_window": in_window, "throughput": in_window / seconds,
            "decided": len(recs), "drained": drained, "drain_s": drain_s,
            "fallbacks": sum(1 for r in recs if r[3]),
            **_latency_stats(lat, decided), **verdict,
            "worker_batch_p50_ms": percentile(batch, 0.50) if batch else None,
            "worker_batch_p99_ms": percentile(batch, 0.99) if batch else None,
            "worker_features_p50_ms": percentile(features, 0.50) if features else None,
            "sender_late_p99_ms": percentile(late, 0.99) * 1000.0 if late else None,
            "sender_late_max_ms": max(late) * 1000.0 if late else None,
            "cpu_pct": cpu,
        }
        self.runs.append(result)
        return result

    def close(self) -> None:
        self.reader.done.set()
        self.reader.join(10)
        self.producer.flush(10)
        del self.producer  # before the broker stops: no reconnect attempts in the log

    def buckets(self) -> list[dict]:
        """Per 1 s bucket since t0: sent, decided (by decided_at), received, the e2e
        p50/p90/p99 of the decisions received in it, and the backlog at its end."""
        t0 = self.t0
        end = max([s[0] for s in self.samples], default=t0)
        n = int(end - t0) + 1
        sent = [0] * n
        for t in self.sends:
            if 0 <= (k := int(t - t0)) < n:
                sent[k] += 1
        decided, received = [0] * n, [0] * n
        lat: list[list[float]] = [[] for _ in range(n)]
        for r, s, d, *_rest in self.reader.records:
            if 0 <= (k := int(d - t0)) < n:
                decided[k] += 1
            if 0 <= (k := int(r - t0)) < n:
                received[k] += 1
                lat[k].append((r - s) * 1000.0)
        backlog: list[int | None] = [None] * n
        for t, s, r in self.samples:
            if 0 <= (k := int(t - t0)) < n:
                backlog[k] = s - r
        return [{"t": k, "sent": sent[k], "decided": decided[k], "received": received[k],
                 "p50_ms": percentile(lat[k], 0.50) if lat[k] else None,
                 "p90_ms": percentile(lat[k], 0.90) if lat[k] else None,
                 "p99_ms": percentile(lat[k], 0.99) if lat[k] else None,
                 "backlog": backlog[k]} for k in range(n)]


# --------------------------------------------------- where the live runs go: brokers

def warm_up(settings: Settings, codecs: Codecs, worker: subprocess.Popen[bytes], seed: int,
            timeout_s: float) -> dict:
    """Sends ``WARMUP`` transactions and waits for their decisions: then the worker has
    joined its group and decided a batch on every partition. Measured by nothing else."""
    start = time.monotonic()
    pre_produce(settings, codecs, WARMUP, seed)
    got = read_decisions(settings, codecs,
                         lambda out: len(out) >= WARMUP or worker.poll() is not None, timeout_s)
    if worker.poll() is not None:
        raise RuntimeError(f"the worker exited with code {worker.returncode} while warming up")
    if len(got) < WARMUP:
        raise TimeoutError(f"{len(got)} of {WARMUP} warm-up decisions in {timeout_s:g}s")
    return {"transactions": WARMUP, "seconds": time.monotonic() - start}


class Runs:
    """Where the live runs (steps, 70% run, ratio runs) go. ``run()`` takes the arguments
    of :meth:`LiveTraffic.run`; ``segments`` are the LiveTraffic used, in order (one per
    broker); ``samplers`` the RSS samplers of the workers this object started."""

    fresh = False

    def __init__(self) -> None:
        self.segments: list[LiveTraffic] = []
        self.samplers: list[RssSampler] = []

    def run(self, label: str, short: str, kind: str, rate: float, seconds: float,
            drain_timeout: float) -> dict:
        raise NotImplementedError

    def close(self) -> None:
        """Stops whatever is still running."""


class SharedRuns(Runs):
    """``--shared-broker``: every run on the backlog drain's broker and worker."""

    def __init__(self, live: LiveTraffic, rss: RssSampler) -> None:
        super().__init__()
        self.live, self.rss = live, rss
        self.segments.append(live)
        rss.label = f"{rss.label} and every live run"

    def run(self, label: str, short: str, kind: str, rate: float, seconds: float,
            drain_timeout: float) -> dict:
        result = self.live.run(label, short, kind, rate, seconds, drain_timeout)
        self.rss.marks.append((self.live.t0 + result["start_s"], short))
        result.update(fresh_broker=False, segment=1)
        return result

    def close(self) -> None:
        self.live.close()


class FreshRuns(Runs):
    """The default: each run on its own fresh broker (same topic names, created anew) and
    its own fresh worker (new app id and group, empty data dir; same models and batch max),
    ready once ``WARMUP`` transactions got decisions; both stopped after the run's drain."""

    fresh = True

    def __init__(self, base: Settings, codecs: Codecs, rng: random.Random,
                 gen: TrafficGenerator, workdir: Path, seed: int) -> None:
        super().__init__()
        self.base, self.codecs, self.rng, self.gen = base, codecs, rng, gen
        self.workdir, self.seed = workdir, seed
        self.count = 0

    def run(self, label: str, short: str, kind: str, rate: float, seconds: float,
            drain_timeout: float) -> dict:
        self.count += 1
        k, began = self.count, time.monotonic()
        with EmbeddedBroker(log_path=self.workdir / f"broker-{k}.log") as broker:
            assert broker.process is not None
            settings = self.base.replace(
                kafka={"bootstrap": broker.bootstrap},
                worker={"app_id": f"{self.base.worker.app_id}-{k}",
                        "data_dir": self.workdir / f"state-{k}", "metrics_port": free_port()})
            ensure_topics(settings)
            worker = _spawn(["-m", "streams.cli", "worker", "--loglevel", "info"], settings,
                            self.workdir / f"worker-{k}.log")
            rss = RssSampler(worker.pid, label)
            self.samplers.append(rss)
            rss.start()
            live: LiveTraffic | None = None
            try:
                warm = warm_up(settings, self.codecs, worker, self.seed + 1000 + k, 180)
                ready_s = time.monotonic() - began
                _progress(f"  fresh broker and worker ready in {ready_s:.1f}s "
                          f"({WARMUP} warm-up decisions, not measured)")
                live = LiveTraffic(settings, self.codecs, self.rng, self.gen, worker,
                                   broker.process.pid)
                result = live.run(label, short, kind, rate, seconds, drain_timeout)
                rss.marks.append((live.t0 + result["start_s"], short))
            finally:
                if live is not None:
                    live.close()
                    self.segments.append(live)
                rss.stop()
                stop_process(worker)
        result.update(fresh_broker=True, segment=len(self.segments), ready_s=ready_s,
                      warm_up=warm, app_id=settings.worker.app_id)
        return result


def timeline(segments: list[LiveTraffic]) -> tuple[list[dict], list[dict], list[dict]]:
    """The per-second buckets and the runs (start_s, end_s) of every segment, placed end to
    end: each segment's times counted from its own start, plus the length of those before
    it (re-based; with one segment, seconds since it started). Also, per segment, its
    wall-clock start and its offset."""
    buckets: list[dict] = []
    runs: list[dict] = []
    segs: list[dict] = []
    offset = 0
    for i, live in enumerate(segments, 1):
        own = live.buckets() if live.runs else []
        buckets += [b | {"t": b["t"] + offset, "segment": i} for b in own]
        runs += [r | {"start_s": r["start_s"] + offset, "end_s": r["end_s"] + offset}
                 for r in live.runs]
        segs.append({"segment": i, "t0": live.t0, "offset_s": offset,
                     "runs": [r["label"] for r in live.runs]})
        offset += len(own)
    return buckets, runs, segs


# ------------------------------------------------------------------------ step mode

def step_rates(start: float, factor: float, increment: float) -> Iterator[float]:
    """start, then x factor (or + increment when it is set) per step."""
    for k in itertools.count():
        yield start + k * increment if increment > 0 else start * factor**k


def run_steps(live: Runs, args: argparse.Namespace, budget_ms: float) -> list[dict]:
    steps: list[dict] = []
    both_failed = lag_grew = 0
    rates = step_rates(args.step_start, args.step_factor, args.step_increment)
    for i, rate in zip(range(args.max_steps), rates, strict=False):
        rate = round(rate)
        _progress(f"step {i + 1}/{args.max_steps}: {rate:,}/s for {args.step_seconds:g}s")
        step = live.run(f"step {i + 1}", f"{rate:,}/s", "step", rate, args.step_seconds,
                        args.drain_timeout)
        step["within_budget"] = step["p99_ms"] is not None and step["p99_ms"] <= budget_ms
        steps.append(step)
        _progress(f"  -> p99 {_ms(step['p99_ms'])}, lag grew: {step['lag_grew']}, "
                  f"drained in {step['drain_s']:.1f}s; worker batch time p50 "
                  f"{_ms(step['worker_batch_p50_ms'])}, p99 {_ms(step['worker_batch_p99_ms'])}; "
                  f"CPU %: {_cpu(step)}")
        both_failed = both_failed + 1 if step["lag_grew"] and not step["within_budget"] else 0
        lag_grew = lag_grew + 1 if step["lag_grew"] else 0
        if not step["drained"]:
            step["stopped"] = f"not drained within {args.drain_timeout:g}s"
        elif both_failed >= args.stop_after:
            step["stopped"] = f"{both_failed} step(s) in a row failed both criteria"
        elif lag_grew >= 2:
            step["stopped"] = "lag grew two steps in a row"
        if "stopped" in step:
            _progress(f"  stepping stops: {step['stopped']}")
            break
    return steps


def saturation(steps: list[dict], budget_ms: float) -> dict:
    by_budget = [s for s in steps if s["within_budget"] and not s["lag_grew"]]
    by_lag = [s for s in steps if not s["lag_grew"]]

    def pick(found: list[dict]) -> dict | None:
        if not found:
            return None
        s = max(found, key=lambda s: s["rate"])
        return {"rate": s["rate"], "step": s["label"], "throughput": s["throughput"],
                "p99_ms": s["p99_ms"]}

    out = {"budget_ms": budget_ms, "by_budget": pick(by_budget), "lag_only": pick(by_lag)}
    if not steps:
        out["note"] = "no steps were run"
    elif out["by_budget"] is None:
        out["note"] = f"no step met the budget (p99 <= {budget_ms:g} ms and lag not growing)"
    if steps and out["lag_only"] is None:
        out["note_lag"] = "lag grew at every step: the first step's rate is already too high"
    return out


def live_runs(runs: Runs, args: argparse.Namespace, budget: float, result: dict) -> None:
    """Steps, the 70% run and the ratio runs, into ``result``."""
    result["steps"] = run_steps(runs, args, budget) if args.steps else []
    sat = saturation(result["steps"], budget)
    result["saturation"] = sat
    basis, base = ("by budget", sat["by_budget"]) if sat["by_budget"] else (
        "lag only: no step met the budget", sat["lag_only"])
    result["latency_at_70pct"] = None
    if args.steps and base is not None:
        target = round(0.7 * base["rate"])
        _progress(f"latency at 70% of saturation ({basis}): {target:,}/s for "
                  f"{args.latency_seconds:g}s")
        result["latency_at_70pct"] = runs.run(
            "70% of saturation", f"70%: {target:,}/s", "latency", target,
            args.latency_seconds, args.drain_timeout) | {"basis": basis}
    elif args.steps:
        result["latency_at_70pct_note"] = "lag grew at every step: no rate to take 70% of"
    result["latency"] = []
    for ratio in args.latency_ratios:
        target = round(result["worker"]["rate"] * ratio)
        _progress(f"latency at {ratio:g}x the drain rate: {target:,}/s for "
                  f"{args.latency_seconds:g}s")
        result["latency"].append(runs.run(
            f"{ratio:g}x drain", f"{ratio:g}x: {target:,}/s", "ratio", target,
            args.latency_seconds, args.drain_timeout) | {"ratio": ratio})


# -------------------------------------------------------------------------- report

def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:,.1f} ms" if v < 1000 else f"{v:,.0f} ms"


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _cpu(run: dict) -> str:
    return ", ".join(f"{k} {v:.0f}" for k, v in run["cpu_pct"].items())


def _cpu_short(run: dict) -> str:
    c = run["cpu_pct"]
    return "/".join(f"{c[k]:.0f}" if k in c else "-" for k in ("worker", "broker", "bench"))


def _x(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


def print_summary(result: dict, what: str) -> None:
    b, k = result["bare_faust"], result["kafka_loop"]
    w, sat, budget = result["worker"], result["saturation"], result["budget_ms"]
    print()
    print(f"baselines on the same {result['events']:,} pre-produced transactions")
    print(f"  bare Faust agent, consume only            {b['rate']:>9,.0f}/s")
    print(f"  Kafka loop: consume, decode, produce      {k['rate']:>9,.0f}/s   (to the final "
          f"flush; {k['rate_until_produced']:,.0f}/s until the last produce call)")
    print(f"worker ({what})  {'':>22}vs bare Faust  vs Kafka loop")
    rows = [("backlog drain", w["rate"], "drain")]
    if result["steps"]:
        rows += [(f"saturation, p99 <= {budget:g} ms", (sat["by_budget"] or {}).get("rate"),
                  "saturation_by_budget"),
                 ("saturation, lag only", (sat["lag_only"] or {}).get("rate"),
                  "saturation_lag_only")]
    for name, rate, key in rows:
        r = result["ratios"][key]
        shown = "none" if rate is None else f"{rate:,.0f}/s"
        print(f"  {name:<30} {shown:>11}   {_x(r['vs_bare_faust']):>12}  "
              f"{_x(r['vs_kafka_loop']):>12}")
    for note in (sat.get("note"), sat.get("note_lag")):
        if note and result["steps"]:
            print(f"  NOTE: {note}")
    live = [*result["steps"], *filter(None, [result.get("latency_at_70pct")]),
            *result["latency"]]
    if live and result["broker"] == "shared":
        print()
        print("live runs: all on the backlog drain's broker and worker (--shared-broker)")
    elif live:
        ready = [r["ready_s"] for r in live]
        print()
        print(f"live runs: each on a fresh broker and worker, ready in {min(ready):.1f}-"
              f"{max(ready):.1f}s ({result['warm_up_transactions']} warm-up decisions each, "
              "not measured)")
    if result["steps"]:
        print()
        print(f"steps (open-loop Poisson, {result['step_seconds']:g}s each; lag grew = decided "
              f"< {LAG_RATE_RATIO:.0%} of sent over the 2nd half and backlog > "
              f"{LAG_BACKLOG_S:g}s of traffic at the end)")
        print(f"  {'rate':>8} {'sent':>7} {'decided/s':>9} {'p50':>10} {'p90':>10} "
              f"{'p99':>10} {'decided p50/p99':>20} {'backlog end':>11} {'lag':>5} "
              f"{'budget':>6} {'send late p99':>13} {'CPU% wkr/brk/gen':>16}")
        for s in result["steps"]:
            td = f"{_ms(s['to_decided_p50_ms'])} / {_ms(s['to_decided_p99_ms'])}"
            backlog = "-" if s["backlog_end_s"] is None else f"{s['backlog_end_s']:.2f}s"
            print(f"  {s['rate']:>8,.0f} {s['sent']:>7,} {s['throughput']:>9,.0f} "
                  f"{_ms(s['p50_ms']):>10} {_ms(s['p90_ms']):>10} {_ms(s['p99_ms']):>10} "
                  f"{td:>20} {backlog:>11} {'grew' if s['lag_grew'] else 'ok':>5} "
                  f"{'ok' if s['within_budget'] else 'over':>6} "
                  f"{_ms(s['sender_late_p99_ms']):>13} {_cpu_short(s):>16}")
    lt = result.get("latency_at_70pct")
    if lt:
        print()
        print(f"latency at 70% of saturation ({lt['basis']}): {lt['rate']:,.0f}/s, "
              f"{lt['decided']:,} decisions: p50 {_ms(lt['p50_ms'])}, p90 {_ms(lt['p90_ms'])}, "
              f"p99 {_ms(lt['p99_ms'])} (until decided p50 {_ms(lt['to_decided_p50_ms'])}, "
              f"p99 {_ms(lt['to_decided_p99_ms'])}); lag grew: {lt['lag_grew']}; worker batch "
              f"time p50 {_ms(lt['worker_batch_p50_ms'])}, p99 {_ms(lt['worker_batch_p99_ms'])}; "
              f"CPU %: {_cpu(lt)}")
    elif result["steps"]:
        print()
        print(f"latency at 70% of saturation: not run ({result.get('latency_at_70pct_note')})")
    for lt in result["latency"]:
        print(f"latency at {lt['ratio']:.2f}x the drain rate, {lt['rate']:,.0f}/s "
              f"({lt['decided']:,} decisions): p50 {_ms(lt['p50_ms'])}, "
              f"p90 {_ms(lt['p90_ms'])}, p99 {_ms(lt['p99_ms'])} (until decided p50 "
              f"{_ms(lt['to_decided_p50_ms'])}, p99 {_ms(lt['to_decided_p99_ms'])}; worker "
              f"batch time p50 {_ms(lt['worker_batch_p50_ms'])}, "
              f"p99 {_ms(lt['worker_batch_p99_ms'])}; CPU %: {_cpu(lt)})")
    rss = result["rss"]
    if rss["peak_mb"] is not None:
        n = len(rss["workers"])
        print(f"worker RSS: peak {rss['peak_mb']:,.0f} MB, at end {rss['end_mb']:,.0f} MB "
              f"(the worker of {rss['peak_worker']}; highest of {n} worker{'s' * (n > 1)})")
    load = result["loadavg"]
    print(f"load average (1 min): {load['start'][0]:.2f} at start, {load['end'][0]:.2f} at end "
          f"({os.cpu_count()} CPUs)")


# ---------------------------------------------------------------------------- main

def _ratios(rate: float | None, result: dict) -> dict:
    return {"rate": rate, "vs_bare_faust": _ratio(rate, result["bare_faust"]["rate"]),
            "vs_kafka_loop": _ratio(rate, result["kafka_loop"]["rate"])}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m loadtest",
                                     description=__doc__.split("\n")[0].replace("``", ""))
    parser.add_argument("--quick", action="store_true",
                        help="a 1-2 minute smoke run: " + ", ".join(
                            f"--{k.replace('_', '-')} {v:g}" for k, v in QUICK.items()))
    parser.add_argument("--events", type=int, help=f"pre-produced (default {DEFAULTS['events']})")
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--results", type=Path, default=ROOT / "results",
                        help="a bench-YYYYmmdd-HHMMSS/ folder is made in it")
    parser.add_argument("--batch-max", type=int, default=500,
                        help="FRAUDSTREAM_WORKER_BATCH_MAX of the worker")
    parser.add_argument("--models", type=Path, default=None,
                        help="a model registry with an ACTIVE version (the full cascade); "
                             "default: the rules alone")
    parser.add_argument("--budget-ms", type=float, default=Settings().scoring.budget_ms,
                        help="end-to-end p99 budget for saturation, also the worker's "
                             "FRAUDSTREAM_SCORING_BUDGET_MS (default %(default)g)")
    parser.add_argument("--steps", action=argparse.BooleanOptionalAction, default=True,
                        help="step mode (default on)")
    parser.add_argument("--step-start", type=float, default=500.0, help="first rate, /s")
    parser.add_argument("--step-factor", type=float, default=1.5, help="rate x this per step")
    parser.add_argument("--step-increment", type=float, default=0.0,
                        help="rate + this per step instead of the factor")
    parser.add_argument("--step-seconds", type=float,
                        help=f"sending time per step (default {DEFAULTS['step_seconds']:g})")
    parser.add_argument("--max-steps", type=int,
                        help=f"default {DEFAULTS['max_steps']}")
    parser.add_argument("--stop-after", type=int,
                        help="stop after this many steps in a row that fail both criteria "
                             f"(default {DEFAULTS['stop_after']})")
    parser.add_argument("--drain-timeout", type=float,
                        help="seconds to wait for the backlog to drain after a run "
                             f"(default {DEFAULTS['drain_timeout']:g})")
    parser.add_argument("--latency-seconds", type=float,
                        help="the 70%% run and each --latency-ratios run "
                             f"(default {DEFAULTS['latency_seconds']:g})")
    parser.add_argument("--latency-ratios", default=[],
                        type=lambda v: [float(x) for x in v.split(",") if x.strip()],
                        help="extra latency runs at these x the backlog drain rate, "
                             "e.g. 0.1,0.25 (default none)")
    parser.add_argument("--shared-broker", action="store_true",
                        help="run every live run on the backlog drain's broker and worker "
                             "(the old method; default: a fresh broker and worker per run)")
    args = parser.parse_args()
    for key, default in DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, QUICK[key] if args.quick else default)
    if args.step_factor <= 1 and args.step_increment <= 0:
        parser.error("--step-factor must be > 1 (or give --step-increment)")
    return args


def main() -> int:
    args = parse_args()
    # the sender and the reader share this process: switch threads more often than the
    # default 5 ms, so neither holds the other's timestamps back by that much
    sys.setswitchinterval(0.001)
    workdir = Path(tempfile.mkdtemp(prefix="fraudstream-bench-"))
    out_dir = args.results / f"bench-{time.strftime('%Y%m%d-%H%M%S')}"
    out_dir.mkdir(parents=True, exist_ok=False)
    budget = args.budget_ms
    result: dict[str, Any] = {
        "events": args.events, "partitions": args.partitions, "seed": args.seed,
        "batch_max": args.batch_max, "budget_ms": budget,
        "models": str(args.models) if args.models else None,
        "step_seconds": args.step_seconds if args.steps else None,
        "broker": "shared" if args.shared_broker else "fresh per run",
        "warm_up_transactions": None if args.shared_broker else WARMUP,
        "lag_rule": {"decided_over_sent_below": LAG_RATE_RATIO,
                     "backlog_end_above_s": LAG_BACKLOG_S, "sample_s": SAMPLE_S},
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "loadavg": {"start": os.getloadavg()}, "cpus": os.cpu_count(),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "workdir": str(workdir),
    }
    what = "features, rules, model, online" if args.models else "features, rules"
    # send times and transactions of the live runs: the same in both broker modes
    rng = random.Random(args.seed)
    gen = TrafficGenerator(GeneratorConfig(seed=args.seed + 1,
                                           id_prefix=f"l{uuid.uuid4().hex[:6]}"))
    samplers: list[RssSampler] = []
    runs: Runs | None = None
    with EmbeddedRegistry() as reg:
        with EmbeddedBroker(log_path=workdir / "broker.log") as broker:
            uid = uuid.uuid4().hex[:6]
            settings = Settings(topics=TopicSettings(
                **{k: f"{v}-{uid}" for k, v in vars(TopicSettings()).items()}
            )).replace(
                kafka={"bootstrap": broker.bootstrap, "session_timeout_ms": 6000,
                       "partitions": args.partitions, "embedded": True},
                codec={"registry_url": reg.url},
                worker={"app_id": f"bench-{uid}", "data_dir": workdir / "state",
                        "batch_max": args.batch_max, "metrics_port": free_port()},
                scoring={"models_dir": args.models or workdir / "no-models",
                         "budget_ms": budget},
            )
            ensure_topics(settings)
            codecs = Codecs(make_registry(reg.url), settings.topics)
            _progress(f"producing {args.events:,} generated transactions...")
            pre_produce(settings, codecs, args.events, args.seed)

            _progress("baseline: bare Faust consumer...")
            bare = _spawn(["-m", "loadtest.bare_faust", "--topic", settings.topics.transactions,
                           "--count", str(args.events), "--app-id", f"bare-{uid}",
                           "--data-dir", str(workdir / "bare-data")],
                          settings, workdir / "bare.log")
            try:
                result["bare_faust"] = _json_line(bare, timeout_s=300)
            finally:
                stop_process(bare)
            _progress(f"  {result['bare_faust']['rate']:,.0f}/s")

            _progress("baseline: Kafka loop (consume, decode, produce)...")
            loop = _spawn(["-m", "loadtest.baseline_kafka", "--topic",
                           settings.topics.transactions, "--out-topic", f"baseline-out-{uid}",
                           "--count", str(args.events)],
                          settings, workdir / "baseline_kafka.log")
            try:
                result["kafka_loop"] = _json_line(loop, timeout_s=300, what="the Kafka loop")
            finally:
                stop_process(loop)
            _progress(f"  {result['kafka_loop']['rate']:,.0f}/s")

            _progress("worker: backlog drain...")
            worker = _spawn(["-m", "streams.cli", "worker", "--loglevel", "info"], settings,
                            workdir / "worker.log")
            rss = RssSampler(worker.pid, "backlog drain")
            samplers.append(rss)
            rss.start()
            try:
                got = read_decisions(settings, codecs, lambda out: len(out) >= args.events, 300)
                times = [t for t, _ in got]
                rate = (len(times) - 1) / (times[-1] - times[0])
                result["worker"] = {"events": len(got), "seconds": times[-1] - times[0],
                                    "rate": rate}
                rss.marks.append((times[0], "drain"))
                _progress(f"  {rate:,.0f}/s")
                if args.shared_broker:
                    # only once the backlog is decided: live traffic starts on an idle worker
                    runs = SharedRuns(LiveTraffic(
                        settings, codecs, rng, gen, worker,
                        broker.process.pid if broker.process else None), rss)
                    live_runs(runs, args, budget, result)
            finally:
                if runs is not None:
                    runs.close()
                rss.stop()
                stop_process(worker)
        if not args.shared_broker:
            # every live run on an empty broker: Tansu's fetch cost grows with the record
            # batches it holds (docs/performance.md, "How to measure")
            _progress("live runs: each on a fresh broker and worker")
            runs = FreshRuns(settings, codecs, rng, gen, workdir, args.seed)
            try:
                live_runs(runs, args, budget, result)
            finally:
                runs.close()
    assert runs is not None
    samplers += runs.samplers
    sat = result["saturation"]
    result["loadavg"]["end"] = os.getloadavg()
    result["ratios"] = {
        "drain": _ratios(result["worker"]["rate"], result),
        "saturation_by_budget": _ratios((sat["by_budget"] or {}).get("rate"), result),
        "saturation_lag_only": _ratios((sat["lag_only"] or {}).get("rate"), result),
    }
    result["worker_over_bare"] = result["ratios"]["drain"]["vs_bare_faust"]
    buckets, timed_runs, segments = timeline(runs.segments)
    result["timeline"] = {
        "rebased": runs.fresh, "segments": segments, "buckets": buckets,
        "runs": [{k: r[k] for k in ("label", "rate", "start_s", "end_s")} for r in timed_runs]}
    result["rss"] = rss_report(samplers)
    cdfs = [(f"{r['label']}: {r['rate']:,.0f}/s", live.latencies[r["label"]])
            for live in runs.segments for r in live.runs]
    xlabel = ("seconds of live traffic (each run on a fresh broker; runs placed end to end)"
              if runs.fresh else "seconds since the first live run started")
    result["plots"] = plots.write_all(
        out_dir, buckets=buckets, runs=timed_runs, cdfs=cdfs, budget_ms=budget,
        rss=[(w["worker"], w["series_mb"], w["marks"]) for w in result["rss"]["workers"]],
        xlabel=xlabel)
    (out_dir / "result.json").write_text(json.dumps(result, indent=2, default=str))
    print_summary(result, what)
    print(f"results: {out_dir}/ (result.json, {', '.join(result['plots'])})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
