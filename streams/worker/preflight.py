"""What ``fraudstream worker`` checks before it starts Faust: each setting that names a file,
a folder, a port or a service is tried, and the first that cannot be used stops the
worker with one line naming it (:class:`fraudstream.streams.errors.StartError`, printed by
:func:`fraudstream.streams.cli.main.main`), instead of a traceback or a retry loop deep in a
library.

The cheap local checks come first and nothing heavy (Faust, ONNX Runtime) is imported,
so a bad value is reported in about a second.
"""

from __future__ import annotations

import base64
import errno
import logging
import os
import socket
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fraudstream.streams.errors import CONFIG_EXIT, UNREACHABLE_EXIT, StartError
from fraudstream.streams.settings import Settings, WorkerSettings

if TYPE_CHECKING:
    from fraudstream.streams.worker.metrics import WorkerMetrics

log = logging.getLogger("fraudstream.worker")


def check_worker(settings: Settings) -> None:
    """Every check of a worker's start, in order; raises :class:`StartError`."""
    check_rules(settings.scoring.rules_path)
    check_rates(settings.worker.rates_path)
    check_data_dir(settings.worker.data_dir)
    if settings.worker.store == "rocksdb":
        lock_data_dir(settings.worker.data_dir)
        claim_data_dir(settings.worker.data_dir, settings.worker.app_id)
    check_models_dir(settings.scoring.models_dir)
    w = settings.worker
    if w.metrics_port and w.metrics_port_busy == "fail":
        check_metrics_port(w.metrics_address, w.metrics_port)
    check_services(settings)


def check_services(settings: Settings) -> None:
    """The broker (with its SASL/TLS settings) and the schema registry answer."""
    from fraudstream.streams.topics import connect

    connect(settings.kafka)
    check_registry(settings.codec.registry_url, settings.codec.registry_username,
                   settings.codec.registry_password, settings.kafka.connect_timeout_s)


def check_rules(path: Path) -> None:
    from fraudstream.scorers.rules import RuleSet
    from fraudstream.scorers.rules_file import RulesError

    try:
        RuleSet.load(path)
    except RulesError as exc:
        raise StartError(f"FRAUDSTREAM_SCORING_RULES_PATH: {exc}") from exc


def check_rates(path: Path) -> None:
    from fraudstream.schemas.fx import Rates, RatesError

    try:
        Rates.load(path)
    except RatesError as exc:
        raise StartError(f"FRAUDSTREAM_WORKER_RATES_PATH: rates table: {exc}") from exc


def check_data_dir(path: Path) -> None:
    """The state folder exists (or can be made) and a file can be written in it."""
    where = f"FRAUDSTREAM_WORKER_DATA_DIR={path}"
    if path.exists() and not path.is_dir():
        raise StartError(f"{where}: not a directory (the worker keeps its RocksDB state "
                         "there)")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".fraudstream-write-check-"):
            pass
    except OSError as exc:
        raise StartError(f"{where}: not writable: {exc.strerror or exc}") from exc


#: The open lock file of this process's data dir (held until the process ends).
_held: dict[Path, object] = {}


def lock_data_dir(path: Path) -> None:
    """Take the data dir for this process: a second worker on the same RocksDB state
    would fail deep in RocksDB (its LOCK file) once partitions are assigned. The lock is
    an flock, so a killed worker leaves none behind."""
    import fcntl

    lock = path / ".fraudstream.lock"
    handle = open(lock, "a+")  # noqa: SIM115 - held for the life of the process
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        handle.seek(0)
        holder = handle.read().strip() or "?"
        handle.close()
        raise StartError(f"FRAUDSTREAM_WORKER_DATA_DIR={path}: in use by another worker "
                         f"(pid {holder}); each worker needs its own data dir") from exc
    handle.truncate(0)
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    _held[path] = handle


#: The app id whose state a data dir holds, written there at the first start.
APP_ID_FILE = ".fraudstream-app-id"


def claim_data_dir(path: Path, app_id: str) -> None:
    """A data dir holds one app's RocksDB state. Faust keeps its tables under the folder
    without the app id in their path, so a worker of another app id (a new consumer group,
    a second deployment on the same volume) would read that state as its own: every card
    and merchant would start from the other app's history, and no error would say so.
    The first start writes the app id in the folder; a worker of another app id is
    refused. A folder from before the file existed is taken as this app's."""
    marker = path / APP_ID_FILE
    try:
        owner = marker.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        owner = ""
    except OSError as exc:
        raise StartError(f"FRAUDSTREAM_WORKER_DATA_DIR={path}: cannot read {marker.name}: "
                         f"{exc.strerror or exc}") from exc
    if owner == app_id:
        return
    if owner:
        raise StartError(f"FRAUDSTREAM_WORKER_DATA_DIR={path}: holds the state of app "
                         f"{owner!r}, not of FRAUDSTREAM_WORKER_APP_ID={app_id!r}; give "
                         "each app id its own data dir (or remove the folder: this "
                         "app's state is then rebuilt from its changelog)")
    tmp = marker.with_name(f"{marker.name}.{os.getpid()}")
    tmp.write_text(f"{app_id}\n", encoding="utf-8")
    tmp.replace(marker)


