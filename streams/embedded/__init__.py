"""Embedded servers for demos and tests: the Kafka broker and the schema registry."""
