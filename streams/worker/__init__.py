"""The worker: the Faust app and its Kafka edge (batching, delivery, state restore, the
feature stores, metrics and status), around the Faust-free batch step in ``pipeline``."""
