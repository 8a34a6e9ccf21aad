"""``fraudstream api``: decisions for callers that wait for an answer over HTTP, taken from
the same streaming pipeline (see :mod:`fraudstream.streams.api.service`)."""
