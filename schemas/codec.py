"""What bytes on our topics mean: Avro in the Confluent wire format, or JSON on input.

Wire format: one magic byte ``0``, the schema id as a 4-byte big-endian integer, then the
Avro binary body. Schema ids come from a Schema Registry through
``confluent_kafka.schema_registry``: a real registry by URL, or ``mock://...`` (in-process).
With ``mock://`` every process registers the project's schemas in the same fixed order
(:data:`SCHEMAS`), so ids agree between the producer, the worker and the tests; anything
shared with other teams uses a real registry.

Decoding never raises anything but :class:`DecodeError`, whose ``kind`` and ``field`` end up
in the dead-letter record. Transactions whose writer schema is the project's own are read
by hand (``schemas/transaction_reader.py``), at half fastavro's cost; whatever that reader
does not take as is, and every other writer schema, fastavro reads, as it reads every
other record type.
"""

from __future__ import annotations

import io
import json
import struct
import time
from collections.abc import Mapping
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import fastavro
import orjson
from confluent_kafka.schema_registry import Schema, SchemaRegistryClient
from confluent_kafka.schema_registry.error import SchemaRegistryError
from fastavro.read import SchemaResolutionError

if TYPE_CHECKING:
    from fraudstream.schemas.decision_writer import DecisionWriter
    from fraudstream.schemas.transaction_fast import CheckedReader
    from fraudstream.schemas.transaction_reader import Reader

SCHEMA_DIR = Path(__file__).resolve().parent
MAGIC = 0
UNKNOWN_ID_RETRY_S = 30.0
_HEADER = struct.Struct(">bI")

#: Registration order (fixed: with ``mock://`` registries it decides the ids).
SCHEMAS = ("transaction", "label", "decision", "dead_letter", "drift_event", "feature_vector")


class DecodeError(Exception):
    """A record's bytes cannot be read. ``kind``: decode, schema or oversize."""

    def __init__(self, kind: str, reason: str, field: str | None = None) -> None:
        super().__init__(reason)
        self.kind = kind
        self.reason = reason
        self.field = field


@cache
def schema_text(name: str) -> str:
    return (SCHEMA_DIR / f"{name}.avsc").read_text()


@cache
def parsed_schema(name: str) -> Any:
    return fastavro.parse_schema(json.loads(schema_text(name)))


def make_registry(url: str, username: str = "", password: str = "") -> SchemaRegistryClient:
    conf: dict[str, Any] = {"url": url}
    if username:
        conf["basic.auth.user.info"] = f"{username}:{password}"
    return SchemaRegistryClient.new_client(conf)


class AvroCodec:
    """Encodes and decodes one record type, registered under ``subject``."""

    def __init__(self, registry: SchemaRegistryClient, name: str, subject: str) -> None:
        self.registry = registry
        self.name = name
        self.schema = parsed_schema(name)
        self.schema_id = registry.register_schema(subject, Schema(schema_text(name), "AVRO"))
        self._header = _HEADER.pack(MAGIC, self.schema_id)
        #: The decision codec's hand-written writer (None: fastavro writes every record).
        self.writer: DecisionWriter | None = None
        if name == "decision":  # one per transaction: written by hand when the schema allows
            from fraudstream.schemas.decision_writer import writer_for

            writer = writer_for(json.loads(schema_text(name)), self._header,
                                fallback=self._fastavro_encode)
            if writer is not None:
                self.encode = writer.encode  # type: ignore[method-assign]
                self.writer = writer
        # one per record on the input topic: read by hand when the writer schema is ours
        self._read: Reader | None = None
        self._peek: Any = None
        self._checked: Any = None
        if name == "transaction":
            from fraudstream.schemas.transaction_fast import read_checked
            from fraudstream.schemas.transaction_reader import peek_event_time, reader_for

            self._read = reader_for(json.loads(schema_text(name)))
            self._peek = peek_event_time
            self._checked = read_checked if self._read is not None else None
        # writer schema id -> parsed writer schema (None: same as ours, no resolution)
        self._writers: dict[int, Any] = {self.schema_id: None}
        self._unknown: dict[int, float] = {}  # schema id -> when the registry said no

    def encode(self, record: Mapping[str, Any]) -> bytes:
        return self._fastavro_encode(record)

    def _fastavro_encode(self, record: Mapping[str, Any]) -> bytes:
        out = io.BytesIO()
        out.write(self._header)
        fastavro.schemaless_writer(out, self.schema, record)
        return out.getvalue()

    def decode(self, data: bytes) -> dict[str, Any]:
        if self._read is not None and (data[:5] == self._header
                                       or self._writer_of(data) is None):
            try:
                record, end = self._read(data, 5)
            except Exception:
                pass  # bytes it does not take as is: fastavro reads them, or names the error
            else:
                if end == len(data):
                    return record
        return self._fastavro_decode(data)

    def checked_reader(self) -> tuple[bytes, CheckedReader] | None:
        """For the transaction codec: the header of a record in our own schema, and
        :func:`fraudstream.schemas.transaction_fast.read_checked` for its body (what
        ``validate_transaction(self.decode(data), ...)`` returns for the common record, in
        one pass, or None: decode and validate it that way). None for other codecs."""
        if self._checked is None:
            return None
        return self._header, self._checked

    def event_time(self, data: bytes) -> int | None:
        """A transaction's ``event_time`` read without decoding the rest, for a record in
        our own schema (None otherwise: decode it to know)."""
        if self._read is None or data[:5] != self._header:
            return None
        try:
            return self._peek(data, 5)  # type: ignore[no-any-return]
        except (ValueError, IndexError):
            return None

    def _writer_of(self, data: bytes) -> Any:
        """The parsed writer schema of a record (None: ours); DecodeError when there is
        none to read it with."""
        if len(data) < 6 or data[0] != MAGIC:
            raise DecodeError("decode", "not Avro in the Confluent wire format (no magic byte 0)")
        writer = self._writer(int.from_bytes(data[1:5], "big"))
        if isinstance(writer, DecodeError):
            raise writer
        return writer

    def _fastavro_decode(self, data: bytes) -> dict[str, Any]:
        writer = self._writer_of(data)
        buf = io.BytesIO(data)
        buf.seek(5)
        try:
            if writer is None:
                record = fastavro.schemaless_reader(buf, self.schema, None)
            else:
                record = fastavro.schemaless_reader(buf, writer, self.schema)
        except SchemaResolutionError as exc:
            schema_id = int.from_bytes(data[1:5], "big")
            raise DecodeError(
                "schema", f"schema id {schema_id} cannot be read as {self.name}: {exc}"
            ) from exc
        except Exception as exc:  # fastavro raises many types on corrupt input
            raise DecodeError("decode", f"corrupt Avro body: {type(exc).__name__}: {exc}") from exc
        if buf.tell() != len(data):
            raise DecodeError("decode", f"{len(data) - buf.tell()} trailing bytes after the record")
        if not isinstance(record, dict):
            raise DecodeError("decode", "Avro body is not a record")
        return record

    def _writer(self, schema_id: int) -> Any:
        try:
            return self._writers[schema_id]
        except KeyError:
            pass
        missed = self._unknown.get(schema_id)
        if missed is not None and time.monotonic() - missed < UNKNOWN_ID_RETRY_S:
            raise DecodeError("schema", f"unknown schema id {schema_id}")
        try:
            found = self.registry.get_schema(schema_id)
        except (SchemaRegistryError, KeyError, ValueError) as exc:
            # remembered for a while: a flood of bad ids must not flood the registry
            self._unknown[schema_id] = time.monotonic()
            raise DecodeError("schema", f"unknown schema id {schema_id}") from exc
        if found is None or found.schema_type not in (None, "AVRO"):
            raise DecodeError("schema", f"schema id {schema_id} is not an Avro schema")
        try:
            writer_json = json.loads(found.schema_str)
            writer = fastavro.parse_schema(writer_json)
        except Exception as exc:
            raise DecodeError("schema", f"schema id {schema_id} is not valid Avro") from exc
        if writer == self.schema:
            # our own schema under another id: fastavro reads it without resolution too
            self._writers[schema_id] = None
            return None
        problem = incompatibility(writer_json, json.loads(schema_text(self.name)))
        if problem is not None:
            field, why = problem
            writer = DecodeError(
                "schema", f"{field}: {why} in writer schema id {schema_id}", field=field
            )
        self._writers[schema_id] = writer
        return writer


