"""Operator errors: each configuration a worker cannot use stops ``fraudstream worker`` (the
real process) with one line on stderr, naming the setting or service, a non-zero exit
code, and no traceback. Exit 2: change the configuration; exit 3: a service could not be
reached.

SASL is tried for real: the embedded broker (Tansu) started with ``--authentication``
speaks SASL SCRAM and refuses an unknown user, and refuses the PLAIN mechanism. It keeps
users in its memory store and cannot be given one while authentication is on, so a
successful SASL login cannot be tried here.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fraudstream.streams.embedded.broker import broker_binary, free_port
from fraudstream.streams.processes import die_with_parent, stop_process
from fraudstream.streams.settings import Settings
from fraudstream.streams.worker.preflight import APP_ID_FILE, claim_data_dir

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parent.parent


def worker_env(settings: Settings, **overrides: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FRAUDSTREAM_")}
    env.update(settings.to_env())
    env.update(overrides)
    return env


def run_worker(env: dict[str, str], timeout_s: float = 60.0) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fraudstream", "worker"], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout_s)


def one_line(out: subprocess.CompletedProcess, code: int) -> str:
    """The one line a refused start prints; asserts the exit code, no traceback, nothing
    else on stderr (librdkafka's own retry lines included)."""
    assert "Traceback" not in out.stderr + out.stdout, out.stderr
    lines = out.stderr.splitlines()
    assert len(lines) == 1, out.stderr
    assert out.returncode == code, out.stderr
    return lines[0]


@pytest.fixture
def quiet_settings(stack_settings: Settings, tmp_path: Path) -> Settings:
    """The test's settings with a models folder that exists (a missing one is a warning
    line of its own) and a short connect timeout."""
    (tmp_path / "models").mkdir()
    return stack_settings.replace(scoring={"models_dir": tmp_path / "models"},
                                  kafka={"connect_timeout_s": 2.0})


def test_an_out_of_range_setting_is_refused_by_name_value_and_range(quiet_settings):
    out = run_worker(worker_env(quiet_settings, FRAUDSTREAM_WORKER_BATCH_MAX="-5"))
    assert one_line(out, 2) == \
        "fraudstream: FRAUDSTREAM_WORKER_BATCH_MAX=-5: out of range, allowed >= 1"
    out = run_worker(worker_env(quiet_settings, FRAUDSTREAM_WORKER_METRICS_PORT="70000"))
    assert one_line(out, 2) == \
        "fraudstream: FRAUDSTREAM_WORKER_METRICS_PORT=70000: out of range, allowed 0 to 65535"


def test_bad_rules_rates_and_models_files_are_one_line_each(quiet_settings, tmp_path):
    bad_toml = tmp_path / "broken.toml"
    bad_toml.write_text("version = \n")
    out = run_worker(worker_env(quiet_settings,
                                FRAUDSTREAM_SCORING_RULES_PATH=str(bad_toml)))
    assert one_line(out, 2) == (f"fraudstream: FRAUDSTREAM_SCORING_RULES_PATH: {bad_toml}: "
                                "not valid TOML: Invalid value (at line 1, column 11)")

    rules = tmp_path / "rules.toml"
    rules.write_text('version = "t1"\n[thresholds]\nreview = 0.5\ndecline = 0.9\n'
                     '[[rules]]\nid = "R1"\nkind = "amount"\nweight = 1.5\n')
    out = run_worker(worker_env(quiet_settings, FRAUDSTREAM_SCORING_RULES_PATH=str(rules)))
    assert one_line(out, 2).startswith(
        f"fraudstream: FRAUDSTREAM_SCORING_RULES_PATH: {rules}: rule 'R1', key ")

    out = run_worker(worker_env(quiet_settings, FRAUDSTREAM_WORKER_RATES_PATH=str(bad_toml)))
    assert one_line(out, 2) == (
        f"fraudstream: FRAUDSTREAM_WORKER_RATES_PATH: rates table: {bad_toml}: "
        "not valid TOML: Invalid value (at line 1, column 11)")

    out = run_worker(worker_env(quiet_settings,
                                FRAUDSTREAM_SCORING_MODELS_DIR=str(bad_toml)))
    assert one_line(out, 2) == (f"fraudstream: FRAUDSTREAM_SCORING_MODELS_DIR={bad_toml}: "
                                "not a directory (the model registry)")


def test_a_data_dir_that_cannot_be_used_is_one_line(quiet_settings, tmp_path):
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    out = run_worker(worker_env(quiet_settings, FRAUDSTREAM_WORKER_DATA_DIR=str(a_file)))
    assert one_line(out, 2) == (f"fraudstream: FRAUDSTREAM_WORKER_DATA_DIR={a_file}: not a "
                                "directory (the worker keeps its RocksDB state there)")
    below = a_file / "state"
    out = run_worker(worker_env(quiet_settings, FRAUDSTREAM_WORKER_DATA_DIR=str(below)))
    assert one_line(out, 2) == (f"fraudstream: FRAUDSTREAM_WORKER_DATA_DIR={below}: not "
                                "writable: Not a directory")
    # another process holds the folder (as a running worker does)
    (tmp_path / "held").mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; "
         "from fraudstream.streams.worker.preflight import lock_data_dir; "
         "lock_data_dir(Path(sys.argv[1])); "
         "print('locked', flush=True); time.sleep(60)", str(tmp_path / "held")],
        cwd=ROOT, stdout=subprocess.PIPE, text=True, preexec_fn=die_with_parent)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
        out = run_worker(worker_env(quiet_settings,
                                    FRAUDSTREAM_WORKER_DATA_DIR=str(tmp_path / "held")))
        assert one_line(out, 2) == (
            f"fraudstream: FRAUDSTREAM_WORKER_DATA_DIR={tmp_path / 'held'}: in use by "
            f"another worker (pid {holder.pid}); each worker needs its own data dir")
    finally:
        holder.kill()
        holder.wait()
    # a folder no process may create files in, root included (sysfs): not writable
    out = run_worker(worker_env(quiet_settings, FRAUDSTREAM_WORKER_DATA_DIR="/sys"))
    assert one_line(out, 2) == ("fraudstream: FRAUDSTREAM_WORKER_DATA_DIR=/sys: not "
                                "writable: Permission denied")


