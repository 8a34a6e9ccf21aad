"""What ``fraudstream api`` adds over the streaming path it waits on.

``python -m fraudstream.loadtest.api [--rates 300,1000] [--seconds 15] [--rules-only]``
starts a fresh embedded broker and registry, one worker (the full cascade with the demo's
model, trained once and cached, unless ``--rules-only``) and one API process, then sends
open-loop Poisson requests at each rate from this process (aiohttp on uvloop), each
with its own new transaction and the API's default deadline.

Per request it takes the caller's latency (send to answer read), and the streaming
path's own end-to-end time for that transaction: the decision record's broker
timestamp minus the transaction record's (both stamped by their producers, the worker and
the API, on this machine's clock). What the API adds is the first minus the second: the
HTTP exchange, validation, the produce call, reading the decision back and answering.
It prints, per rate, p50/p99 of both and of what is added, how far past its deadline the
slowest answer was, the answers by source (stream, stand-in, 429, 503), who decided the
streamed decisions (model, rules, fallback by cause), how many of the stand-ins answered
are on ``decisions.standins``, and the CPU seconds of each process. Every process shares
the machine's cores with the load generator.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

from fraudstream.loadtest.harness import _progress, _spawn, fresh_stack, write_result
from fraudstream.loadtest.proc import tree_cpu_s
from fraudstream.loadtest.runs import warm_up
from fraudstream.streams.embedded.broker import EmbeddedBroker, free_ports
from fraudstream.streams.embedded.registry import EmbeddedRegistry
from fraudstream.streams.processes import stop_process
from fraudstream.streams.traffic.generator import TrafficGenerator
from fraudstream.streams.traffic.world import GeneratorConfig
from fraudstream.streams.worker.status import quantile

TOKEN = "bench-token"


async def _load(url: str, rate: float, seconds: float, seed: int) -> list[dict[str, Any]]:
    """Open loop: request i leaves at its Poisson time whatever the earlier ones did."""
    import aiohttp

    rng = random.Random(seed)
    gen = TrafficGenerator(GeneratorConfig(seed=seed, id_prefix=f"a{uuid.uuid4().hex[:6]}"))
    at, times = 0.0, []
    while at < seconds:
        at += rng.expovariate(rate)
        times.append(at)
    # made before the step: the generator's cost stays out of the schedule
    now_ms = int(time.time() * 1000)
    bodies = []
    for i in range(len(times)):
        txn = gen.next_transaction(now_ms + i)
        bodies.append((txn["transaction_id"],
                       json.dumps({k: v for k, v in txn.items() if v is not None})))
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    out: list[dict[str, Any]] = []
    conn = aiohttp.TCPConnector(limit=2000)
    async with aiohttp.ClientSession(connector=conn) as session:
        async def one(when: float, txn_id: str, body: str) -> None:
            t0 = time.perf_counter()
            try:
                async with session.post(url, data=body, headers=headers) as r:
                    await r.read()
                    timing = r.headers.get("Server-Timing", "")
                    served = float(timing.rsplit("total;dur=", 1)[1]) \
                        if "total;dur=" in timing else None
                    out.append({"id": txn_id, "status": r.status,
                                "source": r.headers.get("X-Fraudstream-Decision-Source"),
                                "served_ms": served,
                                "late_s": t0 - (start + when),
                                "latency_s": time.perf_counter() - t0})
            except aiohttp.ClientError as exc:
                out.append({"id": txn_id, "status": 0, "source": str(exc),
                            "latency_s": time.perf_counter() - t0})

        start = time.perf_counter() + 0.2
        tasks = []
        for when, (txn_id, body) in zip(times, bodies, strict=True):
            delay = start + when - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(when, txn_id, body)))
        await asyncio.gather(*tasks)
    return out


def _timestamps(settings: Any, topic: str, ids: set[bytes], read: Any,
                timeout_s: float = 30.0) -> dict[bytes, tuple[float, Any]]:
    """transaction_id -> (record timestamp in s, the decoded record) of the first record
    of each of ``ids`` on ``topic`` (``read``: value -> decoded record)."""
    from confluent_kafka import OFFSET_BEGINNING, Consumer

    from fraudstream.streams.topics import assign_all

    consumer = Consumer(settings.kafka.consumer_config(f"bench-{uuid.uuid4().hex[:6]}"))
    assign_all(consumer, [topic], OFFSET_BEGINNING)
    out: dict[bytes, tuple[float, Any]] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline and not ids <= out.keys():
            for m in consumer.consume(5000, 0.2):
                if m.error() is not None:
                    continue
                rec = read(m.value())
                key = rec["transaction_id"].encode()
                if key in ids and key not in out:
                    out[key] = (m.timestamp()[1] / 1000.0, rec)
    finally:
        consumer.close()
    return out


def _who(decision: dict[str, Any]) -> str:
    cause = next((r.split(":", 1)[1] for r in decision["reasons"]
                  if r.startswith("fallback:")), None)
    if cause is not None:
        return f"fallback:{cause}"
    return "rules" if decision["model_version"].startswith("rules@") else "model"


def _report(step: list[dict[str, Any]], txn_ts: dict[bytes, tuple[float, Any]],
            dec_ts: dict[bytes, tuple[float, Any]], deadline_s: float) -> dict[str, Any]:
    sources = Counter(r["source"] if r["status"] == 200 else str(r["status"]) for r in step)
    caller, stream, added = [], [], []
    who: Counter[str] = Counter()
    for r in step:
        key = r["id"].encode()
        if r["status"] != 200 or key not in txn_ts or key not in dec_ts:
            continue
        who[_who(dec_ts[key][1])] += 1
        if r["source"] != "stream":
            continue
        e2e = dec_ts[key][0] - txn_ts[key][0]
        caller.append(r["latency_s"] * 1000)
        stream.append(e2e * 1000)
        added.append((r["latency_s"] - e2e) * 1000)
    late = [r["late_s"] * 1000 for r in step if "late_s" in r]
    over = [(r["latency_s"] - deadline_s) * 1000 for r in step]
    served_over = [r["served_ms"] - deadline_s * 1000 for r in step
                   if r.get("served_ms") is not None]

    def q(v: list[float]) -> dict[str, float | None]:
        return {"p50": quantile(v, 0.5) if v else None,
                "p99": quantile(v, 0.99) if v else None}

    return {"requests": len(step), "answers": dict(sources), "stream_decided_by": dict(who),
            "caller_ms": q(caller), "stream_e2e_ms": q(stream), "api_added_ms": q(added),
            "worst_past_deadline_ms": max(over) if over else None,
            "worst_past_deadline_served_ms": max(served_over) if served_over else None,
            "client_send_late_ms_p99": quantile(late, 0.99) if late else None}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fraudstream.loadtest.api",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--rates", default="300,1000", help="requests per second, one step each")
    p.add_argument("--seconds", type=float, default=15.0, help="per step")
    p.add_argument("--partitions", type=int, default=4)
    p.add_argument("--rules-only", action="store_true", help="no model: the rules decide")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--api-fetch-wait-ms", type=int, default=None,
                   help="the API's decisions reader's fetch wait (default: "
                        "FRAUDSTREAM_API_FETCH_MAX_WAIT_MS's default)")
    p.add_argument("--out", type=Path, default=Path("results"))
    p.add_argument("--py-spy", type=Path, default=None,
                   help="record the API process with py-spy (raw format) during each step")
    args = p.parse_args(argv)
    rates = [float(r) for r in args.rates.split(",")]
    workdir = Path(tempfile.mkdtemp(prefix="fraudstream-api-bench-"))
    scoring: dict[str, Any] = {"models_dir": workdir / "no-models"}
    if not args.rules_only:
        from fraudstream.schemas.fx import Rates
        from fraudstream.streams.demo.model import DemoWorld, default_cache, ensure_model
        from fraudstream.streams.settings import Settings

        s = Settings()
        folder, version, _trained = ensure_model(DemoWorld(), default_cache(),
                                                 s.scoring.rules_path,
                                                 Rates.load(s.worker.rates_path))
        scoring = {"models_dir": folder}
        _progress(f"model {version} from {folder}")
    import uvloop

    ports = free_ports(2)
    fetch_wait = ({} if args.api_fetch_wait_ms is None
                  else {"fetch_max_wait_ms": args.api_fetch_wait_ms})
    with EmbeddedBroker(log_path=workdir / "tansu.log") as broker, EmbeddedRegistry() as reg:
        stack = fresh_stack(broker, reg, workdir, "api-bench", partitions=args.partitions,
                            scoring=scoring, api={"tokens": TOKEN, "port": ports[0],
                                                  "metrics_port": ports[1], **fetch_wait})
        settings = stack.settings
        worker = _spawn(["-m", "fraudstream", "worker"], settings, workdir / "worker.log")
        api = _spawn(["-m", "fraudstream", "api"], settings, workdir / "api.log")
        try:
            warm_up(settings, stack.codecs, worker, args.seed, 120.0)
            base = f"http://127.0.0.1:{settings.api.port}"
            for _ in range(300):
                try:
                    with urllib.request.urlopen(f"{base}/readyz", timeout=1) as r:
                        if r.status == 200:
                            break
                except OSError:
                    time.sleep(0.1)
            # a few requests first: connections, code paths and the reader warmed up
            uvloop.run(_load(f"{base}/v1/decisions", 50, 2.0, args.seed + 99))
            steps = []
            for i, rate in enumerate(rates):
                cpu0 = {n: tree_cpu_s(pr.pid) for n, pr in (("worker", worker), ("api", api))}
                cpu0["broker"] = tree_cpu_s(broker.process.pid) if broker.process else 0.0
                spy = None
                if args.py_spy is not None:
                    args.py_spy.mkdir(parents=True, exist_ok=True)
                    spy = subprocess.Popen(
                        ["py-spy", "record", "--format", "raw", "-r", "200", "-p",
                         str(api.pid), "-d", str(int(args.seconds)), "-o",
                         str(args.py_spy / f"api-{rate:g}.txt")],
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                t0 = time.perf_counter()
                step = uvloop.run(_load(f"{base}/v1/decisions", rate, args.seconds,
                                        args.seed + i))
                wall = time.perf_counter() - t0
                cpu = {"worker": tree_cpu_s(worker.pid) - cpu0["worker"],
                       "api": tree_cpu_s(api.pid) - cpu0["api"],
                       "broker": (tree_cpu_s(broker.process.pid) if broker.process else 0.0)
                       - cpu0["broker"]}
                steps.append((rate, step, wall, cpu))
                if spy is not None:
                    spy.wait(30)
                ok = sum(1 for r in step if r["status"] == 200)
                _progress(f"{rate:g}/s: {len(step)} requests, {ok} answered 200")
            ids = {r["id"].encode() for _, step, _, _ in steps for r in step}
            txn_ts = _timestamps(settings, settings.topics.transactions, ids,
                                 stack.codecs.transaction.decode)
            dec_ts = _timestamps(settings, settings.topics.decisions, ids,
                                 stack.codecs.decision.decode)
            standin_ids = {r["id"].encode() for _, step, _, _ in steps for r in step
                           if r["status"] == 200 and r["source"] == "standin"}
            on_standins = set(_timestamps(settings, settings.topics.decisions_standins,
                                          standin_ids, stack.codecs.decision.decode,
                                          timeout_s=10.0))
        finally:
            stop_process(api, 15.0)
            stop_process(worker, 30.0)
    deadline_s = settings.api.timeout_ms / 1000.0
    result = {"deadline_ms": settings.api.timeout_ms, "partitions": args.partitions,
              "model": not args.rules_only, "steps": []}
    for rate, step, wall, cpu in steps:
        rep = _report(step, txn_ts, dec_ts, deadline_s)
        # every stand-in answered is to be on decisions.standins (the caller's record)
        rep["standins_published"] = sum(1 for r in step if r["id"].encode() in on_standins)
        rep.update(rate=rate, seconds=round(wall, 1),
                   cpu_s={k: round(v, 1) for k, v in cpu.items()})
        result["steps"].append(rep)
        _progress(json.dumps(rep))
    added = [s["api_added_ms"]["p99"] for s in result["steps"] if s["api_added_ms"]["p99"]]
    if added:
        result["api_added_p99_ms_median_over_steps"] = statistics.median(added)
    write_result(args.out, "api", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
