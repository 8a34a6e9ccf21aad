"""The feature kernel compiled ahead of time: ``python -m fraudstream.state.kernel_aot``.

Builds :func:`fraudstream.state.kernel.run_batch` with numba's ``pycc`` into a C extension
at :func:`fraudstream.state.kernel_cache.aot_path`, which a worker then loads without numba
or LLVM (see :mod:`fraudstream.state.kernel_cache`). Needs a C compiler; takes ~17 s.
Several processes may ask at once: one builds, under a file lock, and the others find the
result. The extension is written under a temporary name and renamed into place, so a
reader never sees half a file. :func:`ensure` runs this module in a child process, so the
caller never maps LLVM itself.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fraudstream.state.kernel_cache import aot_module_name, aot_path, cache_dir

#: Seconds a build may take before :func:`ensure` gives up on it.
BUILD_TIMEOUT_S = 600


def _signature():  # noqa: ANN202
    from numba import types as T

    def a(dtype, ndim=1, readonly=False):  # noqa: ANN001, ANN202
        return T.Array(dtype, ndim, "C", readonly=readonly)

    f8, i8, b1 = T.float64, T.int64, T.boolean
    # As FeatureEngine.process passes them: the concatenated records (read-only, from
    # np.frombuffer), their starts, lengths and kinds; labels (slot, offset, fraud, day);
    # events (time, amount, lat, lon, offset, card, tokens, own, groups, merchant key),
    # the number of merchant keys, the groups' pointers and slots, and the lateness.
    args = (a(f8, readonly=True), a(i8), a(i8), a(b1),
            a(i8), a(i8), a(i8), a(i8),
            a(i8), a(f8), a(f8), a(f8), a(i8), a(i8), a(f8, 2), a(i8, 2), a(i8, 2), a(i8),
            i8, a(i8), a(i8), i8)
    ret = T.Tuple((a(f8, 2), a(b1), a(f8), a(i8), a(i8), a(i8)))
    return ret(*args)


def build() -> Path:
    """Compile the kernel into :func:`aot_path` (if no other process did meanwhile)."""
    target = aot_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / "aot.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if target.exists():
            return target
        from numba.pycc import CC

        from fraudstream.state.kernel import run_batch

        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            cc = CC(aot_module_name())
            cc.output_dir = tmp
            cc.verbose = False
            cc.export("run_batch", _signature())(run_batch.py_func)
            cc.compile()
            built = next(Path(tmp).glob(f"{aot_module_name()}*"))
            os.replace(built, target)
    return target


def ensure(timeout_s: float = BUILD_TIMEOUT_S) -> tuple[Path | None, str]:
    """The ahead-of-time build, built in a child process when missing. Returns (its path,
    what happened) or (None, why not): no C compiler, a failed build, a timeout."""
    target = aot_path()
    if target.exists():
        return target, "found"
    t0 = time.monotonic()
    try:
        run = subprocess.run([sys.executable, "-m", __name__], capture_output=True, text=True,
                             timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        return None, f"the build took over {timeout_s:.0f} s"
    if run.returncode != 0 or not target.exists():
        last = (run.stderr.strip().splitlines() or ["(no output)"])[-1]
        return None, f"the build failed (exit {run.returncode}): {last}"
    return target, f"built in {time.monotonic() - t0:.1f} s"


if __name__ == "__main__":
    t0 = time.monotonic()
    path = build()
    print(f"feature kernel: {path} ({time.monotonic() - t0:.1f} s; cache {cache_dir()})")