def test_a_data_dir_holding_another_apps_state_is_refused(quiet_settings, tmp_path):
    # A worker of app "payments-blue" ran here; "payments-green" would read its cards'
    # and merchants' state as its own.
    folder = tmp_path / "volume"
    folder.mkdir()
    claim_data_dir(folder, "payments-blue")
    claim_data_dir(folder, "payments-blue")  # its own app: taken again
    out = run_worker(worker_env(quiet_settings, FRAUDSTREAM_WORKER_DATA_DIR=str(folder),
                                FRAUDSTREAM_WORKER_APP_ID="payments-green"))
    assert one_line(out, 2) == (
        f"fraudstream: FRAUDSTREAM_WORKER_DATA_DIR={folder}: holds the state of app "
        "'payments-blue', not of FRAUDSTREAM_WORKER_APP_ID='payments-green'; give each app "
        "id its own data dir (or remove the folder: this app's state is then rebuilt from "
        "its changelog)")
    # a folder from before the app id was written down is taken by the first app
    old = tmp_path / "old"
    old.mkdir()
    claim_data_dir(old, "payments-green")
    assert (old / APP_ID_FILE).read_text() == "payments-green\n"


def test_an_unreachable_broker_and_registry_are_named_within_the_timeout(quiet_settings,
                                                                         tmp_path):
    port = free_port()
    started = time.monotonic()
    out = run_worker(worker_env(quiet_settings,
                                FRAUDSTREAM_KAFKA_BOOTSTRAP=f"127.0.0.1:{port}",
                                FRAUDSTREAM_SCORING_MODELS_DIR=str(tmp_path / "none")))
    assert time.monotonic() - started < 20
    # a missing models folder is one warning line: the rules decide alone
    warning, error = out.stderr.splitlines()
    assert warning == (f"models: FRAUDSTREAM_SCORING_MODELS_DIR={tmp_path / 'none'} does "
                       "not exist: deciding by rules only")
    assert "Traceback" not in out.stderr and out.returncode == 3, out.stderr
    assert error == (f"fraudstream: cannot reach Kafka at 127.0.0.1:{port} "
                     "(FRAUDSTREAM_KAFKA_BOOTSTRAP, PLAINTEXT) within 2 s: Connect to "
                     f"ipv4#127.0.0.1:{port} failed: Connection refused")

    url = f"http://127.0.0.1:{free_port()}"
    out = run_worker(worker_env(quiet_settings, FRAUDSTREAM_CODEC_REGISTRY_URL=url))
    assert one_line(out, 3) == (f"fraudstream: cannot reach the schema registry at {url} "
                                "(FRAUDSTREAM_CODEC_REGISTRY_URL) within 2 s: "
                                "Connection refused")


