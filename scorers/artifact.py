"""What makes a model artifact (a version folder of the registry) fit to serve: its files
are the ones written at training (integrity), and what they describe is a usable model
(sanity).

Integrity. ``SHA256SUMS`` in the version folder lists the sha256 of every other file of
the version (``metadata.json``, the ONNX files, the report and its plots), one
``<hex>  <name>`` line each, sorted by name: the format of ``sha256sum``. The version's
*digest* is the sha256 of that file, one value for the whole artifact. A version is
refused when a listed file is missing or differs, or when the folder holds a file the
list does not name. ``fraudstream model promote`` records the digest in the pointer
(:mod:`fraudstream.scorers.registry`), so a version altered after its promotion, even with its
``SHA256SUMS`` rewritten to match, is refused by the workers. To check one by hand::

    cd models/<version> && sha256sum -c SHA256SUMS && sha256sum SHA256SUMS

A digest stored next to the files detects accidents and naive edits, not someone who can
rewrite the folder and the pointers: that needs a signature, which this is not.

Sanity, checked from ``metadata.json`` whatever the digest says: ensemble weights finite,
non-negative, summing to 1 (so the blend stays a probability); thresholds finite, in
[0, 1], review at or below decline; and a probe batch (rows of the test window stored at
training time, with the scores the ensemble gave them) whose scores must be finite, in
[0, 1], not all one value, and equal to the stored ones. A version written before probes
were stored gets rows drawn (seeded) from its reference histograms instead.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fraudstream.scorers.base import ScorerError

SUMS = "SHA256SUMS"
#: Weights must sum to 1 within this.
WEIGHT_SUM_TOLERANCE = 1e-6
#: The probe's scores at load may differ from those stored at training by this much.
PROBE_TOLERANCE = 1e-5
#: Rows in the probe batch stored at training (half the top scores, half seeded picks).
PROBE_ROWS = 16
_LINE = re.compile(r"^([0-9a-f]{64})  ([^/\\\s][^/\\]*)$")


class ArtifactError(ScorerError):
    """This artifact cannot be served; the message says why (one line)."""


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _contents(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name != SUMS)


def write_sums(folder: Path) -> str:
    """List every file of ``folder`` in its ``SHA256SUMS``; returns the version's digest."""
    names = _contents(folder)
    for name in names:
        if not (folder / name).is_file() or not _LINE.match(f"{'0' * 64}  {name}"):
            raise ArtifactError(f"{folder.name}: {name!r} cannot be part of an artifact "
                                "(only plain files with plain names)")
    text = "".join(f"{file_sha256(folder / name)}  {name}\n" for name in names)
    tmp = folder / f".{SUMS}.tmp"
    tmp.write_text(text)
    os.replace(tmp, folder / SUMS)
    return hashlib.sha256(text.encode()).hexdigest()


def verify_sums(folder: Path) -> str | None:
    """The version's digest once every file matches ``SHA256SUMS``; None when the version
    has no ``SHA256SUMS`` (written before artifacts were sealed); raises
    :class:`ArtifactError` on any difference."""
    version = folder.name
    try:
        data = (folder / SUMS).read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ArtifactError(f"{version}: {SUMS} unreadable ({exc.strerror})") from None
    try:
        lines = data.decode("ascii").splitlines()
    except UnicodeDecodeError:
        raise ArtifactError(f"{version}: {SUMS} is not a sha256 list") from None
    listed: dict[str, str] = {}
    for n, line in enumerate(lines, 1):
        m = _LINE.match(line)
        if m is None or m.group(2) in listed:
            raise ArtifactError(f"{version}: {SUMS} line {n} is not '<sha256>  <file>' "
                                "(or names a file twice)")
        listed[m.group(2)] = m.group(1)
    try:
        present = _contents(folder)
    except OSError as exc:
        raise ArtifactError(f"{version}: folder unreadable ({exc.strerror})") from None
    extra = [name for name in present if name not in listed]
    if extra:
        raise ArtifactError(f"{version}: {', '.join(extra)} not listed in {SUMS}: "
                            "the artifact was changed after training")
    for name, expected in listed.items():
        try:
            actual = file_sha256(folder / name)
        except FileNotFoundError:
            raise ArtifactError(f"{version}: {name} is listed in {SUMS} but missing") from None
        except OSError as exc:
            raise ArtifactError(f"{version}: {name} unreadable ({exc.strerror})") from None
        if actual != expected:
            raise ArtifactError(f"{version}: {name} does not match its sha256 in {SUMS}: "
                                "the artifact was changed after training")
    return hashlib.sha256(data).hexdigest()


