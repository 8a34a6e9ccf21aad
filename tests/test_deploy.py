"""Offline validation of deploy/: the Dockerfile, the Compose file and the Kubernetes
manifests, without a container engine, a Compose binary or a cluster.

What is checked, and with what:

* Kubernetes built-in kinds: ``kubernetes-validate`` (the Kubernetes API's JSON schemas, in
  strict mode: an unknown or misspelled field is an error), at the oldest and newest
  versions named in :data:`K8S_VERSIONS`.
* KEDA's ScaledObject and TriggerAuthentication are custom resources that no bundled schema
  covers: they are checked against the fields KEDA documents for them and for its Kafka
  scaler (:data:`KEDA_SCALEDOBJECT_SPEC`, :data:`KEDA_KAFKA_METADATA`,
  :data:`KEDA_KAFKA_AUTH`), which catches a misspelled key but not every wrong value. The
  Kustomization is checked for its resources list only.
* Compose: the Compose Specification's JSON schema (as vendored by ``check-jsonschema``),
  then its structure with PyYAML: services, images, ``depends_on``, healthchecks, volumes.
* The Dockerfile: parsed by ``dockerfile-parse``; stages, base image, user, packages.
* Across all of them: every ``FRAUDSTREAM_*`` name is a real setting, every container's
  settings are accepted by the settings module itself (names, types, ranges), every
  ``fraudstream`` command line parses with the real CLI parser, and the ports of probes,
  healthchecks, scrapes and Services are the metrics ports those settings give.

The checks are functions that return a list of problems; the last tests break a copy of a
manifest on purpose and expect the checks to say so.
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from dockerfile_parse import DockerfileParser
from kubernetes_validate import utils as kv

from fraudstream.streams.cli.main import build_parser
from fraudstream.streams.settings import Settings, SettingsError, describe

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
COMPOSE = DEPLOY / "compose.yaml"
DOCKERFILE = DEPLOY / "Dockerfile"

#: Oldest Kubernetes the manifests are meant for, and the newest schemas bundled.
K8S_VERSIONS = ("1.29.0", kv.latest_version())

#: The image name the manifests use for fraudstream containers (kustomization sets where).
IMAGE = "fraudstream"

#: Kinds that are not built into Kubernetes, so not in kubernetes-validate's schemas.
CUSTOM_KINDS = {
    ("keda.sh/v1alpha1", "ScaledObject"),
    ("keda.sh/v1alpha1", "TriggerAuthentication"),
    ("kustomize.config.k8s.io/v1beta1", "Kustomization"),
}

# From KEDA's documentation (keda.sh/docs, "ScaledObject specification" and the "Apache
# Kafka" scaler, 2.x): the fields a ScaledObject's spec, a kafka trigger's metadata and its
# TriggerAuthentication parameters may have. A key outside them is a typo that KEDA would
# ignore or refuse at apply time.
KEDA_SCALEDOBJECT_SPEC = {
    "scaleTargetRef", "pollingInterval", "cooldownPeriod", "initialCooldownPeriod",
    "idleReplicaCount", "minReplicaCount", "maxReplicaCount", "fallback", "advanced",
    "triggers",
}
KEDA_SCALE_TARGET_REF = {"apiVersion", "kind", "name", "envSourceContainerName"}
KEDA_TRIGGER = {"type", "metadata", "authenticationRef", "name", "useCachedMetrics",
                "metricType"}
KEDA_KAFKA_METADATA = {
    "bootstrapServers", "consumerGroup", "topic", "lagThreshold", "activationLagThreshold",
    "offsetResetPolicy", "allowIdleConsumers", "excludePersistentLag",
    "scaleToZeroOnInvalidOffset", "limitToPartitionsWithLag",
    "ensureEvenDistributionOfPartitions", "version", "partitionLimitation", "sasl", "tls",
    "unsafeSsl",
}
KEDA_KAFKA_AUTH = {"sasl", "username", "password", "tls", "ca", "cert", "key",
                   "keyPassword", "keyEncoding"}
#: fraudstream's SASL mechanism -> KEDA's ``sasl`` value for the same login.
KEDA_SASL = {"PLAIN": "plaintext", "SCRAM-SHA-256": "scram_sha256",
             "SCRAM-SHA-512": "scram_sha512"}

#: Which setting gives each fraudstream role's metrics port.
PORT_SETTING = {
    "worker": ("worker", "metrics_port"),
    "controller": ("canary", "controller_metrics_port"),
    "autopilot": ("autopilot", "metrics_port"),
}


# ------------------------------------------------------------------------------ helpers

def setting_names() -> set[str]:
    """Every FRAUDSTREAM_* variable, from the settings module (as `fraudstream settings`)."""
    return {name for name, _default, _doc in describe()}


def subcommands() -> dict[str, argparse.ArgumentParser]:
    """The CLI's subcommands (``only=""``: their names without importing their modules)."""
    parser = build_parser(only="")
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise AssertionError("fraudstream's parser has no subcommands")


def command_problems(argv: list[str], where: str) -> list[str]:
    """``fraudstream ARGV`` is a real subcommand whose options the real parser accepts."""
    if not argv or argv[0] not in subcommands():
        return [f"{where}: `fraudstream {' '.join(argv)}`: no such subcommand"]
    try:
        build_parser(only=argv[0]).parse_args(argv)
    except SystemExit:
        return [f"{where}: `fraudstream {' '.join(argv)}`: refused by its parser"]
    return []


def settings_of(env: dict[str, str], where: str) -> tuple[Settings | None, list[str]]:
    """The settings a container with this environment starts with, or why it would not."""
    try:
        return Settings.from_env(env), []
    except SettingsError as exc:
        return None, [f"{where}: {exc}"]


def metrics_port(settings: Settings, role: str) -> int:
    section, name = PORT_SETTING[role]
    return int(getattr(getattr(settings, section), name))


def load_dockerfile(path: Path = DOCKERFILE) -> DockerfileParser:
    return DockerfileParser(path=str(path), cache_content=True)