@pytest.fixture(scope="module")
def sasl_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Tansu with client authentication required (SASL SCRAM; no user exists)."""
    port = free_port()
    log = tmp_path_factory.mktemp("sasl") / "tansu.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [broker_binary(), "broker", "--listener-url", f"tcp://127.0.0.1:{port}",
             "--advertised-listener-url", f"tcp://127.0.0.1:{port}", "--authentication"],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            preexec_fn=die_with_parent)
    deadline = time.monotonic() + 20
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
    yield f"127.0.0.1:{port}"
    stop_process(proc, 10.0)


@pytest.mark.parametrize("mechanism, reason", [
    ("SCRAM-SHA-512", "SASL authentication error: SASL SCRAM authentication failed: broker "
                      "responded with unknown-user"),
    ("PLAIN", "SASL PLAIN mechanism handshake failed: Local: Broker transport failure: "
              "broker's supported mechanisms: (n/a)"),
], ids=["scram-unknown-user", "plain-mechanism-refused"])
def test_a_refused_sasl_login_stops_at_once_with_one_line(quiet_settings, sasl_broker,
                                                          mechanism, reason):
    """Before: librdkafka logged the refusal about every 50 ms for 15 s, then a
    traceback. Now the first refusal ends the start, well before the connect timeout."""
    env = worker_env(quiet_settings, FRAUDSTREAM_KAFKA_BOOTSTRAP=sasl_broker,
                     FRAUDSTREAM_KAFKA_SECURITY_PROTOCOL="SASL_PLAINTEXT",
                     FRAUDSTREAM_KAFKA_SASL_MECHANISM=mechanism,
                     FRAUDSTREAM_KAFKA_SASL_USERNAME="fraud",
                     FRAUDSTREAM_KAFKA_SASL_PASSWORD="not-the-password",
                     FRAUDSTREAM_KAFKA_CONNECT_TIMEOUT_S="30")
    started = time.monotonic()
    out = run_worker(env)
    assert time.monotonic() - started < 15, "the refusal must not wait out the timeout"
    line = one_line(out, 2)
    assert line == (f"fraudstream: Kafka at {sasl_broker} refused SASL authentication "
                    f"(mechanism {mechanism}, user 'fraud'): {reason}; check "
                    "FRAUDSTREAM_KAFKA_SASL_MECHANISM, FRAUDSTREAM_KAFKA_SASL_USERNAME and "
                    "FRAUDSTREAM_KAFKA_SASL_PASSWORD")
    assert "not-the-password" not in out.stderr + out.stdout


def test_a_tls_file_that_cannot_be_used_is_one_line(quiet_settings, tmp_path):
    missing, junk = tmp_path / "missing.pem", tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    tls = {"FRAUDSTREAM_KAFKA_SECURITY_PROTOCOL": "SSL"}
    out = run_worker(worker_env(quiet_settings, **tls,
                                FRAUDSTREAM_KAFKA_SSL_CAFILE=str(missing)))
    assert one_line(out, 2) == (f"fraudstream: FRAUDSTREAM_KAFKA_SSL_CAFILE={missing}: "
                                "cannot read it: No such file or directory")
    out = run_worker(worker_env(quiet_settings, **tls, FRAUDSTREAM_KAFKA_SSL_CAFILE=str(junk)))
    assert one_line(out, 2).startswith(
        "fraudstream: the Kafka client refused the FRAUDSTREAM_KAFKA_* settings: Failed to "
        "create admin client: ssl.ca.location failed: ")


def test_topics_produce_and_tail_report_an_unreachable_service_in_one_line(quiet_settings):
    port = free_port()
    env = worker_env(quiet_settings, FRAUDSTREAM_KAFKA_BOOTSTRAP=f"127.0.0.1:{port}")
    out = subprocess.run([sys.executable, "-m", "fraudstream", "topics"], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert one_line(out, 3).startswith(f"fraudstream: cannot reach Kafka at 127.0.0.1:{port}")
    url = f"http://127.0.0.1:{free_port()}"
    env = worker_env(quiet_settings, FRAUDSTREAM_CODEC_REGISTRY_URL=url)
    for command in (["produce", "--count", "1"], ["tail", "decisions", "--count", "1"]):
        out = subprocess.run([sys.executable, "-m", "fraudstream", *command], env=env,
                             cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert one_line(out, 3).startswith(
            f"fraudstream: cannot reach the schema registry at {url} "), command


def test_a_taken_metrics_port_stops_the_worker_unless_told_to_warn(quiet_settings, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        settings = quiet_settings.replace(worker={"metrics_port": port})
        out = run_worker(worker_env(settings))
        assert one_line(out, 2) == (
            f"fraudstream: FRAUDSTREAM_WORKER_METRICS_ADDRESS=0.0.0.0 "
            f"FRAUDSTREAM_WORKER_METRICS_PORT={port}: the port is taken by another "
            "process; give each worker its own port, or "
            "FRAUDSTREAM_WORKER_METRICS_PORT_BUSY=warn to run without /metrics")

        log = tmp_path / "warn.log"
        with open(log, "wb") as sink:
            proc = subprocess.Popen(
                [sys.executable, "-m", "fraudstream", "worker", "--loglevel", "info"],
                env=worker_env(settings, FRAUDSTREAM_WORKER_METRICS_PORT_BUSY="warn"),
                cwd=ROOT, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True,
                preexec_fn=die_with_parent)
        try:
            deadline = time.monotonic() + 60
            while "Worker ready" not in log.read_text(errors="replace"):
                assert proc.poll() is None, log.read_text()
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.2)
            text = log.read_text(errors="replace")
            assert (f"FRAUDSTREAM_WORKER_METRICS_PORT={port}: the port is taken "
                    "(FRAUDSTREAM_WORKER_METRICS_PORT_BUSY=warn): running without /metrics"
                    ) in text
        finally:
            stop_process(proc, 30.0)


def test_metrics_listen_on_the_configured_address_only():
    """127.0.0.2 is a loopback address of its own: a server bound there is not reachable
    on 127.0.0.1, so the setting is honoured (the default, 0.0.0.0, answers on both)."""
    import urllib.error
    import urllib.request

    from fraudstream.streams.worker.metrics import WorkerMetrics

    port = WorkerMetrics().serve(0, "127.0.0.2")
    with urllib.request.urlopen(f"http://127.0.0.2:{port}/metrics", timeout=5) as resp:
        assert b"fraudstream_transactions_total" in resp.read()
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5)
    assert Settings().worker.metrics_address == "0.0.0.0"


def test_serve_metrics_raises_or_warns_on_a_port_taken_after_the_start_checks(caplog):
    """The same rule when the port is taken between the start checks and the server's
    bind (build_worker serves /metrics through serve_metrics)."""
    from fraudstream.streams.errors import StartError
    from fraudstream.streams.settings import WorkerSettings
    from fraudstream.streams.worker.metrics import WorkerMetrics
    from fraudstream.streams.worker.preflight import serve_metrics

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(StartError, match=f"METRICS_PORT={port}: the port is taken"):
            serve_metrics(WorkerMetrics(), WorkerSettings(metrics_port=port))
        with caplog.at_level("WARNING", logger="fraudstream.worker"):
            assert serve_metrics(WorkerMetrics(), WorkerSettings(
                metrics_port=port, metrics_port_busy="warn")) is None
        assert "running without /metrics" in caplog.text
    assert serve_metrics(WorkerMetrics(), WorkerSettings(metrics_port=0)) is None
