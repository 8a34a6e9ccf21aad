"""``fraudstream api`` on real parts: the embedded broker and registry, a real worker and
the API as real processes, requests over HTTP. The API's answer must be the record the
worker published on ``decisions``; the caller's deadline holds with the worker stopped,
with the API overloaded and with the broker down."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from fraudstream.schemas.codec import Codecs
from fraudstream.schemas.fx import Rates
from fraudstream.streams.api.service import json_ready
from fraudstream.streams.embedded.broker import EmbeddedBroker, free_ports
from fraudstream.streams.processes import die_with_parent, stop_process
from fraudstream.streams.settings import Settings
from fraudstream.streams.topics import ensure_topics
from tests.conftest import ROOT, T0_MS, consume_all
from tests.test_canary_e2e import wait_until
from tests.test_e2e import generated
from tests.test_observability import _query, panels, start_prometheus

pytestmark = pytest.mark.e2e

TOKEN = "t0k3n-for-tests"
PAN = "4111111111111111"


class ApiProcess:
    """A real ``fraudstream api`` process on free ports."""

    def __init__(self, settings: Settings, log: Path, **api: Any) -> None:
        self.port, self.metrics_port = free_ports(2)
        self.settings = settings.replace(api={"tokens": TOKEN, "port": self.port,
                                              "metrics_port": self.metrics_port, **api})
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 30.0) -> ApiProcess:
        env = {k: v for k, v in os.environ.items() if not k.startswith("FRAUDSTREAM_")}
        env.update(self.settings.to_env())
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "fraudstream", "api", "--loglevel", "info"], env=env,
                stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True,
                preexec_fn=die_with_parent)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.tail()
            try:
                with urllib.request.urlopen(
                        f"http://127.0.0.1:{self.metrics_port}/readyz", timeout=1) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"the API did not get ready:\n{self.tail()}")

    def stop(self) -> None:
        stop_process(self.proc, 15.0)

    def tail(self, lines: int = 30) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics") as r:
            return r.read().decode()


def _body(txn: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in txn.items() if v is not None}


async def _post(session: aiohttp.ClientSession, api: ApiProcess, body: Any,
                token: str | None = TOKEN, timeout_ms: float | None = None,
                raw: bytes | None = None) -> tuple[int, dict[str, str], Any, float]:
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    if timeout_ms is not None:
        headers["X-Fraudstream-Timeout-Ms"] = str(timeout_ms)
    t0 = time.perf_counter()
    async with session.post(f"{api.url}/v1/decisions", headers=headers,
                            data=raw if raw is not None else json.dumps(body)) as r:
        data = await r.read()
        elapsed = time.perf_counter() - t0
        return r.status, {k.lower(): v for k, v in r.headers.items()}, json.loads(data), elapsed


def _run(coro: Any) -> Any:
    return asyncio.run(coro)


async def _post_all(api: ApiProcess, bodies: list[Any], **kw: Any) -> list[Any]:
    async with aiohttp.ClientSession() as s:
        return await asyncio.gather(*(_post(s, api, b, **kw) for b in bodies))


def _transactions(n: int, seed: int) -> list[dict[str, Any]]:
    # event times in the past (T0), as a backlog or a replayed history would carry them
    txns = generated(n, seed=seed)
    for i, t in enumerate(txns):
        t["event_time"] = T0_MS + i
    return txns


def test_the_api_answers_with_the_very_decision_published_on_decisions(
        stack_settings, codecs: Codecs, start_worker, tmp_path):
    worker = start_worker()
    api = ApiProcess(stack_settings, tmp_path / "api.log", timeout_ms=5000).start()
    try:
        txns = _transactions(300, seed=21)
        answers = _run(_post_all(api, [_body(t) for t in txns]))
        assert worker.running, worker.tail()
        statuses = [a[0] for a in answers]
        assert statuses == [200] * len(txns), (statuses, api.tail())
        assert {a[1]["x-fraudstream-decision-source"] for a in answers} == {"stream"}
        # A retry returns the first answer, and nothing new reaches the topic for it.
        retried = _run(_post_all(api, [_body(t) for t in txns[:50]]))
        for first, again in zip(answers[:50], retried, strict=True):
            assert again[0] == 200 and again[2] == first[2]
            assert again[1]["x-fraudstream-replayed"] == "true"
            assert again[1]["x-fraudstream-decision-sha256"] == \
                first[1]["x-fraudstream-decision-sha256"]
        published = consume_all(stack_settings, stack_settings.topics.decisions, len(txns),
                                settle_s=1.0)
        at = {(m.partition(), m.offset()): m for m in published}
        assert len(published) == len(txns), "a retry was decided again"
        for txn, (_s, headers, decision, _e) in zip(txns, answers, strict=True):
            p, o = headers["x-fraudstream-decision-offset"].split(":")
            record = at[(int(p), int(o))]
            assert record.key() == txn["transaction_id"].encode()
            assert hashlib.sha256(record.value()).hexdigest() == \
                headers["x-fraudstream-decision-sha256"]
            topic = codecs.decision.decode(record.value())
            for k, v in topic.items():
                got = decision[k]
                want = int(v.timestamp() * 1000) if hasattr(v, "timestamp") else v
                assert got == want, (k, got, want)
        # the API is documented where it serves
        with urllib.request.urlopen(f"{api.url}/openapi.json") as r:
            spec = json.loads(r.read())
        assert "card_id" in json.dumps(spec["paths"]["/v1/decisions"]["post"]["requestBody"])
        with urllib.request.urlopen(f"{api.url}/docs") as r:
            assert r.status == 200
        text = api.metrics()
        assert 'fraudstream_api_requests_total{status="200"} 350.0' in text
        for probe in ("healthz", "readyz"):
            with urllib.request.urlopen(f"http://127.0.0.1:{api.metrics_port}/{probe}") as r:
                assert r.status == 200 and r.read() == b"ok\n"
    finally:
        api.stop()
    assert api.proc is not None and api.proc.returncode == 0, api.tail()


def test_bad_requests_get_a_4xx_naming_the_field_and_no_card_number_is_kept(
        stack_settings, tmp_path):
    api = ApiProcess(stack_settings, tmp_path / "api.log").start()
    try:
        good = _body(_transactions(1, seed=3)[0])
        missing = {k: v for k, v in good.items() if k != "merchant_id"}
        cases = [
            ("no token", dict(body=good, token=None), 401, None),
            ("wrong token", dict(body=good, token=TOKEN + "x"), 401, None),
            ("bad JSON", dict(body=None, raw=b'{"transaction_id": '), 400, None),
            ("not an object", dict(body=[good]), 400, None),
            ("missing field", dict(body=missing), 422, "merchant_id"),
            ("PAN in card_id", dict(body={**good, "card_id": PAN}), 422, "card_id"),
            ("PAN in an unknown field", dict(body={**good, "pan": PAN}), 422, "pan"),
            ("negative amount", dict(body={**good, "amount": -5}), 422, "amount"),
            ("timeout header", dict(body=good, timeout_ms="soon"), 400, None),
            ("too large", dict(body={**good, "merchant_id": "m" * 70_000}), 413, None),
        ]

        async def all_cases() -> list[Any]:
            async with aiohttp.ClientSession() as s:
                return [await _post(s, api, **kw) for _n, kw, _st, _f in cases]

        for (name, _kw, status, field), (got, headers, body, _e) in zip(
                cases, _run(all_cases()), strict=True):
            assert got == status, (name, got, body)
            assert "reason" in body, (name, body)
            if field is not None:
                assert body["field"] == field, (name, body)
            if status == 401:
                assert headers["www-authenticate"].startswith("Bearer")
            assert PAN not in json.dumps(body), (name, body)
        assert "missing" in _run(_post_all(api, [missing]))[0][2]["reason"]
    finally:
        api.stop()
    assert PAN not in api.log.read_text(), "a card number reached the API's log"
    assert PAN not in api.metrics() if api.proc and api.proc.poll() is None else True


def test_a_stopped_worker_gives_stand_ins_within_the_deadline_then_the_stream_decides(
        stack_settings, codecs: Codecs, start_worker, tmp_path):
    worker = start_worker()
    api = ApiProcess(stack_settings, tmp_path / "api.log").start()
    try:
        warm = _transactions(30, seed=4)
        assert {a[0] for a in _run(_post_all(api, [_body(t) for t in warm],
                                             timeout_ms=10_000))} == {200}
        assert worker.proc is not None
        os.killpg(worker.proc.pid, signal.SIGSTOP)
        try:
            txns = _transactions(60, seed=5)
            answers = _run(_post_all(api, [_body(t) for t in txns], timeout_ms=300))
        finally:
            os.killpg(worker.proc.pid, signal.SIGCONT)
        for status, headers, decision, elapsed in answers:
            assert status == 200, decision
            assert headers["x-fraudstream-decision-source"] == "standin"
            assert decision["fallback"] is True and "fallback:timeout" in decision["reasons"]
            assert decision["model_version"].startswith("rules@")
            assert decision["rates_version"] == Rates.load().version  # as the worker's
            served_ms = float(headers["server-timing"].rsplit("total;dur=", 1)[1])
            assert served_ms <= 300 + 10, served_ms
            assert elapsed < 0.300 + 0.25, elapsed  # the client's view, on a loaded machine
        # The streamed decisions follow for the record, once the worker is back.
        ids = {t["transaction_id"].encode() for t in txns}
        out = consume_all(stack_settings, stack_settings.topics.decisions, 90, 60,
                          settle_s=0.5, keys=ids)
        assert ids <= {m.key() for m in out}, worker.tail()
        # A retry gets the stand-in it was first answered with, not a second decision.
        again = _run(_post_all(api, [_body(txns[0])]))[0]
        assert again[2] == answers[0][2] and again[1]["x-fraudstream-replayed"] == "true"
        assert 'fraudstream_api_standins_total{cause="timeout"} 60.0' in api.metrics()
        # What each caller acted on is on decisions.standins, once (the retry added none),
        # as it was answered.
        standins: dict[bytes, list[Any]] = {}
        for m in consume_all(stack_settings, stack_settings.topics.decisions_standins, 60,
                             30, settle_s=1.0):
            standins.setdefault(m.key(), []).append(json_ready(codecs.decision.decode(m.value())))
        assert set(standins) == ids and {len(v) for v in standins.values()} == {1}
        for (_status, _headers, decision, _elapsed), txn in zip(answers, txns, strict=True):
            assert standins[txn["transaction_id"].encode()][0] == decision
        assert "fraudstream_api_standins_published 60.0" in api.metrics()
        assert "fraudstream_api_standins_unpublished 0.0" in api.metrics()
        # The dashboard's API row has data, scraped by a real Prometheus.
        prom, prom_url = start_prometheus(tmp_path, [f"127.0.0.1:{api.metrics_port}"])
        try:
            row = panels(json.loads((ROOT / "deploy" / "grafana" / "dashboards" /
                                     "fraudstream.json").read_text()), "API")
            assert len(row) >= 4
            _run(_post_all(api, [_body(t) for t in _transactions(20, seed=9)]))
            wait_until(lambda: not [t["expr"] for p in row for t in p["targets"]
                                    if not _query(prom_url, t["expr"])], 30,
                       "every API panel has data")
        finally:
            prom.terminate()
    finally:
        api.stop()


def test_a_retry_sent_to_another_instance_gets_the_stand_in_first_answered(
        stack_settings, codecs: Codecs, start_worker, tmp_path):
    """Behind a load balancer a caller's retry may reach another API instance: it must
    get the stand-in the caller acted on, not the streamed decision that followed it."""
    worker = start_worker()
    a = ApiProcess(stack_settings, tmp_path / "a.log").start()
    b = ApiProcess(stack_settings, tmp_path / "b.log").start()
    late: ApiProcess | None = None
    try:
        assert {x[0] for x in _run(_post_all(a, [_body(t) for t in _transactions(10, 6)],
                                             timeout_ms=10_000))} == {200}
        assert worker.proc is not None
        os.killpg(worker.proc.pid, signal.SIGSTOP)
        try:
            txns = _transactions(40, seed=7)
            answers = _run(_post_all(a, [_body(t) for t in txns[:30]], timeout_ms=300))

            # The same transaction at A (300 ms) and B (5 s) at once: B answers with A's
            # stand-in as soon as it reads it, not at its own deadline.
            async def both() -> tuple[list[Any], list[Any]]:
                async with aiohttp.ClientSession() as s:
                    bodies = [_body(t) for t in txns[30:]]
                    at_a = asyncio.gather(*(_post(s, a, x, timeout_ms=300) for x in bodies))
                    at_b = asyncio.gather(*(_post(s, b, x, timeout_ms=5000) for x in bodies))
                    return list(await at_a), list(await at_b)

            at_a, at_b = _run(both())
        finally:
            os.killpg(worker.proc.pid, signal.SIGCONT)
        assert {x[1]["x-fraudstream-decision-source"] for x in answers + at_a} == {"standin"}
        for first, other in zip(at_a, at_b, strict=True):
            assert other[0] == 200 and other[2] == first[2], (other, b.tail())
            assert other[3] < 2.0, other[3]  # not held to its own 5 s deadline
        # The streamed decisions follow; then every retry at B, and at an instance started
        # after it all, gets A's stand-in, from memory: nothing is produced for it again.
        ids = {t["transaction_id"].encode() for t in txns}
        consume_all(stack_settings, stack_settings.topics.decisions, 50, 60, settle_s=0.5,
                    keys=ids)
        late = ApiProcess(stack_settings, tmp_path / "late.log").start()
        for api in (b, late):
            retried = _run(_post_all(api, [_body(t) for t in txns[:30]]))
            for first, again in zip(answers, retried, strict=True):
                assert again[0] == 200 and again[2] == first[2], (again, api.tail())
                assert again[1]["x-fraudstream-decision-source"] == "standin"
                assert again[1]["x-fraudstream-replayed"] == "true"
        assert "fraudstream_api_standins_adopted 40.0" in b.metrics()
        assert "fraudstream_api_standins_adopted 40.0" in late.metrics()
        for api in (a, b, late):
            assert "fraudstream_api_standins_conflicting 0.0" in api.metrics()
            assert "fraudstream_api_standins_unreadable 0.0" in api.metrics()
        # No retry reached a worker: the topic holds the 50 decisions, and the first
        # decision again (same bytes) for each of the 10 that B produced as well.
        published = consume_all(stack_settings, stack_settings.topics.decisions, 60, 30,
                                settle_s=1.0)
        values: dict[bytes, set[bytes]] = {}
        for m in published:
            values.setdefault(m.key(), set()).add(m.value())
        assert len(published) == 60 and len(values) == 50
        assert {len(v) for v in values.values()} == {1}
        # B's own requests were produced (a duplicate the workers decided once), but it
        # answered none with a stand-in of its own.
        assert 'fraudstream_api_standins_total{cause="timeout"}' not in b.metrics()
    finally:
        for api in (a, b, late):
            if api is not None:
                api.stop()


def test_load_beyond_capacity_is_refused_at_once_not_queued(
        stack_settings, start_worker, tmp_path):
    worker = start_worker()
    api = ApiProcess(stack_settings, tmp_path / "api.log", max_pending=40).start()
    try:
        assert _run(_post_all(api, [_body(_transactions(1, seed=6)[0])],
                              timeout_ms=10_000))[0][0] == 200
        assert worker.proc is not None
        os.killpg(worker.proc.pid, signal.SIGSTOP)
        try:
            answers = _run(_post_all(api, [_body(t) for t in _transactions(300, seed=7)],
                                     timeout_ms=1500))
        finally:
            os.killpg(worker.proc.pid, signal.SIGCONT)
        by_status: dict[int, list[Any]] = {}
        for a in answers:
            by_status.setdefault(a[0], []).append(a)
        assert set(by_status) <= {200, 429}, {s: len(v) for s, v in by_status.items()}
        assert len(by_status.get(200, [])) <= 40  # at most max_pending waited
        refused = by_status[429]
        assert len(refused) >= 200
        assert all(a[1]["retry-after"] == "1" for a in refused)
        # refused at once, not after waiting out the deadline
        assert sorted(a[3] for a in refused)[len(refused) // 2] < 0.5
        assert max(a[3] for a in answers) < 1.5 + 0.5
    finally:
        api.stop()


def test_a_broker_that_is_down_gets_a_503_within_the_deadline(registry, tmp_path):
    with EmbeddedBroker(log_path=tmp_path / "tansu.log") as own:
        settings = Settings().replace(
            kafka={"bootstrap": own.bootstrap, "partitions": 1, "embedded": True},
            codec={"registry_url": registry.url})
        ensure_topics(settings)
        api = ApiProcess(settings, tmp_path / "api.log").start()
        try:
            txns = _transactions(2, seed=8)
            # no worker: the broker takes it, nobody decides, so a stand-in
            first = _run(_post_all(api, [_body(txns[0])], timeout_ms=300))[0]
            assert first[0] == 200 and first[1]["x-fraudstream-decision-source"] == "standin"
            own.stop()
            status, headers, body, elapsed = _run(_post_all(api, [_body(txns[1])],
                                                            timeout_ms=500))[0]
            assert status == 503, body
            assert headers["retry-after"] == "1"
            assert "acknowledge" in body["reason"] or "refused" in body["reason"]
            assert elapsed < 0.5 + 0.25
        finally:
            api.stop()


def test_https_and_bearer_tokens_from_a_file(stack_settings, tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout",
                    str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True,
                   capture_output=True)
    tokens = tmp_path / "tokens"
    tokens.write_text("# two during a rotation\nold-token\nnew-token\n")
    api = ApiProcess(stack_settings, tmp_path / "api.log", tokens="", tokens_file=str(tokens),
                     tls_certfile=str(cert), tls_keyfile=str(key)).start()
    try:
        trusted = ssl.create_default_context(cafile=str(cert))
        txns = iter(_transactions(40, seed=10))

        def status_of(token: str) -> int:
            req = urllib.request.Request(
                f"https://127.0.0.1:{api.port}/v1/decisions",
                data=json.dumps(_body(next(txns))).encode(),
                headers={"Authorization": f"Bearer {token}", "X-Fraudstream-Timeout-Ms": "200"})
            try:
                with urllib.request.urlopen(req, context=trusted, timeout=5) as r:
                    # no worker runs: the broker took it, nobody decided it in time
                    assert r.headers["X-Fraudstream-Decision-Source"] == "standin"
                    return r.status
            except urllib.error.HTTPError as exc:
                return exc.code

        for token, status in (("new-token", 200), ("old-token", 200), (TOKEN, 401), ("", 401)):
            assert status_of(token) == status, token
        # The rotation's end, while the API runs: the file now holds only the new token.
        rotated = tmp_path / "tokens.next"
        rotated.write_text("new-token\n")
        os.replace(rotated, tokens)
        wait_until(lambda: status_of("old-token") == 401, 10.0, "the old token refused",
                   [api])
        assert status_of("new-token") == 200
        assert "fraudstream_api_tokens 1.0" in api.metrics()
        # A file emptied by mistake is not taken: the API never runs with no token.
        tokens.write_text("")
        wait_until(lambda: "fraudstream_api_tokens_file_stale 1.0" in api.metrics(), 10.0,
                   "the emptied file refused", [api])
        assert status_of("new-token") == 200 and status_of("") == 401
        assert "new-token" not in api.log.read_text(errors="replace")
        with pytest.raises(OSError):  # plain HTTP is not served on that port
            urllib.request.urlopen(f"http://127.0.0.1:{api.port}/healthz", timeout=2)
    finally:
        api.stop()