def stages(dfp: DockerfileParser) -> list[list[dict[str, Any]]]:
    """The Dockerfile's instructions, one list per stage (comments dropped)."""
    out: list[list[dict[str, Any]]] = []
    for ins in dfp.structure:
        if ins["instruction"] == "FROM":
            out.append([])
        if ins["instruction"] != "COMMENT" and out:
            out[-1].append(ins)
    return out


def image_env(dfp: DockerfileParser) -> dict[str, str]:
    """The FRAUDSTREAM_* variables the final stage sets (every container starts with them)."""
    return {k: v for k, v in dfp.envs.items() if k.startswith("FRAUDSTREAM_")}


def image_uid(dfp: DockerfileParser) -> str:
    users = [i["value"] for i in stages(dfp)[-1] if i["instruction"] == "USER"]
    return users[-1].split(":")[0] if users else ""


def json_form(ins: dict[str, Any]) -> list[str]:
    try:
        value = json.loads(ins["value"])
    except json.JSONDecodeError:
        return []
    return value if isinstance(value, list) else []


def load_yaml_docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def k8s_docs() -> list[tuple[str, dict[str, Any]]]:
    """(file, document) for every resource the kustomization names, in its order."""
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    return [(name, doc) for name in kustomization["resources"]
            for doc in load_yaml_docs(K8S / name)]


def interpolate(value: Any) -> Any:
    """Compose's ``${VAR:-default}`` / ``${VAR}``, as with no such variable set."""
    if not isinstance(value, str):
        return value
    return re.sub(r"\$\{[A-Za-z_][A-Za-z0-9_]*(?::?-([^}]*))?\}",
                  lambda m: m.group(1) or "", value)


def compose_env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(interpolate(v)) for k, v in env.items()}


def is_fraudstream(image: str | None) -> bool:
    return bool(image) and str(image).split(":")[0].split("/")[-1] == IMAGE


def healthcheck_urls(test: Any) -> list[tuple[int, str]]:
    """(port, path) of every http://127.0.0.1|localhost URL in a healthcheck command."""
    text = " ".join(test) if isinstance(test, list) else str(test)
    return [(int(p), path) for p, path in
            re.findall(r"http://(?:127\.0\.0\.1|localhost):(\d+)(/[\w\-/]*)", text)]


def deploy_text_files() -> Iterator[Path]:
    for path in sorted(DEPLOY.rglob("*")):
        if path.is_file() and path.suffix in {"", ".yaml", ".yml", ".md", ".json", ".toml"}:
            yield path
    yield ROOT / ".dockerignore"


# ---------------------------------------------------------------------- the Dockerfile

def dockerfile_problems(dfp: DockerfileParser) -> list[str]:
    problems = []
    parts = stages(dfp)
    if len(parts) < 2:
        problems.append("Dockerfile: one stage; a builder stage and a runtime stage expected")
        return problems
    final = parts[-1]
    base = final[0]["value"].split()[0]
    if not re.fullmatch(r"python:3\.\d+-slim(-\w+)?(@sha256:[0-9a-f]+)?", base):
        problems.append(f"Dockerfile: final stage FROM {base}, not a python slim image")
    builder_base = parts[0][0]["value"].split()[0]
    if builder_base.split("@")[0] != base.split("@")[0]:
        problems.append(f"Dockerfile: builder FROM {builder_base} and final FROM {base} "
                        "differ: the copied venv and kernel need the same Python build")
    builder_runs = " ".join(i["value"] for i in parts[0] if i["instruction"] == "RUN")
    if not re.search(r"\bgcc\b", builder_runs):
        problems.append("Dockerfile: the builder installs no gcc (the kernel needs one)")
    if "fraudstream.state.kernel_aot" not in builder_runs:
        problems.append("Dockerfile: the builder does not compile the kernel ahead of time")
    if "wheel" not in builder_runs:
        problems.append("Dockerfile: the builder builds no wheel of the project")
    final_runs = " ".join(i["value"] for i in final if i["instruction"] == "RUN")
    for tool in ("gcc", "g++", "clang", "build-essential", "cc", "make"):
        if re.search(rf"(install[^&;|]*\s){re.escape(tool)}(\s|$)", final_runs):
            problems.append(f"Dockerfile: the final stage installs {tool}")
    if not any(i["instruction"] == "COPY" and "--from=" in i["value"] for i in final):
        problems.append("Dockerfile: the final stage copies nothing from the builder")
    uid = image_uid(dfp)
    if not uid or uid in {"0", "root"}:
        problems.append(f"Dockerfile: the final stage runs as {uid or 'root (no USER)'}")
    elif not uid.isdigit():
        problems.append(f"Dockerfile: USER {uid}: give a numeric UID (runAsNonRoot checks it)")
    if not any(i["instruction"] == "WORKDIR" for i in final):
        problems.append("Dockerfile: the final stage sets no WORKDIR")
    entry = [json_form(i) for i in final if i["instruction"] == "ENTRYPOINT"]
    if not entry or entry[-1] != ["fraudstream"]:
        problems.append(f"Dockerfile: ENTRYPOINT {entry[-1] if entry else None}, "
                        "not [\"fraudstream\"]")
    cmd = [json_form(i) for i in final if i["instruction"] == "CMD"]
    if not cmd or cmd[-1] != ["worker"]:
        problems.append(f"Dockerfile: CMD {cmd[-1] if cmd else None}, not [\"worker\"]")
    else:
        problems += command_problems(cmd[-1], "Dockerfile CMD")
    settings, errors = settings_of(image_env(dfp), "Dockerfile ENV")
    problems += errors
    volumes = [v for i in final if i["instruction"] == "VOLUME" for v in json_form(i)]
    if settings is not None:
        data_dir = str(settings.worker.data_dir)
        if not any(data_dir.startswith(v.rstrip("/") + "/") for v in volumes):
            problems.append(f"Dockerfile: FRAUDSTREAM_WORKER_DATA_DIR={data_dir} is on no "
                            f"VOLUME ({volumes})")
    cache = {s: [i["value"] for i in p if i["instruction"] == "ENV"
                 and "NUMBA_CACHE_DIR=" in i["value"]] for s, p in (("b", parts[0]),
                                                                      ("f", final))}
    kernel_dirs = {s: re.findall(r"NUMBA_CACHE_DIR=(\S+)", " ".join(v))
                   for s, v in cache.items()}
    if not kernel_dirs["b"] or kernel_dirs["b"] != kernel_dirs["f"]:
        problems.append(f"Dockerfile: NUMBA_CACHE_DIR (where the compiled kernel is kept) "
                        f"differs between the stages: {kernel_dirs}")
    return problems


