"""The model registry: a folder of artifact versions with ``ACTIVE`` and ``SHADOW`` pointers.

```
models/
  v20261122-100308-cb50142f/   one artifact per version (fraudstream train)
  ACTIVE                       the version the workers decide with
  SHADOW                       the version scored on live traffic, never deciding
  history.log                  every promote / rollback / shadow, one line each
```

A pointer is a one-line file, ``<version> <digest>``, replaced atomically (write, then
rename), so a worker polling it never reads half a version. The digest is the version's
whole-artifact digest when it was promoted (:mod:`fraudstream.scorers.artifact`): a worker refuses
the
version if its files no longer give that digest. :meth:`Registry.promote`, :meth:`shadow`
and :meth:`rollback` load the artifact first and refuse one that cannot be served, or that
is not sealed (the pointer is left alone).

Versions written before artifacts were sealed (no ``SHA256SUMS``): a worker or a replay
still loads one, with a warning, when the pointer that names it carries no digest (it was
promoted by older code), so upgrading does not take a serving model away; every sanity
check applies to it. It cannot be promoted again until ``fraudstream model seal`` has
checked it and written its ``SHA256SUMS``. A pointer that carries a digest is never
satisfied by an unsealed version, so deleting ``SHA256SUMS`` does not get around the
check.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from fraudstream.scorers.artifact import SUMS, write_sums
from fraudstream.scorers.onnx_model import ArtifactError, ModelScorer

ACTIVE, SHADOW, HISTORY = "ACTIVE", "SHADOW", "history.log"
log = logging.getLogger("fraudstream.models")


@dataclass(frozen=True)
class Entry:
    version: str
    active: bool
    shadow: bool
    created_at: str
    #: "ok", "unsealed" (servable, written before artifacts were sealed) or "broken".
    status: str = "ok"
    #: Why the version is broken or unsealed; its digest when ok.
    detail: str = ""
    #: Test average precision of the ensemble (NaN when unknown).
    average_precision: float = float("nan")


class Registry:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def versions(self) -> list[str]:
        """Every version folder, servable or not (a folder without metadata.json too)."""
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir()
                      if p.is_dir() and not p.name.startswith("."))

    def pinned(self, name: str) -> tuple[str, str | None] | None:
        """(version, digest at promotion or None) of pointer ``name``; None when unset."""
        try:
            parts = (self.root / name).read_text().split()
        except FileNotFoundError:
            return None
        if not parts:
            return None
        return parts[0], parts[1] if len(parts) > 1 else None

    def pointer(self, name: str) -> str | None:
        target = self.pinned(name)
        return target[0] if target else None

    def fingerprint(self, version: str) -> tuple[tuple[str, int, int], ...]:
        """Name, size and mtime of the version's files: cheap to read, and it changes when
        a file is replaced or restored (the worker retries a refused version then)."""
        try:
            return tuple(sorted((p.name, st.st_size, st.st_mtime_ns)
                                for p in (self.root / version).iterdir()
                                for st in (p.stat(),)))
        except OSError:
            return ()

    def entries(self) -> list[Entry]:
        """Every version with its state: each is loaded and checked as a worker would; one
        that cannot be read is listed as broken with the reason, never an exception."""
        active, shadow = self.pinned(ACTIVE), self.pinned(SHADOW)
        out = []
        for v in self.versions():
            created, ap = "?", float("nan")
            try:
                meta = json.loads((self.root / v / "metadata.json").read_text())
                created = str(meta["created_at"])
                ap = float(meta["metrics"]["test"]["ensemble"]["average_precision"])
            except Exception:  # noqa: BLE001 - any damage is reported by the load below
                pass
            expect = None
            for target in (active, shadow):
                if target is not None and target[0] == v and target[1] is not None:
                    expect = target[1]
            try:
                model = self.load(v, expect=expect, quiet=True)
                status, detail = ("ok", model.digest) if model.digest else (
                    "unsealed", f"no {SUMS}: check it, then `fraudstream model seal {v}`")
            except ArtifactError as exc:
                status, detail = "broken", str(exc).removeprefix(f"{v}: ")
            except Exception as exc:  # noqa: BLE001 - list every version, whatever breaks
                status, detail = "broken", f"{type(exc).__name__}: {' '.join(str(exc).split())}"
            out.append(Entry(v, bool(active and active[0] == v),
                             bool(shadow and shadow[0] == v), created, status, detail or "", ap))
        return out

    def load(self, version: str, expect: str | None = None, sealed: bool = False,
             quiet: bool = False) -> ModelScorer:
        """The version, checked (:meth:`ModelScorer.load`); ``expect``: the digest it must
        have (a pointer's); ``sealed``: refuse a version without ``SHA256SUMS``."""
        if version not in self.versions():
            raise ArtifactError(f"no version {version!r} in {self.root} "
                                f"(have: {', '.join(self.versions()) or 'none'})")
        model = ModelScorer.load(self.root / version)
        if model.digest is None:
            if expect is not None:
                raise ArtifactError(f"{version}: {SUMS} is missing, but the version was "
                                    f"promoted sealed (digest {expect[:12]}...)")
            if sealed:
                raise ArtifactError(f"{version}: not sealed (no {SUMS}; written before "
                                    "artifacts were): check it, then run "
                                    f"`fraudstream model seal {version}`")
            if not quiet:
                log.warning("models: %s has no %s (written before artifacts were sealed): "
                            "loaded on its sanity checks alone; `fraudstream model seal %s` "
                            "seals it", version, SUMS, version)
        elif expect is not None and model.digest != expect:
            raise ArtifactError(f"{version}: changed since it was promoted (digest "
                                f"{model.digest[:12]}..., promoted as {expect[:12]}...)")
        return model

    def seal(self, version: str) -> str:
        """Check a version written before artifacts were sealed and write its
        ``SHA256SUMS``; returns its digest. Seal only a version you trust: from then on,
        its files as they are now are the reference."""
        if version in self.versions() and (self.root / version / SUMS).exists():
            raise ArtifactError(f"{version}: already sealed ({SUMS} exists)")
        self.load(version, quiet=True)
        digest = write_sums(self.root / version)
        self._log("seal", version)
        return digest

    def promote(self, version: str) -> None:
        model = self.load(version, sealed=True)
        self._set(ACTIVE, version, model.digest)
        self._log("promote", version)

    def rollback(self) -> str:
        """Make the version active before the current one active again; returns it."""
        current = self.pointer(ACTIVE)
        previous = [v for action, v in self._history() if action in ("promote", "rollback")]
        while previous and previous[-1] == current:
            previous.pop()
        if not previous:
            raise ArtifactError("nothing to roll back to: no earlier promotion")
        target = previous[-1]
        model = self.load(target, sealed=True)
        self._set(ACTIVE, target, model.digest)
        self._log("rollback", target)
        return target

    def shadow(self, version: str | None) -> None:
        if version is None:
            (self.root / SHADOW).unlink(missing_ok=True)
            self._log("shadow-off", "-")
            return
        model = self.load(version, sealed=True)
        self._set(SHADOW, version, model.digest)
        self._log("shadow", version)

    def _set(self, name: str, version: str, digest: str | None) -> None:
        tmp = self.root / f".{name}.tmp"
        tmp.write_text(f"{version} {digest}\n" if digest else f"{version}\n")
        os.replace(tmp, self.root / name)

    def _log(self, action: str, version: str) -> None:
        with (self.root / HISTORY).open("a") as fh:
            fh.write(f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} {action} {version}\n")

    def _history(self) -> list[tuple[str, str]]:
        try:
            lines = (self.root / HISTORY).read_text().splitlines()
        except FileNotFoundError:
            return []
        return [(p[1], p[2]) for p in (line.split() for line in lines) if len(p) == 3]
