"""The demo's live numbers, read as a user would: from the topics and the worker's /metrics.

:class:`Summary` reads ``decisions``, the DLQ and ``labels`` from the start and keeps:

- the decision mix (approve / review / decline) and who decided (model, rules, fallback);
- precision of review and of decline once labels arrive: of the flagged transactions old
  enough that their label is due (event time + the label delay's mean + 2 sd before the
  newest label's time), the share labelled fraud;
- end-to-end latency: from the transaction record's Kafka timestamp to its decision
  acknowledged by the broker (ready for every consumer), from the worker's
  ``fraudstream_decision_latency_seconds``; and, at the end, as this reader received them
  (its own fetch wait included);
- the worker's own time per batch (fetch to decisions acknowledged), from the worker's
  ``fraudstream_batch_seconds`` histogram, scraped each second;
- when the end-to-end p99 keeps growing while the worker's own p99 stays within budget,
  that the embedded broker has become the bottleneck.
"""

from __future__ import annotations

import os
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer

from fraudstream.schemas.codec import Codecs, DecodeError
from fraudstream.streams.settings import Settings
from fraudstream.streams.topics import assign_all
from fraudstream.streams.worker.status import quantile as percentile


def histogram_quantile(buckets: list[tuple[float, float]], q: float) -> float:
    """Prometheus' histogram_quantile over (upper bound, cumulative count) pairs."""
    if not buckets or buckets[-1][1] <= 0:
        return float("nan")
    rank = q * buckets[-1][1]
    lower, below = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if bound == float("inf"):
                return lower
            return lower + (bound - lower) * ((rank - below) / (count - below)
                                              if count > below else 1.0)
        lower, below = bound, count
    return lower


def scrape_histograms(url: str) -> dict[str, list[tuple[float, float]]] | None:
    """The worker's own batch time (key ``batch``), its decision latency (``e2e``) and its
    stage times (``features``, ``model``, ``commit``, ...) as cumulative buckets, or None
    if /metrics is unreachable."""
    try:
        with urllib.request.urlopen(url, timeout=0.5) as resp:
            text = resp.read().decode()
    except OSError:
        return None
    out: dict[str, list[tuple[float, float]]] = {}
    for line in text.splitlines():
        if line.startswith("fraudstream_batch_seconds_bucket{"):
            key = "batch"
        elif line.startswith("fraudstream_decision_latency_seconds_bucket{"):
            key = "e2e"
        elif line.startswith("fraudstream_stage_seconds_bucket{"):
            key = line.partition('stage="')[2].partition('"')[0]
        else:
            continue
        le = line.partition('le="')[2].partition('"')[0]
        out.setdefault(key, []).append((float(le), float(line.rpartition(" ")[2])))
    return {k: sorted(v) for k, v in out.items()}


def bucket_delta(now: list[tuple[float, float]], before: list[tuple[float, float]] | None
                 ) -> list[tuple[float, float]]:
    if not before or len(before) != len(now):
        return now
    return [(b, c - c0) for (b, c), (_b, c0) in zip(now, before, strict=True)]


def interval_ms(now: list[tuple[float, float]], before: list[tuple[float, float]] | None
                ) -> tuple[float, float, float] | None:
    """(count, p50 ms, p99 ms) of what a histogram observed since ``before``; None if
    nothing."""
    delta = bucket_delta(now, before)
    if not delta or delta[-1][1] <= 0:
        return None
    return (delta[-1][1], histogram_quantile(delta, 0.5) * 1000.0,
            histogram_quantile(delta, 0.99) * 1000.0)


def cpu_seconds(pid: int | None) -> float | None:
    """User + system CPU seconds of a process so far, from /proc (None if unreadable)."""
    if pid is None:
        return None
    try:
        fields = open(f"/proc/{pid}/stat").read().rpartition(")")[2].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class Window:
    """One summary interval's counts."""

    count: int = 0
    warmup: int = 0