def check_weights(version: str, weights: Sequence[float]) -> None:
    if not weights:
        raise ArtifactError(f"{version}: the ensemble has no models")
    for w in weights:
        if not math.isfinite(w) or w < 0:
            raise ArtifactError(f"{version}: ensemble weight {w!r} is not a finite number >= 0")
    total = math.fsum(weights)
    if total == 0:
        raise ArtifactError(f"{version}: every ensemble weight is 0: the model would score "
                            "every transaction 0 and approve it")
    if abs(total - 1.0) > WEIGHT_SUM_TOLERANCE:
        raise ArtifactError(f"{version}: ensemble weights sum to {total:.6g}, not 1: the "
                            "blend would not be a probability")


def check_thresholds(version: str, review: Any, decline: Any) -> None:
    for name, t in (("review", review), ("decline", decline)):
        if isinstance(t, bool) or not isinstance(t, int | float) or not math.isfinite(t) \
                or not 0.0 < t <= 1.0:
            raise ArtifactError(f"{version}: {name} threshold {t!r} is not a number in (0, 1]")
    if review > decline:
        raise ArtifactError(f"{version}: review threshold {review} is above decline "
                            f"threshold {decline}")


def probe_batch(meta: dict[str, Any], n_features: int
                ) -> tuple[np.ndarray, np.ndarray | None]:
    """(rows, the scores stored for them or None): the artifact's own probe, else rows
    drawn from its reference histograms with a fixed seed, else one row of zeros."""
    probe = meta.get("probe")
    if isinstance(probe, dict):
        try:
            X = np.asarray(probe["rows"], dtype=np.float32)
            expected = np.asarray(probe["scores"], dtype=np.float64)
        except (KeyError, TypeError, ValueError):
            raise ArtifactError(f"{meta.get('version')}: metadata.json has a mangled probe "
                                "batch") from None
        if X.ndim != 2 or X.shape[1] != n_features or X.shape[0] < 2 \
                or expected.shape != (X.shape[0],):
            raise ArtifactError(f"{meta.get('version')}: metadata.json's probe batch is not "
                                f"rows of {n_features} features with one score each")
        return X, expected
    hists = ((meta.get("reference") or {}).get("features") or {})
    rng = np.random.default_rng(20261201)
    rows = np.zeros((32, n_features), dtype=np.float32)
    names = meta.get("feature_names") or []
    for j, name in enumerate(names[:n_features]):
        edges = (hists.get(name) or {}).get("edges")
        if isinstance(edges, list) and len(edges) >= 2:
            e = np.asarray(edges, dtype=np.float64)
            k = rng.integers(0, len(e) - 1, size=len(rows))
            rows[:, j] = e[k] + rng.random(len(rows)) * (e[k + 1] - e[k])
    return np.nan_to_num(rows, nan=0.0, posinf=0.0, neginf=0.0), None


def check_probe(version: str, scores: np.ndarray, expected: np.ndarray | None) -> None:
    n = len(scores) if scores.ndim == 1 else -1
    if n < 1 or not np.all(np.isfinite(scores)):
        raise ArtifactError(f"{version}: the probe batch gave non-finite scores or not one "
                            "score per row")
    if np.any(scores < -PROBE_TOLERANCE) or np.any(scores > 1 + PROBE_TOLERANCE):
        raise ArtifactError(f"{version}: the probe batch gave scores outside [0, 1] "
                            f"({scores.min():.4g} to {scores.max():.4g})")
    if n > 1 and np.ptp(scores) == 0:
        raise ArtifactError(f"{version}: every row of the probe batch scores "
                            f"{scores[0]:.6g}: a model that cannot tell transactions apart")
    if expected is not None:
        gap = float(np.max(np.abs(scores - expected)))
        if not gap <= PROBE_TOLERANCE:
            raise ArtifactError(f"{version}: the probe batch scores differ from those "
                                f"stored at training by {gap:.2e}")


def choose_probe(X: np.ndarray, scores: np.ndarray, seed: int) -> dict[str, list[Any]]:
    """Rows for the probe batch (training time): the top scores and seeded others, so the
    batch spans the range of scores the model gives."""
    order = np.argsort(-scores, kind="stable")
    top = order[: PROBE_ROWS // 2]
    rest = order[PROBE_ROWS // 2:]
    rng = np.random.default_rng(seed)
    picks = rng.choice(rest, size=min(len(rest), PROBE_ROWS - len(top)), replace=False) \
        if len(rest) else np.array([], dtype=np.int64)
    idx = np.concatenate([top, picks]).astype(np.int64)
    return {"rows": X[idx].astype(np.float32).tolist(),
            "scores": [float(s) for s in scores[idx]]}