def test_dockerfile() -> None:
    assert dockerfile_problems(load_dockerfile()) == []


def test_dockerignore_lets_in_what_the_wheel_is_built_from() -> None:
    """The build context is an allowlist: pyproject.toml, its readme and every package
    folder it maps (a folder added to pyproject.toml but not here would break the build)."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    needed = {"pyproject.toml", pyproject["project"]["readme"]}
    needed |= {d.split("/")[0] for d in
               pyproject["tool"]["setuptools"]["package-dir"].values()}
    lines = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()]
    allowed = {ln[1:].strip("/") for ln in lines if ln.startswith("!")}
    assert "*" in lines, ".dockerignore should exclude everything, then allow"
    assert needed <= allowed, f"not let into the build context: {sorted(needed - allowed)}"


# ------------------------------------------------------------------------- everywhere

def settings_named_problems(texts: dict[str, str]) -> list[str]:
    """Every FRAUDSTREAM_* word is a setting (a word ending in ``_`` or followed by ``*`` is
    a prefix of some)."""
    names = setting_names()
    problems = []
    for where, text in texts.items():
        for m in re.finditer(r"FRAUDSTREAM_[A-Z0-9_]*", text):
            word = m.group(0)
            prefix = word.endswith("_") or text[m.end():m.end() + 1] == "*"
            ok = any(n.startswith(word) for n in names) if prefix else word in names
            if not ok:
                problems.append(f"{where}: {word} is not a fraudstream setting")
    return problems


def test_every_setting_named_in_deploy_exists() -> None:
    texts = {str(p.relative_to(ROOT)): p.read_text() for p in deploy_text_files()}
    assert settings_named_problems(texts) == []


def readme_commands(text: str) -> tuple[set[str], list[list[str]]]:
    """From deploy/README.md: the subcommands named as `fraudstream WORD` (in code spans, or
    at the start of a line of a code block), and the full command lines run in the image
    (`docker run ... fraudstream:TAG ARGS`, `docker compose ... run --rm SERVICE ARGS`)."""
    blocks = "\n".join(re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S))
    words = set(re.findall(r"^\s*(?:\$\s*)?fraudstream\s+([a-z][a-z-]*)", blocks, re.M))
    words |= set(re.findall(r"`fraudstream ([a-z][a-z-]*)", text))
    argvs = []
    for line in blocks.splitlines():
        line = line.split("#", 1)[0]
        m = re.search(r"docker run (?:--?\S+ )*fraudstream:\S+ (.+)", line) or \
            re.search(r"docker compose .* run --rm \S+ (.+)", line)
        if m:
            argvs.append(m.group(1).split())
    return words, argvs


def test_every_command_in_deploy_readme_exists() -> None:
    """Each `fraudstream WORD` in deploy/README.md is a real subcommand, and each command
    line it runs in the image parses with the real parser."""
    words, argvs = readme_commands((DEPLOY / "README.md").read_text())
    assert words and argvs, "deploy/README.md names no fraudstream command"
    assert sorted(words - set(subcommands())) == []
    assert [p for argv in argvs for p in command_problems(argv, "deploy/README.md")] == []


# ---------------------------------------------------------------------------- Compose

def compose_schema_problems(path: Path) -> list[str]:
    """The Compose Specification's schema, as check-jsonschema vendors it."""
    run = subprocess.run([sys.executable, "-m", "check_jsonschema", "--builtin-schema",
                          "vendor.compose-spec", str(path)],
                         capture_output=True, text=True, check=False, timeout=120)
    return [] if run.returncode == 0 else [f"compose schema: {run.stdout}{run.stderr}"]


REQUIRED_SERVICES = {"kafka", "schema-registry", "redis", "prometheus", "grafana", "topics",
                     "worker", "controller", "autopilot"}