class Summary:
    def __init__(self, settings: Settings, codecs: Codecs, metrics_url: str | None,
                 label_horizon_ms: float, budget_ms: float, live_from_ms: int = 0,
                 broker_pid: int | None = None) -> None:
        """Decisions of transactions before ``live_from_ms`` (event time) are the warm-up
        history: counted apart, and kept out of the mix, precision and latency."""
        self.codecs = codecs
        self.topics = settings.topics
        self.consumer = Consumer(settings.kafka.consumer_config("fraudstream-demo-summary"))
        assign_all(self.consumer, [self.topics.decisions, self.topics.dlq, self.topics.labels],
                   OFFSET_BEGINNING)
        self.metrics_url = metrics_url
        self.live_from_ms = live_from_ms
        self.broker_pid = broker_pid
        self._cpu: list[tuple[float, float]] = []  # (monotonic, broker CPU seconds)
        self.broker_cpu = float("nan")  # share of a core over the last 10 s
        self.warmup = 0
        self.label_horizon_ms = label_horizon_ms
        self.budget_ms = budget_ms
        self.outcomes: Counter[str] = Counter()
        self.deciders: Counter[str] = Counter()
        self.dlq = 0
        self.labels = 0
        self.total = 0
        self.window = Window()
        self.e2e_all: list[float] = []  # every latency, for the final percentiles
        self.own_all: list[float] = []  # per-interval worker p99s
        self.flagged: dict[str, tuple[str, int]] = {}  # transaction_id -> (outcome, event)
        self.fraud: set[str] = set()
        self.newest_label_ms = 0
        self._last: dict[str, list[tuple[float, float]]] | None = None
        self._at_live: dict[str, list[tuple[float, float]]] | None = None
        self.own_p50 = self.own_p99 = float("nan")
        self.e2e_p50 = self.e2e_p99 = float("nan")
        self.e2e_p99_history: list[float] = []
        self.bottleneck_since: float | None = None

    def poll(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            # consume() waits for its whole count or the timeout: keep the timeout short
            # so that the latency measured is the pipeline's, not this loop's
            for msg in self.consumer.consume(1000, min(left, 0.005)):
                if msg.error():
                    continue
                self._record(msg, time.time() * 1000.0)

    def _record(self, msg: Any, now_ms: float) -> None:
        topic = msg.topic()
        if topic == self.topics.labels:
            try:
                label = self.codecs.label.decode(msg.value())
            except DecodeError:
                return
            self.labels += 1
            if label["is_fraud"]:
                self.fraud.add(label["transaction_id"])
            lt = int(label["label_time"].timestamp() * 1000)
            self.newest_label_ms = max(self.newest_label_ms, lt)
            return
        self.total += 1
        self.window.count += 1
        if topic != self.topics.decisions:
            self.dlq += 1
            return
        try:
            d = self.codecs.decision.decode(msg.value())
        except DecodeError:
            return
        event_ms = int(d["event_time"].timestamp() * 1000)
        if event_ms < self.live_from_ms:
            self.warmup += 1
            self.window.warmup += 1
            return
        outcome = d["decision"]
        self.outcomes[outcome] += 1
        self.deciders["fallback" if d["fallback"] else
                      "rules" if d["stage"] == "rules" else "model"] += 1
        if outcome != "approve":
            self.flagged[d["transaction_id"]] = (outcome, event_ms)
        latency = now_ms - d["source_timestamp"].timestamp() * 1000.0
        self.e2e_all.append(latency)

    def precision(self) -> dict[str, tuple[int, int]]:
        """outcome -> (labelled fraud, flagged old enough to be labelled)."""
        due = self.newest_label_ms - self.label_horizon_ms
        out = {"review": [0, 0], "decline": [0, 0]}
        for txn_id, (outcome, event_ms) in self.flagged.items():
            if event_ms <= due:
                out[outcome][1] += 1
                out[outcome][0] += txn_id in self.fraud
        return {k: (v[0], v[1]) for k, v in out.items()}

    def _scrape_own(self, warming: bool) -> None:
        if not self.metrics_url:
            return
        now = scrape_histograms(self.metrics_url)
        if not now or "batch" not in now:
            return
        last, self._last = self._last, now
        if warming or self._at_live is None:
            self._at_live = now  # the live run's numbers start after the warm-up
        if last is None or "batch" not in last:
            return
        own = interval_ms(now["batch"], last["batch"])
        if own is not None:
            _n, self.own_p50, self.own_p99 = own
            if not warming:
                self.own_all.append(self.own_p99)
        e2e = interval_ms(now.get("e2e", []), last.get("e2e"))
        _n, self.e2e_p50, self.e2e_p99 = e2e if e2e is not None else (0, float("nan"),
                                                                      float("nan"))

    def live_times(self) -> dict[str, tuple[float, float, float]]:
        """Over the live run: (batches, p50 ms, p99 ms) of the worker's own batch time and
        of each stage, from the worker's histograms (bucket-interpolated)."""
        out: dict[str, tuple[float, float, float]] = {}
        if not self._last:
            return out
        for key, buckets in self._last.items():
            times = interval_ms(buckets, (self._at_live or {}).get(key))
            if times is not None:
                out[key] = times
        return out

    def _broker_cpu(self) -> None:
        used = cpu_seconds(self.broker_pid)
        if used is None:
            return
        now = time.monotonic()
        self._cpu.append((now, used))
        while len(self._cpu) > 2 and now - self._cpu[0][0] > 10.0:
            self._cpu.pop(0)
        t0, c0 = self._cpu[0]
        if now - t0 > 0.5:
            self.broker_cpu = (used - c0) / (now - t0)

    def line(self, interval: float) -> str:
        self._broker_cpu()
        w, self.window = self.window, Window()
        self._scrape_own(warming=w.warmup > 0 or not self.outcomes)
        rate = w.count / interval if interval > 0 else 0.0
        decided = sum(self.outcomes.values())

        def pct(n: int, of: int) -> str:
            return f"{100.0 * n / of:.1f}%" if of else "-"

        mix = " ".join(f"{k} {pct(self.outcomes[k], decided)}"
                       for k in ("approve", "review", "decline"))
        by = " ".join(f"{k} {pct(self.deciders[k], decided)}"
                      for k in ("model", "rules", "fallback"))
        prec = self.precision()
        precision = " ".join(f"{k} {pct(*prec[k])} of {prec[k][1]}" for k in prec)
        e2e = (f"e2e p50 {self.e2e_p50:5.0f} p99 {self.e2e_p99:5.0f} ms"
               if self.e2e_p99 == self.e2e_p99 else "e2e -")
        own = (f"worker p50 {self.own_p50:4.1f} p99 {self.own_p99:5.1f} ms"
               if self.own_p99 == self.own_p99 else "worker -")
        if w.warmup or not decided:
            return (f"warming up the worker's state with history: {self.warmup} decided "
                    f"({w.warmup / max(interval, 1e-9):.0f}/s), {own}")
        broker = (f" | broker {100 * self.broker_cpu:3.0f}% cpu"
                  if self.broker_cpu == self.broker_cpu else "")
        text = (f"{rate:5.0f}/s | {decided:>7} decided: {mix} | by {by} | precision "
                f"{precision} | dlq {self.dlq} | {own} | {e2e}{broker}")
        note = self._bottleneck(self.e2e_p99 if self.e2e_p99 == self.e2e_p99 else None)
        return text + (f"\n  ! {note}" if note else "")

    def _bottleneck(self, e2e_p99: float | None) -> str | None:
        """Said once when the end-to-end p99 has risen well above its early level while
        the embedded broker burns most of a core, or while the worker's own p99 stays
        within the budget: the time goes to the broker (its fetch cost grows with the
        record batches it holds)."""
        if e2e_p99 is None or self.window.warmup:
            return None
        hist = self.e2e_p99_history
        hist.append(e2e_p99)
        if len(hist) < 40 or self.bottleneck_since is not None:
            return None
        early = sorted(hist[10:40])[15]
        recent = sorted(hist[-10:])[5]
        busy = self.broker_cpu == self.broker_cpu and self.broker_cpu > 0.6
        if recent > max(2.0 * early, early + 100.0) and (busy or self.own_p99 <= self.budget_ms):
            self.bottleneck_since = time.monotonic()
            cpu = f", the broker at {100 * self.broker_cpu:.0f}% of a core" if busy else ""
            return (f"the embedded broker is now the bottleneck: end-to-end p99 {recent:.0f} ms "
                    f"(was {early:.0f} ms), the worker's own p99 {self.own_p99:.1f} ms{cpu}; "
                    f"its fetch cost grows with the record batches it holds (see README)")
        return None

    def final(self) -> str:
        decided = sum(self.outcomes.values())
        prec = self.precision()
        lines = [
            f"total: {self.total} records out, {decided + self.warmup} decisions, "
            f"{self.dlq} dead letters",
            f"decisions {decided}: " + ", ".join(
                f"{k} {self.outcomes[k]} ({100.0 * self.outcomes[k] / max(decided, 1):.2f}%)"
                for k in ("approve", "review", "decline")),
            "decided by " + ", ".join(
                f"{k} {self.deciders[k]} ({100.0 * self.deciders[k] / max(decided, 1):.2f}%)"
                for k in ("model", "rules", "fallback")),
            "precision once labelled: " + ", ".join(
                f"{k} {p[0]}/{p[1]}" + (f" ({100.0 * p[0] / p[1]:.1f}%)" if p[1] else "")
                for k, p in prec.items()) + f"; {self.labels} labels read",
            f"embedded broker CPU over the last 10 s: "
            f"{100 * self.broker_cpu:.0f}% of a core",
            f"dead letters {self.dlq}; warm-up history decided before the run: {self.warmup}",
            f"end-to-end latency as this reader received the decisions (its fetch wait "
            f"included): p50 {percentile(self.e2e_all, 0.5):.1f} ms, p99 "
            f"{percentile(self.e2e_all, 0.99):.1f} ms",
        ]
        times = self.live_times()
        if "batch" in times:
            n, p50, p99 = times.pop("batch")
            lines.append(
                f"worker's own time per batch (fetch to acknowledged), {n:.0f} batches: p50 "
                f"{p50:.1f} ms, p99 {p99:.1f} ms (budget {self.budget_ms:.0f} ms); per-second "
                f"p99s: median {percentile(self.own_all, 0.5):.1f} ms, worst "
                f"{max(self.own_all, default=0):.1f} ms")
            if "e2e" in times:
                n, p50, p99 = times.pop("e2e")
                lines.append(f"end-to-end latency to the decision acknowledged (the worker's "
                             f"histogram, {n:.0f} decisions): p50 {p50:.1f} ms, p99 {p99:.1f} ms")
            lines.append("  stages p50/p99 ms: " + ", ".join(
                f"{k} {v[1]:.1f}/{v[2]:.1f}" for k, v in times.items()))
        return "\n".join(lines)

    def close(self) -> None:
        self.consumer.close()
