"""Model artifacts on Kafka: a version's files carried in chunks on the artifacts topic
(``FRAUDSTREAM_TOPICS_ARTIFACTS``), so that a worker on any machine gets a version without a
shared folder or an object store.

Why Kafka and not a URL: the workers already hold credentials for the brokers and nothing
else; a version is a few MB (two ONNX models, metadata, a report); the topic is compacted,
one partition, keyed ``<version>/<file>/<chunk>``, and every byte is checked twice before
use: each file against the manifest's sha256 (written last, key ``<version>/MANIFEST``),
then the whole version as the registry loads it (its ``SHA256SUMS`` and probe batch).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

from fraudstream.scorers.registry import Registry
from fraudstream.streams.control.topic import control_consumer, read_to_end, write_acked
from fraudstream.streams.settings import Settings

#: Bytes per record: well under the brokers' default message size limit (1 MB).
CHUNK = 256 * 1024
MANIFEST = "MANIFEST"


class ArtifactTransferError(RuntimeError):
    """A version that cannot be sent or received whole and intact; the message says why."""


def upload(settings: Settings, registry: Registry, version: str,
           timeout_s: float = 60.0) -> dict:
    """Every file of ``version`` (checked as the registry loads it first), then its
    manifest; returns the manifest."""
    registry.load(version, sealed=True)
    folder = registry.root / version
    files: dict[str, dict] = {}
    manifest: dict = {}  # filled once every file went

    def records() -> Iterator[tuple[bytes, bytes]]:
        for path in sorted(p for p in folder.iterdir() if p.is_file()):
            data = path.read_bytes()
            chunks = max(1, -(-len(data) // CHUNK))
            for i in range(chunks):
                yield (f"{version}/{path.name}/{i:05d}".encode(),
                       data[i * CHUNK:(i + 1) * CHUNK])
            files[path.name] = {"sha256": hashlib.sha256(data).hexdigest(),
                                "size": len(data), "chunks": chunks}
        manifest.update(version=version, files=files, uploaded_at=int(time.time() * 1000))
        yield f"{version}/{MANIFEST}".encode(), json.dumps(manifest, sort_keys=True).encode()

    try:
        write_acked(settings, settings.topics.artifacts, records(), timeout_s,
                    max_bytes=CHUNK + 64 * 1024)
    except RuntimeError as exc:
        raise ArtifactTransferError(f"{version}: {exc}") from None
    return manifest


def download(settings: Settings, version: str, root: Path, timeout_s: float = 60.0) -> Path:
    """``version`` from the artifacts topic into ``root/version``, checked file by file
    against its manifest, then as the registry loads it; nothing is left in ``root`` when
    a check fails. Returns the folder."""
    consumer = control_consumer(settings, f"artifacts-{version}",
                                topic=settings.topics.artifacts)
    prefix = f"{version}/".encode()
    chunks: dict[str, dict[int, bytes]] = {}
    manifest = None
    try:
        for msg in read_to_end(consumer, timeout_s):
            key = msg.key() or b""
            if not key.startswith(prefix):
                continue
            rest = key[len(prefix):].decode()
            if rest == MANIFEST:
                manifest = json.loads(msg.value())
                continue
            name, _, index = rest.rpartition("/")
            chunks.setdefault(name, {})[int(index)] = msg.value() or b""
    finally:
        consumer.close()
    if manifest is None:
        raise ArtifactTransferError(f"{version}: no manifest on {settings.topics.artifacts} "
                                    "(never uploaded, or the upload did not finish)")
    tmp = root / f".{version}.download"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        for name, want in manifest["files"].items():
            if "/" in name or name.startswith("."):
                raise ArtifactTransferError(f"{version}: file name {name!r} refused")
            parts = chunks.get(name, {})
            if sorted(parts) != list(range(want["chunks"])):
                raise ArtifactTransferError(f"{version}/{name}: {len(parts)} of "
                                            f"{want['chunks']} chunks on the topic")
            data = b"".join(parts[i] for i in range(want["chunks"]))
            if hashlib.sha256(data).hexdigest() != want["sha256"]:
                raise ArtifactTransferError(f"{version}/{name}: sha256 differs from the "
                                            "manifest's")
            (tmp / name).write_bytes(data)
        target = root / version
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        Registry(root).load(version, sealed=True)
    except Exception as exc:
        shutil.rmtree(target, ignore_errors=True)
        raise ArtifactTransferError(f"{version}: refused after download: {exc}") from exc
    return target