def compose_problems(doc: dict[str, Any], dfp: DockerfileParser) -> list[str]:
    problems: list[str] = []
    services: dict[str, dict[str, Any]] = doc.get("services") or {}
    missing = REQUIRED_SERVICES - set(services)
    if missing:
        problems.append(f"compose: services missing: {sorted(missing)}")
    declared = set(doc.get("volumes") or {})
    base_env = image_env(dfp)
    for name, svc in services.items():
        where = f"compose {name}"
        image = svc.get("image")
        if not image:
            problems.append(f"{where}: no image")
        for dep in svc.get("depends_on") or {}:
            if dep not in services:
                problems.append(f"{where}: depends_on {dep}, which is no service")
        one_shot = svc.get("restart") == "no"
        if not one_shot and not (svc.get("healthcheck") or {}).get("test"):
            problems.append(f"{where}: no healthcheck")
        for vol in svc.get("volumes") or []:
            source = vol.get("source") if isinstance(vol, dict) else (
                vol.split(":")[0] if ":" in vol else None)
            if not source:
                continue
            if source.startswith((".", "/")):
                if not (COMPOSE.parent / source).exists():
                    problems.append(f"{where}: mounts {source}, which does not exist")
            elif source not in declared:
                problems.append(f"{where}: volume {source} is not declared under volumes:")
        if not is_fraudstream(image):
            continue
        if not image.startswith(f"{IMAGE}:") or "build" not in svc:
            problems.append(f"{where}: fraudstream services build deploy/Dockerfile")
        elif svc["build"].get("dockerfile") != "deploy/Dockerfile" or \
                (COMPOSE.parent / svc["build"]["context"]).resolve() != ROOT:
            problems.append(f"{where}: build: not deploy/Dockerfile in the repository root")
        argv = [str(a) for a in svc.get("command") or json_form(
            [i for i in stages(dfp)[-1] if i["instruction"] == "CMD"][-1])]
        problems += command_problems(argv, where)
        env = {**base_env, **compose_env(svc)}
        settings, errors = settings_of(env, where)
        problems += errors
        if settings is None:
            continue
        host, _, port = settings.kafka.bootstrap.split(",")[0].rpartition(":")
        if host not in services:
            problems.append(f"{where}: FRAUDSTREAM_KAFKA_BOOTSTRAP names {host}, no service")
        registry = re.match(r"https?://([^:/]+)", settings.codec.registry_url)
        if not registry or registry.group(1) not in services:
            problems.append(f"{where}: FRAUDSTREAM_CODEC_REGISTRY_URL names no service")
        role = argv[0]
        if role in PORT_SETTING:
            want = metrics_port(settings, role)
            urls = healthcheck_urls((svc.get("healthcheck") or {}).get("test"))
            if not urls or any(p != want for p, _ in urls):
                problems.append(f"{where}: healthcheck {urls} is not on the {role} metrics "
                                f"port {want}")
            if role == "worker" and not {p for _, p in urls} & {"/healthz", "/readyz"}:
                problems.append(f"{where}: the worker's healthcheck asks neither /healthz "
                                "nor /readyz")
        if role == "worker":
            replicas = (svc.get("deploy") or {}).get("replicas", 1)
            if int(replicas) > settings.kafka.partitions:
                problems.append(f"{where}: {replicas} replicas, more than the "
                                f"{settings.kafka.partitions} partitions: idle workers")
            named = [v for v in svc.get("volumes") or [] if not str(v).startswith(".")]
            if named:
                problems.append(f"{where}: replicas share the volume {named}: each worker "
                                "needs a data dir of its own")
    kafka = services.get("kafka") or {}
    kenv = compose_env(kafka)
    if not str(kafka.get("image", "")).startswith("apache/kafka:"):
        problems.append("compose kafka: not the apache/kafka image")
    if "controller" not in kenv.get("KAFKA_PROCESS_ROLES", "") or \
            any("ZOOKEEPER" in k for k in kenv):
        problems.append("compose kafka: not in KRaft mode (process roles with controller)")
    if not str((services.get("schema-registry") or {}).get("image", "")).startswith(
            "confluentinc/cp-schema-registry:"):
        problems.append("compose schema-registry: not confluentinc/cp-schema-registry")
    return problems


def mounts(svc: dict[str, Any]) -> dict[str, str]:
    """target -> source of a Compose service's bind mounts."""
    out = {}
    for vol in svc.get("volumes") or []:
        parts = vol.split(":")
        if parts[0].startswith("."):
            out[parts[1]] = parts[0]
    return out


def observability_problems(doc: dict[str, Any], dfp: DockerfileParser) -> list[str]:
    """Prometheus scrapes each fraudstream role on its metrics port, loads the project's
    alert rules; Grafana gets the project's dashboard and a datasource of its uid."""
    problems = []
    services = doc["services"]
    prom = mounts(services["prometheus"])
    config_target = next((t for t in prom if t.endswith("prometheus.yml")), None)
    if config_target is None:
        return ["compose prometheus: no prometheus.yml mounted"]
    config = yaml.safe_load((COMPOSE.parent / prom[config_target]).read_text())
    for rule in config.get("rule_files") or []:
        target = str(Path(config_target).parent / rule)
        if target not in prom:
            problems.append(f"compose prometheus: rule file {rule} is not mounted at {target}")
        elif Path(prom[target]).name != "alerts.yml" or "prometheus" not in prom[target]:
            problems.append(f"compose prometheus: {target} is not deploy/prometheus/alerts.yml")
    scraped: dict[str, set[int]] = {}
    for job in config.get("scrape_configs") or []:
        for sd in job.get("dns_sd_configs") or []:
            for name in sd["names"]:
                scraped.setdefault(name, set()).add(int(sd["port"]))
        for sd in job.get("static_configs") or []:
            for target in sd["targets"]:
                host, _, port = target.rpartition(":")
                scraped.setdefault(host, set()).add(int(port))
    base_env = image_env(dfp)
    for name, svc in services.items():
        if not is_fraudstream(svc.get("image")) or not svc.get("command"):
            continue
        role = svc["command"][0]
        if role not in PORT_SETTING:
            continue
        settings, _ = settings_of({**base_env, **compose_env(svc)}, name)
        if settings is not None and scraped.get(name) != {metrics_port(settings, role)}:
            problems.append(f"compose prometheus: scrapes {name} on {scraped.get(name)}, its "
                            f"metrics port is {metrics_port(settings, role)}")
    graf = mounts(services["grafana"])
    provider_file = DEPLOY / "grafana/provisioning/dashboards/fraudstream.yaml"
    provider = yaml.safe_load(provider_file.read_text())["providers"][0]["options"]["path"]
    if graf.get(provider) != "./grafana/dashboards":
        problems.append(f"compose grafana: deploy/grafana/dashboards is not at {provider}")
    if graf.get("/etc/grafana/provisioning/dashboards") != "./grafana/provisioning/dashboards":
        problems.append("compose grafana: the project's dashboard provider is not mounted")
    sources = [s for t, s in graf.items() if "provisioning/datasources" in t]
    uids = {d["uid"] for s in sources for d in
            yaml.safe_load((COMPOSE.parent / s).read_text())["datasources"]}
    dashboard = (DEPLOY / "grafana/dashboards/fraudstream.json").read_text()
    wanted = set(re.findall(r'"datasource":\s*\{[^}]*"uid":\s*"([^"$]+)"', dashboard))
    if not wanted or not wanted <= uids:
        problems.append(f"compose grafana: the dashboard wants datasources {wanted}, "
                        f"provisioned: {uids}")
    return problems


def test_compose_matches_the_compose_specification() -> None:
    assert compose_schema_problems(COMPOSE) == []


def test_compose_structure() -> None:
    doc = yaml.safe_load(COMPOSE.read_text())
    assert compose_problems(doc, load_dockerfile()) == []


