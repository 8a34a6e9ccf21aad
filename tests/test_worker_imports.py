"""``fraudstream worker`` imports what it runs, not the training and plotting libraries:
every one of them adds to each start, and a restart in a crash loop pays it every time."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import ROOT

#: Used by ``fraudstream train`` and the load-test plots, never by a worker.
NOT_IN_WORKER = ("sklearn", "lightgbm", "skl2onnx", "onnxmltools", "matplotlib", "pandas",
                 "pyarrow", "scipy.stats", "scipy.optimize", "scipy.spatial")

#: What ``fraudstream worker`` imports before it connects: the CLI with the worker's
#: options, the worker's wiring and the Faust worker that runs it, and a Faust timer.
WORKER_PATH = """
import json, sys
from fraudstream.streams.cli import main as cli
cli.build_parser(only="worker").parse_args(["worker"])
import fraudstream.streams.worker.app, fraudstream.streams.topics, faust
# what build_worker does that reads every module: Faust's decorators look up the caller's
# module (inspect.getmodule walks sys.modules)
app = faust.App("import-check")
@app.timer(interval=1.0)
async def tick():
    pass
from fraudstream.scorers.river_import import _Deferred
loaded = sorted(n for n, m in sys.modules.items() if not isinstance(m, _Deferred))
print(json.dumps(loaded))
"""


def _loaded(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, timeout=120, check=True)
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def test_the_worker_imports_no_training_or_plotting_library():
    loaded = _loaded(WORKER_PATH)
    # the check saw the worker
    assert "fraudstream.streams.worker.app" in loaded and "fraudstream.scorers.online" in loaded
    found = sorted(m for m in loaded if any(m == x or m.startswith(x + ".")
                                            for x in NOT_IN_WORKER))
    assert not found, f"fraudstream worker imports {found}"


def test_river_parts_left_out_of_the_worker_still_import_on_use():
    """The River and SciPy packages the worker skips load as soon as something uses them."""
    loaded = _loaded(WORKER_PATH.replace("print(json.dumps(loaded))", """
import river.proba, scipy.stats
from river.drift.datasets import Apple
assert river.proba.Gaussian().mu == 0.0
assert scipy.stats.norm.cdf(0.0) == 0.5
assert Apple.__module__ == "river.drift.datasets.apple"
from sklearn.linear_model import LogisticRegression
loaded = sorted(sys.modules)
print(json.dumps(loaded))
"""))
    assert {"river.proba.gaussian", "scipy.stats._stats_py", "sklearn.linear_model"} <= loaded
