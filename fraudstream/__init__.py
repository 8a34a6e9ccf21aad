"""fraudstream: streaming real-time fraud scoring on Kafka.

One installed namespace; the repository keeps its folders at the top and the install maps
them here: ``fraudstream.schemas`` (what bytes mean), ``fraudstream.state`` (pure
features), ``fraudstream.scorers`` (rules, models, learners, drift),
``fraudstream.streams`` (the Kafka edge, worker, CLI and tools) and
``fraudstream.loadtest`` (benchmarks)."""

from pkgutil import extend_path

# Run from a checkout with fraudstream installed from a wheel, the repository root comes
# first on sys.path and this folder is found before the installed package: look for the
# sub-packages in the installed one too. (An editable install maps them itself.)
__path__ = extend_path(__path__, __name__)
