"""A byte-level Kafka proxy for one test: lets Debian's kcat talk to the embedded broker.

Debian's kcat is built on librdkafka 2.0.2, which cannot parse the tagged fields that
Tansu appends to its ApiVersions v3 response ("Protocol read buffer underflow ... at
274/279"), and librdkafka 2.x always sends ApiVersions. This proxy forwards every byte
unchanged except that response, from which it drops the trailing tagged fields (optional
feature flags no client here needs). The broker advertises the proxy's address, so every
connection goes through it. Apache Kafka needs none of this.
"""

from __future__ import annotations

import asyncio
import struct
import threading

API_VERSIONS = 18


def _uvarint(buf: bytes, pos: int) -> tuple[int, int]:
    shift = value = 0
    while True:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


def strip_apiversions_tags(body: bytes) -> bytes:
    """``body`` = correlation id + ApiVersions v3 response; returns it with no tagged fields."""
    pos = 4 + 2  # correlation id, error_code
    count, pos = _uvarint(body, pos)
    for _ in range(max(count - 1, 0)):
        pos += 6  # api_key, min_version, max_version
        tags, pos = _uvarint(body, pos)
        for _ in range(tags):
            _tag, pos = _uvarint(body, pos)
            size, pos = _uvarint(body, pos)
            pos += size
    pos += 4  # throttle_time_ms
    return body[:pos] + b"\x00"


class ApiVersionsProxy:
    def __init__(self, upstream_port: int, port: int) -> None:
        self.upstream_port = upstream_port
        self.port = port
        self.loop = asyncio.new_event_loop()
        self._server: asyncio.base_events.Server | None = None
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def start(self) -> ApiVersionsProxy:
        self._thread.start()
        fut = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._client, "127.0.0.1", self.port), self.loop
        )
        self._server = fut.result(10)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self.loop.call_soon_threadsafe(self._server.close)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)

    async def _client(self, c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter) -> None:
        u_reader, u_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        rewrite: set[int] = set()  # correlation ids of ApiVersions v3+ requests

        async def upstream() -> None:
            while frame := await _frame(c_reader):
                api_key, version, corr = struct.unpack(">hhi", frame[:8])
                if api_key == API_VERSIONS and version >= 3:
                    rewrite.add(corr)
                u_writer.write(struct.pack(">i", len(frame)) + frame)
                await u_writer.drain()
            u_writer.close()

        async def downstream() -> None:
            while frame := await _frame(u_reader):
                (corr,) = struct.unpack(">i", frame[:4])
                if corr in rewrite:
                    rewrite.discard(corr)
                    frame = strip_apiversions_tags(frame)
                c_writer.write(struct.pack(">i", len(frame)) + frame)
                await c_writer.drain()
            c_writer.close()

        await asyncio.gather(upstream(), downstream(), return_exceptions=True)


async def _frame(reader: asyncio.StreamReader) -> bytes | None:
    try:
        (size,) = struct.unpack(">i", await reader.readexactly(4))
        return await reader.readexactly(size)
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