def test_compose_observability() -> None:
    doc = yaml.safe_load(COMPOSE.read_text())
    assert observability_problems(doc, load_dockerfile()) == []


@pytest.mark.skipif(shutil.which("promtool") is None,
                    reason="promtool missing (make test-deps installs prometheus)")
def test_compose_prometheus_config_is_valid(tmp_path: Path) -> None:
    """promtool reads the Compose scrape config with the alert rules beside it."""
    shutil.copy(DEPLOY / "compose/prometheus.yml", tmp_path / "prometheus.yml")
    shutil.copy(DEPLOY / "prometheus/alerts.yml", tmp_path / "alerts.yml")
    run = subprocess.run(["promtool", "check", "config", str(tmp_path / "prometheus.yml")],
                         capture_output=True, text=True, check=False, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr


# ------------------------------------------------------------------------- Kubernetes

def schema_problems(docs: list[tuple[str, dict[str, Any]]]) -> list[str]:
    """kubernetes-validate, strict, for every built-in kind; custom kinds must be known."""
    problems = []
    for name, doc in docs:
        key = (doc.get("apiVersion"), doc.get("kind"))
        if key in CUSTOM_KINDS:
            continue
        for version in K8S_VERSIONS:
            try:
                kv.validate(doc, version, strict=True)
            except kv.ValidationError as exc:
                path = ".".join(str(p) for p in exc.path)
                problems.append(f"{name} {doc['kind']}/{doc['metadata']['name']} "
                                f"(Kubernetes {version}): {path}: {exc.message}")
            except kv.SchemaNotFoundError as exc:
                problems.append(f"{name}: {exc.message}")
    return problems


def pod_spec(doc: dict[str, Any]) -> dict[str, Any] | None:
    if doc["kind"] in {"StatefulSet", "Deployment", "Job"}:
        return doc["spec"]["template"]["spec"]
    return None


def container_env(container: dict[str, Any], by_kind: dict[str, dict[str, Any]],
                  base: dict[str, str]) -> dict[str, str]:
    """What the container's process sees: the image's ENV, then envFrom, then env."""
    env = dict(base)
    for source in container.get("envFrom") or []:
        if "configMapRef" in source:
            cm = by_kind["ConfigMap"].get(source["configMapRef"]["name"]) or {}
            env.update({k: str(v) for k, v in (cm.get("data") or {}).items()})
        if "secretRef" in source:
            secret = by_kind["Secret"].get(source["secretRef"]["name"]) or {}
            env.update({k: str(v) for k, v in (secret.get("stringData") or {}).items()})
    for item in container.get("env") or []:
        if "value" in item:
            env[item["name"]] = str(item["value"])
    return env


def index(docs: list[tuple[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    by_kind: dict[str, dict[str, Any]] = {
        k: {} for k in ("ConfigMap", "Secret", "PersistentVolumeClaim", "Service",
                        "ServiceAccount", "StatefulSet", "Deployment", "Job",
                        "PodDisruptionBudget", "ScaledObject", "TriggerAuthentication",
                        "Namespace")}
    for _name, doc in docs:
        by_kind.setdefault(doc["kind"], {})[doc["metadata"]["name"]] = doc
    return by_kind


def matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def probe_port(probe: dict[str, Any], container: dict[str, Any]) -> int | None:
    port = probe.get("httpGet", {}).get("port")
    if isinstance(port, int):
        return port
    named = {p.get("name"): p["containerPort"] for p in container.get("ports") or []}
    return named.get(port)


def k8s_problems(docs: list[tuple[str, dict[str, Any]]], dfp: DockerfileParser) -> list[str]:
    problems: list[str] = []
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    namespace = kustomization.get("namespace")
    by_kind = index(docs)
    seen: set[tuple[str, str]] = set()
    for name, doc in docs:
        key = (doc["kind"], doc["metadata"]["name"])
        if key in seen:
            problems.append(f"{name}: {key} defined twice")
        seen.add(key)
        ns = doc["metadata"].get("namespace")
        if ns and ns != namespace:
            problems.append(f"{name}: {key} in namespace {ns}, not {namespace}")
    if namespace not in by_kind["Namespace"]:
        problems.append(f"k8s: no Namespace {namespace}")
    base_env = image_env(dfp)
    uid = image_uid(dfp)
    settings_by_role: dict[str, Settings] = {}
    for name, doc in docs:
        spec = pod_spec(doc)
        if spec is None:
            continue
        where = f"{name} {doc['kind']}/{doc['metadata']['name']}"
        template = doc["spec"]["template"]
        labels = template["metadata"].get("labels") or {}
        selector = (doc["spec"].get("selector") or {}).get("matchLabels")
        if doc["kind"] != "Job" and not matches(selector, labels):
            problems.append(f"{where}: selector {selector} does not match its pods {labels}")
        sa = spec.get("serviceAccountName")
        if sa and sa not in by_kind["ServiceAccount"]:
            problems.append(f"{where}: service account {sa} is not defined")
        security = spec.get("securityContext") or {}
        if not security.get("runAsNonRoot") or str(security.get("runAsUser")) != uid:
            problems.append(f"{where}: runAsNonRoot with runAsUser {uid} (the image's user) "
                            "expected")
        claims = {c["metadata"]["name"] for c in
                  doc["spec"].get("volumeClaimTemplates") or []}
        volumes = {v["name"]: v for v in spec.get("volumes") or []}
        for vol in volumes.values():
            if "secret" in vol and vol["secret"]["secretName"] not in by_kind["Secret"]:
                problems.append(f"{where}: volume {vol['name']}: no such Secret")
            claim = (vol.get("persistentVolumeClaim") or {}).get("claimName")
            if claim and claim not in by_kind["PersistentVolumeClaim"]:
                problems.append(f"{where}: volume {vol['name']}: no such claim {claim}")
        for container in spec["containers"]:
            cwhere = f"{where} container {container['name']}"
            for source in container.get("envFrom") or []:
                for kind, ref in (("ConfigMap", "configMapRef"), ("Secret", "secretRef")):
                    if ref in source and source[ref]["name"] not in by_kind[kind]:
                        problems.append(f"{cwhere}: envFrom {kind} {source[ref]['name']} "
                                        "is not defined")
            for mount in container.get("volumeMounts") or []:
                if mount["name"] not in volumes and mount["name"] not in claims:
                    problems.append(f"{cwhere}: mounts {mount['name']}, no such volume")
            if container["image"].split(":")[0] != IMAGE:
                continue
            argv = [str(a) for a in container.get("args") or []]
            if container.get("command"):
                problems.append(f"{cwhere}: sets command; the image's ENTRYPOINT is fraudstream")
            problems += command_problems(argv, cwhere)
            settings, errors = settings_of(container_env(container, by_kind, base_env), cwhere)
            problems += errors
            if settings is None or not argv:
                continue
            role = argv[0]
            if role in PORT_SETTING:
                settings_by_role[role] = settings
                problems += role_problems(doc, container, settings, role, claims,
                                          by_kind["Service"])
            mounted = [m["mountPath"] for m in container.get("volumeMounts") or []]
            for path in (settings.kafka.ssl_cafile, settings.kafka.ssl_certfile,
                         settings.kafka.ssl_keyfile):
                if path and not any(path.startswith(m.rstrip("/") + "/") for m in mounted):
                    problems.append(f"{cwhere}: {path} (a FRAUDSTREAM_KAFKA_SSL_* file) is "
                                    "on no mounted volume")
    for svc_name, svc in by_kind["Service"].items():
        selector = svc["spec"].get("selector") or {}
        pods = [d for d in by_kind["StatefulSet"].values()] + \
               [d for d in by_kind["Deployment"].values()]
        targets = [d for d in pods if matches(selector, d["spec"]["template"]["metadata"]
                                              .get("labels") or {})]
        if not targets:
            problems.append(f"Service {svc_name}: its selector matches no pods")
            continue
        for port in svc["spec"]["ports"]:
            for target in targets:
                names = {p.get("name"): p["containerPort"] for c in
                         target["spec"]["template"]["spec"]["containers"]
                         for p in c.get("ports") or []}
                tp = port.get("targetPort", port["port"])
                number = names.get(tp) if isinstance(tp, str) else tp
                if number not in names.values() or number != port["port"]:
                    problems.append(f"Service {svc_name}: port {port['port']} -> {tp}, not a "
                                    f"port of {target['metadata']['name']} ({names})")
    for pdb_name, pdb in by_kind["PodDisruptionBudget"].items():
        selector = pdb["spec"]["selector"]["matchLabels"]
        if not any(matches(selector, d["spec"]["template"]["metadata"]["labels"])
                   for d in [*by_kind["StatefulSet"].values(), *by_kind["Deployment"].values()]):
            problems.append(f"PodDisruptionBudget {pdb_name}: selects no pods")
    if not by_kind["PodDisruptionBudget"]:
        problems.append("k8s: no PodDisruptionBudget for the workers")
    if not any(d["spec"]["template"]["spec"]["containers"][0].get("args") == ["topics"]
               for d in by_kind["Job"].values()):
        problems.append("k8s: no Job running `fraudstream topics`")
    if "worker" not in settings_by_role:
        problems.append("k8s: no worker StatefulSet")
    else:
        problems += keda_problems(by_kind, settings_by_role["worker"])
    for role in ("controller", "autopilot"):
        if role not in settings_by_role:
            problems.append(f"k8s: no `fraudstream {role}` Deployment")
    return problems


def role_problems(doc: dict[str, Any], container: dict[str, Any], settings: Settings,
                  role: str, claims: set[str], services: dict[str, Any]) -> list[str]:
    """Per role: the kind and its replicas, the metrics port everywhere it is named, the
    worker's probes, grace period, resources, anti-affinity and data volume."""
    problems = []
    where = f"{doc['kind']}/{doc['metadata']['name']}"
    spec = doc["spec"]
    pod = spec["template"]["spec"]
    port = metrics_port(settings, role)
    ports = [p["containerPort"] for p in container.get("ports") or []]
    if ports != [port]:
        problems.append(f"{where}: container ports {ports}, its metrics port is {port}")
    note = spec["template"]["metadata"].get("annotations") or {}
    if note.get("prometheus.io/scrape") != "true" or note.get("prometheus.io/port") != str(port):
        problems.append(f"{where}: prometheus.io annotations do not scrape port {port}")
    if role in ("controller", "autopilot"):
        # controllers hold a lease and fence their moves: a standby replica takes over;
        # the autopilot keeps a ReadWriteOnce volume: one, Recreate
        replicas, strategy = ((2, "RollingUpdate") if role == "controller"
                              else (1, "Recreate"))
        if doc["kind"] != "Deployment" or spec.get("replicas") != replicas or \
                (spec.get("strategy") or {}).get("type") != strategy:
            problems.append(f"{where}: a Deployment, replicas {replicas}, {strategy}")
        probe = container.get("livenessProbe") or {}
        if probe_port(probe, container) != port:
            problems.append(f"{where}: liveness probe not on the metrics port {port}")
        return problems
    if doc["kind"] != "StatefulSet":
        problems.append(f"{where}: workers run as a StatefulSet (a data dir per pod)")
        return problems
    for kind, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        probe = container.get(kind) or {}
        if probe.get("httpGet", {}).get("path") != path or \
                probe_port(probe, container) != port:
            problems.append(f"{where}: {kind} should GET {path} on port {port}")
    if "terminationGracePeriodSeconds" not in pod:
        problems.append(f"{where}: no terminationGracePeriodSeconds")
    resources = container.get("resources") or {}
    if not (resources.get("requests") or {}).get("cpu") or \
            not (resources.get("requests") or {}).get("memory") or \
            not (resources.get("limits") or {}).get("memory"):
        problems.append(f"{where}: CPU and memory requests and a memory limit expected")
    anti = ((pod.get("affinity") or {}).get("podAntiAffinity") or {})
    if not anti:
        problems.append(f"{where}: no pod anti-affinity")
    headless = services.get(spec.get("serviceName")) or {}
    if (headless.get("spec") or {}).get("clusterIP") != "None":
        problems.append(f"{where}: serviceName {headless} is not a headless Service")
    data_dir = str(settings.worker.data_dir)
    models_dir = str(settings.scoring.models_dir)
    on_claim = [m["mountPath"] for m in container.get("volumeMounts") or []
                if m["name"] in claims]
    for what, path in (("FRAUDSTREAM_WORKER_DATA_DIR", data_dir),
                       ("FRAUDSTREAM_SCORING_MODELS_DIR", models_dir)):
        if not any(path.startswith(m.rstrip("/") + "/") for m in on_claim):
            problems.append(f"{where}: {what}={path} is not on the volumeClaimTemplate "
                            f"mounts {on_claim}")
    return problems


def keda_problems(by_kind: dict[str, dict[str, Any]], settings: Settings) -> list[str]:
    """The ScaledObject against KEDA's documented fields and against the settings."""
    problems = []
    objects = list(by_kind["ScaledObject"].values())
    if len(objects) != 1:
        return [f"k8s: {len(objects)} ScaledObjects, one expected (the workers)"]
    so = objects[0]
    where = f"ScaledObject/{so['metadata']['name']}"
    spec = so["spec"]
    problems += [f"{where}: spec.{k}: not a KEDA field" for k in
                 sorted(set(spec) - KEDA_SCALEDOBJECT_SPEC)]
    ref = spec.get("scaleTargetRef") or {}
    problems += [f"{where}: scaleTargetRef.{k}: not a KEDA field" for k in
                 sorted(set(ref) - KEDA_SCALE_TARGET_REF)]
    target = by_kind["StatefulSet"].get(ref.get("name"))
    if ref.get("kind") != "StatefulSet" or ref.get("apiVersion") != "apps/v1" or not target:
        return problems + [f"{where}: scaleTargetRef {ref} is not the workers' StatefulSet"]
    low, high = spec.get("minReplicaCount", 0), spec.get("maxReplicaCount", 100)
    partitions = settings.kafka.partitions
    if not 1 <= low <= target["spec"].get("replicas", 1) <= high:
        problems.append(f"{where}: want 1 <= minReplicaCount {low} <= the StatefulSet's "
                        f"replicas {target['spec'].get('replicas')} <= maxReplicaCount {high}")
    if high > partitions:
        problems.append(f"{where}: maxReplicaCount {high} > the {partitions} partitions of "
                        "the topics (FRAUDSTREAM_KAFKA_PARTITIONS): idle workers")
    triggers = spec.get("triggers") or []
    if len(triggers) != 1:
        return problems + [f"{where}: one kafka trigger expected, {len(triggers)} found"]
    trigger = triggers[0]
    problems += [f"{where}: trigger.{k}: not a KEDA field" for k in
                 sorted(set(trigger) - KEDA_TRIGGER)]
    meta = trigger.get("metadata") or {}
    if trigger.get("type") != "kafka":
        problems.append(f"{where}: trigger type {trigger.get('type')}, not kafka")
    problems += [f"{where}: kafka metadata.{k}: not a documented parameter" for k in
                 sorted(set(meta) - KEDA_KAFKA_METADATA)]
    for key in ("bootstrapServers", "consumerGroup", "topic", "lagThreshold"):
        if not isinstance(meta.get(key), str) or not meta[key]:
            problems.append(f"{where}: kafka metadata.{key} missing (a string)")
    expected = {"bootstrapServers": settings.kafka.bootstrap,
                "consumerGroup": settings.worker.app_id,  # Faust's group id is the app id
                "topic": settings.topics.transactions}
    for key, want in expected.items():
        if meta.get(key) != want:
            problems.append(f"{where}: metadata.{key} {meta.get(key)!r}, the workers' is "
                            f"{want!r}")
    if not str(meta.get("lagThreshold", "")).isdigit() or int(meta["lagThreshold"]) < 1:
        problems.append(f"{where}: lagThreshold {meta.get('lagThreshold')!r}: a positive "
                        "integer")
    protocol = settings.kafka.security_protocol
    want_sasl = KEDA_SASL[settings.kafka.sasl_mechanism] if protocol.startswith("SASL") \
        else None
    if meta.get("sasl", None if want_sasl is None else "") not in (want_sasl, "none"):
        problems.append(f"{where}: sasl {meta.get('sasl')!r}, the workers log in with "
                        f"{want_sasl!r}")
    want_tls = "enable" if protocol in ("SSL", "SASL_SSL") else "disable"
    if meta.get("tls", "disable") != want_tls:
        problems.append(f"{where}: tls {meta.get('tls')!r}, the workers use {want_tls!r}")
    auth_name = (trigger.get("authenticationRef") or {}).get("name")
    if want_sasl or want_tls == "enable":
        auth = by_kind["TriggerAuthentication"].get(auth_name)
        if not auth:
            return problems + [f"{where}: authenticationRef {auth_name}: not defined"]
        refs = auth["spec"].get("secretTargetRef") or []
        params = {r.get("parameter") for r in refs}
        problems += [f"TriggerAuthentication/{auth_name}: parameter {p}: not a kafka one"
                     for p in sorted(params - KEDA_KAFKA_AUTH)]
        if want_sasl and not {"username", "password"} <= params:
            problems.append(f"TriggerAuthentication/{auth_name}: no username/password")
        for r in refs:
            secret = by_kind["Secret"].get(r.get("name")) or {}
            if r.get("key") not in (secret.get("stringData") or {}) | (secret.get("data") or {}):
                problems.append(f"TriggerAuthentication/{auth_name}: {r.get('name')}/"
                                f"{r.get('key')}: no such Secret key")
    return problems


def kubernetes_problems(docs: list[tuple[str, dict[str, Any]]]) -> list[str]:
    return k8s_problems(docs, load_dockerfile())


def test_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert kustomization["apiVersion"] == "kustomize.config.k8s.io/v1beta1"
    assert kustomization["kind"] == "Kustomization"
    listed = kustomization["resources"]
    on_disk = sorted(p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")
    assert sorted(listed) == on_disk
    assert [i["name"] for i in kustomization.get("images") or []] == [IMAGE]


def test_kubernetes_schemas_strict() -> None:
    assert schema_problems(k8s_docs()) == []


def test_kubernetes_manifests_hang_together() -> None:
    assert kubernetes_problems(k8s_docs()) == []


# ------------------------------------------------- the checks catch a broken manifest

def _find(docs: list[tuple[str, dict[str, Any]]], kind: str) -> dict[str, Any]:
    return next(d for _n, d in docs if d["kind"] == kind)


def _worker(docs: list[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    return _find(docs, "StatefulSet")["spec"]["template"]["spec"]["containers"][0]


def test_checks_refuse_broken_kubernetes_manifests() -> None:
    def broken(change) -> list[str]:  # noqa: ANN001
        docs = copy.deepcopy(k8s_docs())
        change(docs)
        return schema_problems(docs) + kubernetes_problems(docs)

    def misspelled_field(docs):  # noqa: ANN001, ANN202
        c = _worker(docs)
        c["livenesProbe"] = c.pop("livenessProbe")

    def unknown_setting(docs):  # noqa: ANN001, ANN202
        _find(docs, "ConfigMap")["data"]["FRAUDSTREAM_WORKER_METRIC_PORT"] = "9464"

    def bad_value(docs):  # noqa: ANN001, ANN202
        _find(docs, "ConfigMap")["data"]["FRAUDSTREAM_KAFKA_SASL_MECHANISM"] = "SCRAM"

    def too_many_replicas(docs):  # noqa: ANN001, ANN202
        so = _find(docs, "ScaledObject")["spec"]
        so["maxReplicaCount"] = Settings.from_env(
            _find(docs, "ConfigMap")["data"]).kafka.partitions + 1

    def wrong_probe_port(docs):  # noqa: ANN001, ANN202
        _worker(docs)["readinessProbe"]["httpGet"]["port"] = 8080

    def moved_metrics_port(docs):  # noqa: ANN001, ANN202
        _find(docs, "ConfigMap")["data"]["FRAUDSTREAM_WORKER_METRICS_PORT"] = "9500"

    def wrong_group(docs):  # noqa: ANN001, ANN202
        _find(docs, "ScaledObject")["spec"]["triggers"][0]["metadata"]["consumerGroup"] = "x"

    def keda_typo(docs):  # noqa: ANN001, ANN202
        meta = _find(docs, "ScaledObject")["spec"]["triggers"][0]["metadata"]
        meta["lagTreshold"] = meta.pop("lagThreshold")

    def no_such_command(docs):  # noqa: ANN001, ANN202
        _worker(docs)["args"] = ["wroker"]

    def second_autopilot(docs):  # noqa: ANN001, ANN202
        next(d for _n, d in docs if d["kind"] == "Deployment" and
             d["metadata"]["name"] == "fraudstream-autopilot")["spec"]["replicas"] = 2

    for change in (misspelled_field, unknown_setting, bad_value, too_many_replicas,
                   wrong_probe_port, moved_metrics_port, wrong_group, keda_typo,
                   no_such_command, second_autopilot):
        assert broken(change), f"{change.__name__}: not caught"


def test_checks_refuse_broken_compose_and_dockerfile(tmp_path: Path) -> None:
    dfp = load_dockerfile()
    doc = yaml.safe_load(COMPOSE.read_text())

    def compose_broken(change) -> list[str]:  # noqa: ANN001
        d = copy.deepcopy(doc)
        change(d["services"])
        return compose_problems(d, dfp) + observability_problems(d, dfp)

    cases = {
        "unknown setting": lambda s: s["worker"]["environment"].update(
            FRAUDSTREAM_WORKER_THREADS="4"),
        "missing dependency": lambda s: s["worker"]["depends_on"].update(zookeeper={}),
        "replicas > partitions": lambda s: s["worker"]["deploy"].update(replicas=5),
        "healthcheck port": lambda s: s["worker"]["environment"].update(
            FRAUDSTREAM_WORKER_METRICS_PORT="9500"),
        "undeclared volume": lambda s: s["redis"].update(volumes=["cache:/data"]),
        "no healthcheck": lambda s: s["controller"].pop("healthcheck"),
        "no such command": lambda s: s["autopilot"].update(command=["autopliot"]),
    }
    for what, change in cases.items():
        assert compose_broken(change), f"compose, {what}: not caught"

    typo = tmp_path / "compose.yaml"
    typo.write_text(COMPOSE.read_text().replace("healthcheck:", "healthchek:", 1))
    assert compose_schema_problems(typo), "a misspelled Compose key passed the schema"

    text = DOCKERFILE.read_text()
    for what, bad in {
        "root user": text.replace("USER 10001:10001", "USER root"),
        "gcc in the final stage": text.replace("libgomp1", "libgomp1 gcc"),
        "one stage": "FROM python:3.11-slim\nUSER 10001\nENTRYPOINT [\"fraudstream\"]\n",
        "a full base image": text.replace("FROM python:3.11-slim\n", "FROM python:3.11\n"),
        "a setting that does not exist": text.replace("FRAUDSTREAM_FEATURES_KERNEL=aot",
                                                      "FRAUDSTREAM_FEATURE_KERNEL=aot"),
    }.items():
        path = tmp_path / "Dockerfile"
        path.write_text(bad)
        assert dockerfile_problems(load_dockerfile(path)), f"Dockerfile, {what}: not caught"

    assert settings_named_problems({"x": "FRAUDSTREAM_KAFKA_BOOTSTRAPS=kafka:9092"})
    words, argvs = readme_commands("```sh\nfraudstream wroker\n"
                                   "docker compose -f c.yaml run --rm t produce --speeed 5\n```")
    assert words - set(subcommands()) == {"wroker"}
    assert command_problems(argvs[0], "readme")
    assert not settings_named_problems({"x": "FRAUDSTREAM_CANARY_* and FRAUDSTREAM_KAFKA_"})
