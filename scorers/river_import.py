"""River, imported without the parts the worker never uses.

The worker uses a handful of River classes (a scaler, logistic regression with SGD, ADWIN
and Page-Hinkley), but River's package ``__init__`` files import far more: ``river.drift``
imports its example datasets, which import ``river.stream.iter_sklearn`` and with it
scikit-learn and most of SciPy, and ``river.linear_model`` imports ``river.proba`` (for
Bayesian linear regression), which imports ``scipy.stats``. Measured on this 2-core machine
that was 0.6-0.9 s of every worker start, for modules the worker never calls.
(``scipy.special`` is not deferred: ``river.linear_model`` imports a function from it.)

:func:`defer` puts a stand-in for such a module in ``sys.modules`` before River is imported:
the package ``__init__`` binds the stand-in, and the real module is imported the first time
anything reads an attribute of it (so ``river.drift.datasets.Apple`` or
``river.proba.Gaussian`` still work, only later). Import River's classes from here:
``from fraudstream.scorers.river_import import drift, linear_model, optim, preprocessing``.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import sys
import types
from typing import Any

#: Packages River imports that the worker does not use: imported on first use only.
DEFERRED = ("river.drift.datasets", "river.proba", "river.tree", "scipy.ndimage", "scipy.stats")


class _Deferred(types.ModuleType):
    """Stands in for a package until one of its attributes is read; then the package is
    imported and takes the stand-in's place in ``sys.modules``."""

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("__") and attr.endswith("__") and attr != "__all__":
            # module metadata (``__file__``...): ``inspect.getmodule``, which Faust's
            # decorators call, asks every module in ``sys.modules`` for it
            raise AttributeError(attr)
        name = self.__name__
        if sys.modules.get(name) is self:
            del sys.modules[name]
        real = importlib.import_module(name)
        for key, value in list(self.__dict__.items()):  # submodules imported meanwhile
            if isinstance(value, types.ModuleType) and value.__name__ == f"{name}.{key}":
                setattr(real, key, value)
        parent, _, child = name.rpartition(".")
        if getattr(sys.modules.get(parent), child, None) is self:
            setattr(sys.modules[parent], child, real)
        self.__dict__.update(
            {k: v for k, v in real.__dict__.items() if k not in ("__name__", "__class__")})
        return getattr(real, attr)


def defer(name: str) -> None:
    """Import the package ``name`` on first use, unless it is imported already. The
    stand-in has the package's ``__path__``, so importing one of its submodules directly
    loads that submodule once, without the package's ``__init__``."""
    if name in sys.modules:
        return
    parts = name.split(".")
    path = importlib.import_module(parts[0]).__path__
    for i in range(2, len(parts) + 1):
        spec = importlib.machinery.PathFinder.find_spec(".".join(parts[:i]), path)
        if spec is None or spec.submodule_search_locations is None:
            return  # not a package in this version: import it as usual
        path = spec.submodule_search_locations
    stand_in = _Deferred(name)
    stand_in.__path__ = list(path)
    sys.modules[name] = stand_in
    parent, _, child = name.rpartition(".")
    if parent in sys.modules:
        setattr(sys.modules[parent], child, stand_in)


for _name in DEFERRED:
    defer(_name)

from river import drift, linear_model, optim, preprocessing  # noqa: E402

__all__ = ["drift", "linear_model", "optim", "preprocessing"]
