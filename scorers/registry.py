"""The model registry: a folder of artifact versions with ``ACTIVE`` and ``SHADOW`` pointers.

```
models/
  v20261122-100308-cb50142f/   one artifact per version (fraudstream train)
  ACTIVE                       the version the workers decide with
  SHADOW                       the version scored on live traffic, never deciding
  history.log                  every promote / rollback / shadow, one line each
```

A pointer is a one-line file replaced atomically (write, then rename), so a worker
polling it never reads half a version. :meth:`Registry.promote` and :meth:`shadow` load
the artifact first and refuse one that cannot be served (the pointer is left alone).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from scorers.onnx_model import ArtifactError, ModelScorer

ACTIVE, SHADOW, HISTORY = "ACTIVE", "SHADOW", "history.log"


@dataclass(frozen=True)
class Entry:
    version: str
    active: bool
    shadow: bool
    created_at: str


class Registry:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def versions(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if (p / "metadata.json").is_file())

    def pointer(self, name: str) -> str | None:
        try:
            value = (self.root / name).read_text().strip()
        except FileNotFoundError:
            return None
        return value or None

    def entries(self) -> list[Entry]:
        import json

        active, shadow = self.pointer(ACTIVE), self.pointer(SHADOW)
        out = []
        for v in self.versions():
            try:
                created = json.loads((self.root / v / "metadata.json").read_text())["created_at"]
            except (OSError, ValueError, KeyError):
                created = "?"
            out.append(Entry(v, v == active, v == shadow, created))
        return out

    def load(self, version: str) -> ModelScorer:
        if version not in self.versions():
            raise ArtifactError(f"no version {version!r} in {self.root} "
                                f"(have: {', '.join(self.versions()) or 'none'})")
        return ModelScorer.load(self.root / version)

    def promote(self, version: str) -> None:
        self.load(version)
        self._set(ACTIVE, version)
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
        self.load(target)
        self._set(ACTIVE, target)
        self._log("rollback", target)
        return target

    def shadow(self, version: str | None) -> None:
        if version is None:
            (self.root / SHADOW).unlink(missing_ok=True)
            self._log("shadow-off", "-")
            return
        self.load(version)
        self._set(SHADOW, version)
        self._log("shadow", version)

    def _set(self, name: str, version: str) -> None:
        tmp = self.root / f".{name}.tmp"
        tmp.write_text(version + "\n")
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