def _type_names(avro_type: Any) -> set[str]:
    if isinstance(avro_type, list):
        return set().union(*(_type_names(t) for t in avro_type))
    if isinstance(avro_type, dict):
        return {avro_type.get("logicalType") or avro_type["type"]}
    return {avro_type}


# Avro promotions a reader accepts (logical timestamp-millis and long are one type here)
_PROMOTIONS = {
    "int": {"long", "float", "double", "timestamp-millis"},
    "long": {"float", "double", "timestamp-millis"},
    "timestamp-millis": {"long", "float", "double"},
    "float": {"double"},
}


def incompatibility(writer: Any, reader: Any) -> tuple[str, str] | None:
    """The first reader field that a writer record schema cannot fill: (field, why).

    Names the field for the dead letter ("merchant_id: missing"), which the Avro
    resolution error alone does not.
    """
    if not isinstance(writer, dict) or writer.get("type") != "record":
        return ("(record)", "writer schema is not a record")
    wfields = {f["name"]: f for f in writer.get("fields", [])}
    for rf in reader["fields"]:
        wf = wfields.get(rf["name"])
        if wf is None:
            if "default" not in rf:
                return (rf["name"], "missing")
            continue
        rtypes, wtypes = _type_names(rf["type"]), _type_names(wf["type"])
        for wt in wtypes:
            if wt not in rtypes and not _PROMOTIONS.get(wt, set()) & rtypes:
                return (rf["name"], f"wrong type {wt}, expected {'/'.join(sorted(rtypes))}")
    return None


def decode_json(data: bytes) -> dict[str, Any]:
    try:
        record = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise DecodeError("decode", f"invalid JSON: {exc}") from exc
    if not isinstance(record, dict):
        raise DecodeError("decode", f"JSON value is a {type(record).__name__}, not an object")
    return record


class Codecs:
    """Every codec of the service, registered against one registry."""

    def __init__(self, registry: SchemaRegistryClient, topics: Any) -> None:
        subjects = {
            "transaction": f"{topics.transactions}-value",
            "label": f"{topics.labels}-value",
            "decision": f"{topics.decisions}-value",
            "dead_letter": f"{topics.dlq}-value",
            "drift_event": f"{topics.drift}-value",
            "feature_vector": f"{topics.features}-value",
        }
        for name in SCHEMAS:
            setattr(self, name, AvroCodec(registry, name, subjects[name]))
        for same in (topics.decisions_shadow, topics.decisions_standins):
            registry.register_schema(f"{same}-value", Schema(schema_text("decision"), "AVRO"))

    transaction: AvroCodec
    label: AvroCodec
    decision: AvroCodec
    dead_letter: AvroCodec
    drift_event: AvroCodec
    feature_vector: AvroCodec
