"""The package layout: one installed namespace, ``fraudstream``, and imports that only run
down the stack (schemas, then state, then scorers, then streams, then loadtest).

Read from the source tree with :mod:`ast` (imports inside functions and in ``-c`` strings
are not executed here, but the top-level ``import`` statements of every module are)."""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib

from tests.conftest import ROOT

#: The repository's top-level folders, installed as ``fraudstream.<folder>``, lowest first:
#: a package may import only those at its rank or below.
RANK = {"schemas": 0, "state": 1, "scorers": 2, "streams": 3, "loadtest": 4}


def _sources(*folders: str):
    for folder in folders:
        yield from sorted((ROOT / folder).rglob("*.py"))


def _imports(path) -> list[str]:
    """Every module name ``path`` imports (absolute imports; relative ones resolved)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the module's own package
                raise AssertionError(f"{path}: use absolute fraudstream imports")
            names += [node.module or ""]
            if node.module == "fraudstream":
                names += [f"fraudstream.{a.name}" for a in node.names]
    return names


def _top(name: str) -> str | None:
    """The repository folder a ``fraudstream.<folder>...`` module lives in, else None."""
    parts = name.split(".")
    if parts[0] == "fraudstream" and len(parts) > 1 and parts[1] in RANK:
        return parts[1]
    return None


def test_no_module_imports_a_bare_top_level_package():
    """``import streams`` (or state, schemas, scorers, loadtest) would load a second copy of
    a module under another name; everything goes through ``fraudstream.``."""
    bad = [f"{p.relative_to(ROOT)}: {n}" for p in _sources(*RANK, "fraudstream", "tests")
           for n in _imports(p) if n.split(".")[0] in RANK]
    assert not bad, bad


def test_imports_run_down_the_stack_only():
    """Nothing in schemas/, state/ or scorers/ imports streams/, and no two top packages
    import each other (a rank order exists, so there is no cycle)."""
    upward = []
    for folder, rank in RANK.items():
        for path in _sources(folder):
            for name in _imports(path):
                top = _top(name)
                if top is not None and RANK[top] > rank:
                    upward.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not upward, upward


def test_every_package_folder_is_installed():
    """A new sub-package (streams/control/, say) must be listed in pyproject.toml, or a
    non-editable install leaves it out."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    found = {"fraudstream"}
    for folder in RANK:
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT)
            found.add("fraudstream." + ".".join(rel.parts))
    assert found == listed
    assert {k: v for k, v in config["package-dir"].items() if k != "fraudstream"} == {
        f"fraudstream.{f}": f for f in RANK}


def test_the_worker_path_loads_each_module_under_one_name():
    """Run from the repository root (where ``streams/`` is a folder on ``sys.path``), the
    CLI and the worker load nothing under a bare ``streams``/``state``/... name."""
    code = ("import sys\n"
            "import fraudstream.streams.cli.main, fraudstream.streams.worker.app\n"
            "import fraudstream.streams.demo.run, fraudstream.streams.replay.engine\n"
            "print(sorted({m.split('.')[0] for m in sys.modules}))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, timeout=120, check=True)
    tops = set(ast.literal_eval(out.stdout.strip().splitlines()[-1]))
    assert "fraudstream" in tops
    assert not tops & set(RANK), tops & set(RANK)