def check_models_dir(path: Path) -> None:
    """A missing registry folder is allowed (the rules decide alone) but said once; one
    that is not a readable folder is an error."""
    where = f"FRAUDSTREAM_SCORING_MODELS_DIR={path}"
    if not path.exists():
        log.warning("models: %s does not exist: deciding by rules only", where)
        return
    if not path.is_dir():
        raise StartError(f"{where}: not a directory (the model registry)")
    if not os.access(path, os.R_OK | os.X_OK):
        raise StartError(f"{where}: not readable")


def _metrics_where(address: str, port: int) -> str:
    return (f"FRAUDSTREAM_WORKER_METRICS_ADDRESS={address} "
            f"FRAUDSTREAM_WORKER_METRICS_PORT={port}")


def check_metrics_port(address: str, port: int) -> None:
    """Bind the port the way the metrics server will (address reuse on), then let it go."""
    where = _metrics_where(address, port)
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(
            address, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(addr)
    except OSError as exc:
        raise StartError(metrics_error(where, exc)) from exc


def serve_metrics(metrics: WorkerMetrics, w: WorkerSettings, probes: Any = None) -> int | None:
    """Start the worker's /metrics server (port 0: none). A port that is taken stops the
    worker with :class:`StartError`, unless FRAUDSTREAM_WORKER_METRICS_PORT_BUSY=warn: then
    one warning, and the worker runs without /metrics. Returns the port served."""
    if not w.metrics_port:
        return None
    try:
        return metrics.serve(w.metrics_port, w.metrics_address, probes)
    except OSError as exc:
        where = _metrics_where(w.metrics_address, w.metrics_port)
        if w.metrics_port_busy == "fail" or exc.errno != errno.EADDRINUSE:
            raise StartError(metrics_error(where, exc)) from exc
        log.warning("metrics: %s: the port is taken (FRAUDSTREAM_WORKER_METRICS_PORT_BUSY="
                    "warn): running without /metrics", where)
        return None


def metrics_error(where: str, exc: OSError) -> str:
    if exc.errno == errno.EADDRINUSE:
        return (f"{where}: the port is taken by another process; give each worker its own "
                "port, or FRAUDSTREAM_WORKER_METRICS_PORT_BUSY=warn to run without /metrics")
    return f"{where}: cannot serve /metrics there: {exc.strerror or exc}"


def check_registry(url: str, username: str = "", password: str = "",
                   timeout_s: float = 15.0) -> None:
    """The schema registry answers ``GET /subjects`` (retried until ``timeout_s`` while it
    cannot be reached; refused credentials or another answer stop at once)."""
    if url.startswith("mock://"):
        return
    request = urllib.request.Request(url.rstrip("/") + "/subjects")
    if username:
        token = base64.b64encode(f"{username}:{password}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    where = f"the schema registry at {url} (FRAUDSTREAM_CODEC_REGISTRY_URL)"
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(request, timeout=max(0.5, deadline - time.monotonic())):
                return
        except urllib.error.HTTPError as exc:
            if exc.code in (401, 403):
                raise StartError(f"{where} refused the credentials (HTTP {exc.code}); check "
                                 "FRAUDSTREAM_CODEC_REGISTRY_USERNAME and _PASSWORD",
                                 CONFIG_EXIT) from exc
            raise StartError(f"{where} answered HTTP {exc.code} to GET /subjects: is it a "
                             "Schema Registry?", CONFIG_EXIT) from exc
        except ValueError as exc:  # not a URL urllib can open
            raise StartError(f"{where}: not a usable URL: {exc}", CONFIG_EXIT) from exc
        except OSError as exc:  # URLError, timeouts, resets
            reason = getattr(exc, "reason", exc)
            why = getattr(reason, "strerror", None) or str(reason)
            if time.monotonic() >= deadline:
                raise StartError(f"cannot reach {where} within {timeout_s:g} s: {why}",
                                 UNREACHABLE_EXIT) from exc
            time.sleep(0.2)
