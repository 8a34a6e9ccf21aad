"""Which build of the feature kernel runs, and where builds are kept. Imports no numba.

The kernel (:mod:`fraudstream.state.kernel`) exists in two builds of the same source:

* **ahead of time**: a small C extension that numba's ``pycc`` compiles in a separate
  process (:mod:`fraudstream.state.kernel_aot`, ~17 s, once per source version). Loading
  it maps about 1 MB: neither numba nor LLVM enters the process, about 130 MB less RSS
  per worker. Building it needs a C compiler.
* **just in time**: numba compiles the kernel in the process on first use (~17 s) and
  caches the machine code. Needs no compiler; the fallback.

``FRAUDSTREAM_FEATURES_KERNEL`` (the worker's setting of that name, read here from the
environment, or :func:`configure`) chooses: ``auto`` (default) the ahead-of-time build
when there is one, else the JIT; ``aot`` the ahead-of-time build or an error; ``jit``
always the JIT.

Both are kept under one directory named by a digest of the sources they are built from
(these modules, the feature names, the record layout) and of the numba and numpy versions:
numba's own cache checks only the file a function is defined in, and would otherwise reuse
machine code built from an earlier version of another one.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.metadata
import importlib.util
import os
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

SOURCES = ("features.py", "records.py", "kernel_rows.py", "kernel.py", "kernel_aot.py")
MODES = ("auto", "aot", "jit")


class KernelUnavailable(RuntimeError):
    """``FRAUDSTREAM_FEATURES_KERNEL=aot`` and no ahead-of-time build could be loaded."""


@cache
def digest() -> str:
    here = Path(__file__).parent
    h = hashlib.sha256()
    for name in SOURCES:
        h.update((here / name).read_bytes())
    for dist in ("numba", "numpy"):
        h.update(importlib.metadata.version(dist).encode())
    return h.hexdigest()[:16]


def cache_dir() -> str:
    """``<NUMBA_CACHE_DIR or this package's __pycache__>/kernel-<digest>``; an install the
    process cannot write to (a container's site-packages) uses the user's cache directory,
    never numba's fallbacks, whose key is one file's timestamp."""
    here = Path(__file__).parent
    base = os.environ.get("NUMBA_CACHE_DIR")
    if not base:
        pycache = here / "__pycache__"
        writable = os.access(pycache if pycache.exists() else here, os.W_OK)
        base = str(pycache) if writable else os.path.join(
            os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "fraudstream")
    return os.path.join(base, f"kernel-{digest()}")


def aot_module_name() -> str:
    return f"fraudstream_kernel_{digest()}"


def aot_path() -> Path:
    """Where the ahead-of-time build of these sources is (or would be)."""
    suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
    return Path(cache_dir()) / f"{aot_module_name()}{suffix}"


ENV = "FRAUDSTREAM_FEATURES_KERNEL"
_configured: str | None = None


def configure(value: str) -> None:
    """Choose the build for this process (before its first batch), as the setting does."""
    global _configured
    if value not in MODES:
        raise ValueError(f"{ENV}={value!r}: expected one of {', '.join(MODES)}")
    _configured = value
    kernel.cache_clear()


def mode() -> str:
    if _configured is not None:
        return _configured
    value = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if value not in MODES:
        raise ValueError(f"{ENV}={value!r}: expected one of {', '.join(MODES)}")
    return value


@cache
def kernel() -> tuple[Callable[..., Any], str]:
    """(run_batch, "aot" or "jit"), chosen once per process by :func:`mode`."""
    chosen = mode()
    if chosen != "jit":
        run_batch = load_aot()
        if run_batch is not None:
            return run_batch, "aot"
        if chosen == "aot":
            raise KernelUnavailable(
                f"{ENV}=aot: no ahead-of-time build at {aot_path()}; build it "
                "with `python -m fraudstream.state.kernel_aot`")
    from fraudstream.state.kernel import run_batch

    return run_batch, "jit"


def load_aot() -> Callable[..., Any] | None:
    """The ahead-of-time build's ``run_batch``, or None when there is none."""
    path = aot_path()
    if not path.exists():
        return None
    spec = importlib.util.spec_from_file_location(aot_module_name(), path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.run_batch  # type: ignore[no-any-return]
