"""fraudstream: streaming real-time fraud scoring on Kafka.

One installed namespace; the repository keeps its folders at the top and the install maps
them here: ``fraudstream.schemas`` (what bytes mean), ``fraudstream.state`` (pure
features), ``fraudstream.scorers`` (rules, models, learners, drift),
``fraudstream.streams`` (the Kafka edge, worker, CLI and tools) and
``fraudstream.loadtest`` (benchmarks)."""
