"""The ``fraudstream`` command and its subcommands (argument parsing; the work is in each
subcommand's module). ``fraudstream --help`` lists the subcommands: keep its text plain,
it is read in a terminal.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Any

from fraudstream.streams.settings import Settings, SettingsError, describe


def _cmd_broker(args: argparse.Namespace, settings: Settings) -> int:
    from fraudstream.streams.embedded.broker import run_forever

    port = args.port or int(settings.kafka.bootstrap.rsplit(":", 1)[1])
    return run_forever(port)


def _cmd_registry(args: argparse.Namespace, settings: Settings) -> int:
    from urllib.parse import urlsplit

    from fraudstream.streams.embedded.registry import run_forever

    return run_forever(args.port or urlsplit(settings.codec.registry_url).port or 8081)


def _cmd_topics(args: argparse.Namespace, settings: Settings) -> int:
    from fraudstream.streams.topics import ensure_topics

    for topic, partitions in ensure_topics(settings).items():
        print(f"{topic}\t{partitions} partitions")
    return 0


def _cmd_worker(args: argparse.Namespace, settings: Settings) -> int:
    from fraudstream.streams.worker.preflight import check_worker

    check_worker(settings)  # one line and exit 2 or 3 for what cannot be used
    from fraudstream.streams.topics import ensure_topics
    from fraudstream.streams.worker.app import run_worker

    ensure_topics(settings)
    run_worker(settings, loglevel=args.loglevel)
    return 0


def _cmd_produce(args: argparse.Namespace, settings: Settings) -> int:
    from fraudstream.streams.worker.preflight import check_services

    check_services(settings)  # broker and registry, or one line
    from fraudstream.streams.traffic.produce import main as produce_main

    return produce_main(args, settings)


def _cmd_tail(args: argparse.Namespace, settings: Settings) -> int:
    from fraudstream.streams.worker.preflight import check_services

    check_services(settings)  # broker and registry, or one line
    from fraudstream.streams.cli.tail import main as tail_main

    return tail_main(args, settings)


def _cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    from fraudstream.streams.demo.run import main as demo_main

    return demo_main(args, settings)


def _cmd_features(args: argparse.Namespace, settings: Settings) -> int:
    from fraudstream.streams.cli.features import run

    return run(args, settings)


def _cmd_generate(args: argparse.Namespace, settings: Settings) -> int:
    from fraudstream.streams.traffic.history import write_history

    return write_history(args)


def _cmd_train(args: argparse.Namespace, settings: Settings) -> int:
    from fraudstream.streams.cli.train import run

    return run(args, settings)


def _cmd_model(args: argparse.Namespace, settings: Settings) -> int:
    from fraudstream.streams.cli.model import run

    return run(args, settings)


def _cmd_controller(args: argparse.Namespace, settings: Settings) -> int:
    from fraudstream.streams.worker.preflight import check_services

    check_services(settings)  # broker and registry, or one line
    from fraudstream.streams.cli.canary import run_controller

    return run_controller(args, settings)


def _cmd_replay(args: argparse.Namespace, settings: Settings) -> int:
    from fraudstream.streams.worker.preflight import check_services

    check_services(settings)  # broker and registry, or one line
    from fraudstream.streams.cli.replay import run

    return run(args, settings)


def _cmd_retrain(args: argparse.Namespace, settings: Settings) -> int:
    from fraudstream.streams.worker.preflight import check_services

    check_services(settings)  # broker and registry, or one line
    from fraudstream.streams.cli.retrain import run

    return run(args, settings)


def _cmd_autopilot(args: argparse.Namespace, settings: Settings) -> int:
    from fraudstream.scorers.retraining import Policy
    from fraudstream.streams.errors import StartError
    from fraudstream.streams.worker.preflight import check_services

    try:
        Policy.of(settings.autopilot)
    except ValueError as exc:
        raise StartError(f"FRAUDSTREAM_AUTOPILOT_*: {exc}") from None
    check_services(settings)  # broker and registry, or one line
    from fraudstream.streams.cli.autopilot import run

    return run(args, settings)


def _cmd_rules(args: argparse.Namespace, settings: Settings) -> int:
    from fraudstream.streams.worker.preflight import check_services

    check_services(settings)  # broker and registry, or one line
    from fraudstream.streams.cli.rules import run

    return run(args, settings)


def _cmd_rates(args: argparse.Namespace, settings: Settings) -> int:
    from fraudstream.streams.worker.preflight import check_services

    check_services(settings)  # broker and registry, or one line
    from fraudstream.streams.cli.rates import run

    return run(args, settings)


def _cmd_api(args: argparse.Namespace, settings: Settings) -> int:
    from fraudstream.streams.worker.preflight import check_services

    check_services(settings)  # broker and registry, or one line
    from fraudstream.streams.cli.api import run

    return run(args, settings)


def _cmd_settings(args: argparse.Namespace, settings: Settings) -> int:
    for name, default, _doc in describe():
        print(f"{name}={default}")
    return 0


DESCRIPTION = """\
Streaming fraud scoring on Kafka: the scoring worker, an embedded broker and
schema registry, test traffic, exports of the topics, models and replays.
Settings come from FRAUDSTREAM_* environment variables: fraudstream settings
lists them."""

EPILOG = "Run 'fraudstream COMMAND --help' for the options of a command."


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The whole parser; with ``only``, the options of that one subcommand only (the others
    are listed, without their options): each subcommand's options live in its module, and
    ``fraudstream worker`` should not import the modules of ``train``, ``demo`` and the
    rest to start."""

    def wanted(command: str) -> bool:
        return only is None or only == command

    parser = argparse.ArgumentParser(prog="fraudstream", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, title="commands",
                                metavar="COMMAND")

    p = sub.add_parser("broker", help="run the embedded Kafka-compatible broker (in memory)")
    p.add_argument("--port", type=int, default=0, help="default: the port of KAFKA_BOOTSTRAP")
    p.set_defaults(func=_cmd_broker)

    p = sub.add_parser("registry", help="run the embedded Schema Registry (in memory)")
    p.add_argument("--port", type=int, default=0, help="default: the port of REGISTRY_URL")
    p.set_defaults(func=_cmd_registry)

    p = sub.add_parser("topics", help="create the topics")
    p.set_defaults(func=_cmd_topics)

    p = sub.add_parser("worker", help="run the scoring worker")
    p.add_argument("--loglevel", default="warning")
    p.set_defaults(func=_cmd_worker)

    def with_module(command: str, help: str, module: str, func: Any, **kwargs: Any) -> None:
        """A subcommand whose options live in ``module`` (its ``add_arguments``, and its
        ``DESCRIPTION`` if it has one), imported only when that command runs."""
        p = sub.add_parser(command, help=help, **kwargs)
        if wanted(command):
            options = importlib.import_module(f"fraudstream.streams.{module}")
            p.description = getattr(options, "DESCRIPTION", None)
            options.add_arguments(p)
        p.set_defaults(func=func)

    with_module("produce", "send generated or CSV traffic", "traffic.produce", _cmd_produce)
    with_module("tail", "print decoded records of a topic, or export a time range of them "
                "(JSON lines or CSV)", "cli.tail", _cmd_tail,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    with_module("demo", "run everything on embedded defaults with a live summary", "demo.run",
                _cmd_demo)
    with_module("generate", "write a simulated history (CSV, labels included)",
                "traffic.history", _cmd_generate)
    with_module("features", "compute the feature vectors of a CSV/Parquet history",
                "cli.features", _cmd_features)
    with_module("train", "train a model artifact from a labelled history", "cli.train",
                _cmd_train)
    with_module("retrain", "train a model artifact on a range of the live topics",
                "cli.retrain", _cmd_retrain)
    with_module("autopilot", "retrain on drift, learner error, new labels or a schedule, "
                "and roll a better challenger out through shadow and canary",
                "cli.autopilot", _cmd_autopilot)
    with_module("model", "the model registry: list, promote, rollback, shadow, seal",
                "cli.model", _cmd_model)
    with_module("replay", "replay a range of transactions through a champion and a "
                "challenger, with a diff report", "cli.replay", _cmd_replay)

    with_module("api", "serve POST /v1/decisions: a transaction in, the streamed decision "
                "out within the caller's deadline", "cli.api", _cmd_api,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    with_module("rules", "publish rules and blocklists to every worker, or list what was "
                "published", "cli.rules", _cmd_rules)
    with_module("rates", "publish the exchange-rates table to every worker and API "
                "instance, or list what was published", "cli.rates", _cmd_rates)
    p = sub.add_parser("controller", help="move canary rollouts through their steps, and "
                       "roll them back when a gate fails")
    p.add_argument("--metrics-port", type=int, default=None,
                   help="serve the controller's /metrics on this port (default: "
                        "FRAUDSTREAM_CANARY_CONTROLLER_METRICS_PORT)")
    p.set_defaults(func=_cmd_controller)

    p = sub.add_parser("settings", help="list every setting and its default")
    p.set_defaults(func=_cmd_settings)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run a subcommand. A configuration error (a setting out of range, a file or folder
    that cannot be used, a broker or registry that cannot be reached or refuses the
    credentials) is one line on stderr, ``fraudstream: ...``, and exit code 2 (fix the
    configuration) or 3 (a service could not be reached): never a traceback."""
    words = sys.argv[1:] if argv is None else argv
    command = next((w for w in words if not w.startswith("-")), None)
    args = build_parser(only=command).parse_args(argv)
    from fraudstream.streams.errors import CONFIG_EXIT, StartError

    try:
        settings = Settings.from_env()
    except SettingsError as exc:
        return _fail(str(exc), CONFIG_EXIT)
    from fraudstream.schemas.fx import RatesError
    from fraudstream.scorers.rules_file import RulesError

    try:
        return int(args.func(args, settings) or 0)
    except StartError as exc:
        return _fail(str(exc), exc.exit_code)
    except RatesError as exc:
        return _fail(f"rates table: {exc}", CONFIG_EXIT)
    except RulesError as exc:
        return _fail(f"rules: {exc}", CONFIG_EXIT)


def _fail(message: str, code: int) -> int:
    print(f"fraudstream: {' '.join(message.split())}", file=sys.stderr, flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
