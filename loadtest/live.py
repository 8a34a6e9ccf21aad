"""Live traffic for ``python -m fraudstream.loadtest``: open-loop Poisson sends into one running
worker, the decisions coming back, their latencies and the lag rule (see the method in
``loadtest/__main__.py``)."""

from __future__ import annotations

import os
import random
import statistics
import subprocess
import threading
import time
import uuid
from collections.abc import Callable

from confluent_kafka import OFFSET_END, Consumer, Producer

from fraudstream.loadtest.decided_by import MODEL, decider, tally
from fraudstream.loadtest.harness import _progress
from fraudstream.loadtest.proc import tree_cpu_s
from fraudstream.schemas.codec import Codecs
from fraudstream.streams.settings import Settings
from fraudstream.streams.topics import assign_all
from fraudstream.streams.traffic.generator import TrafficGenerator
from fraudstream.streams.worker.status import quantile as percentile

LAG_RATE_RATIO = 0.97  # decided / sent rate over a step's second half, below: trending
LAG_BACKLOG_S = 0.5  # backlog at a step's end, in seconds of its traffic, above: not noise
SAMPLE_S = 0.1  # sent / received counts sampled this often


class DecisionReader(threading.Thread):
    """Reads ``decisions`` from its current end while traffic runs. Keeps, for each decision
    of a transaction sent at or after ``since`` (wall clock), the tuple (received,
    source_timestamp, decided_at, fallback, batch_ms, features_ms, decider): times in
    seconds since the epoch, then the worker's own processing time of the decision's batch
    until the decision was encoded, and of its feature stage (the decision's
    ``timings_ms``), then who decided (loadtest/decided_by.py)."""

    def __init__(self, settings: Settings, codecs: Codecs, since: float) -> None:
        super().__init__(name="decisions-reader", daemon=True)
        self.settings, self.codecs, self.since = settings, codecs, since
        self.records: list[tuple[float, float, float, bool, float, float, str]] = []
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
                                        t.get("total", 0.0), t.get("features", 0.0),
                                        decider(d)))
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


def _by_third(sent: list[float], lat: list[float], batch: list[float], start: float,
              seconds: float) -> dict:
    """The worker's batch time p99 and the end-to-end p50 over each third of a run, by
    when each transaction was sent (``sent``, parallel to ``lat`` and ``batch``): at a
    steady rate, a rise from the first third to the last is the run's history (on the
    embedded broker, the record batches it holds), not the rate."""
    third = [min(2, max(0, int((s - start) * 3 / seconds))) for s in sent]

    def by_third(values: list[float], q: float) -> list[float | None]:
        parts: list[list[float]] = [[], [], []]
        for k, v in zip(third, values, strict=True):
            parts[k].append(v)
        return [percentile(part, q) if part else None for part in parts]

    return {"worker_batch_p99_by_third_ms": by_third(batch, 0.99),
            "p50_by_third_ms": by_third(lat, 0.50)}


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
                second = records[last[2]:recv]
                recent = [(r[0] - r[1]) * 1000.0 for r in second]
                p99 = f"{percentile(recent, 0.99):7.1f} ms" if recent else "      - ms"
                shown = f"{rate:>8,.0f}/s" if rate else " " * 10
                model = sum(1 for r in second if r[6] == MODEL)
                fell_back = sum(1 for r in second if r[3])
                _progress(f"  {label:>18} {shown}  t {now - start:5.1f}s  "
                          f"sent {(sent - last[1]) / dt:>7,.0f}/s  "
                          f"decided {(recv - last[2]) / dt:>7,.0f}/s (model {model / dt:,.0f}/s, "
                          f"fallback {fell_back / dt:,.0f}/s)  p99(1s) {p99}  "
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
            "decided_by": tally(r[6] for r in recs),
            **_latency_stats(lat, decided), **verdict,
            "worker_batch_p50_ms": percentile(batch, 0.50) if batch else None,
            "worker_batch_p99_ms": percentile(batch, 0.99) if batch else None,
            "worker_features_p50_ms": percentile(features, 0.50) if features else None,
            **_by_third([r[1] for r in recs], lat, batch, start, seconds),
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

