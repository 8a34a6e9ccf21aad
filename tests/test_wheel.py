"""A non-editable install: the wheel holds every module and every file read at run time
(Avro schemas, the rates table, the default rules), installs one package name,
``fraudstream``, and decides a transaction with its default rules away from the
repository."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.e2e

FOLDERS = ("schemas", "state", "scorers", "streams", "loadtest")

CHECK = r"""
import json, sys
from fraudstream.scorers.rules import DEFAULT_RULES_PATH, RuleSet, RulesScorer
from fraudstream.schemas.codec import SCHEMA_DIR
from fraudstream.schemas.fx import Rates
from fraudstream.streams.settings import Settings

rates = Rates.load()
base = {"transaction_id": "t-1", "event_time": 1767225600000, "card_id": "card_1",
        "customer_id": "c_1", "merchant_id": "m_1", "terminal_id": "term_1",
        "amount": 42.5, "currency": "EUR", "mcc": "5411", "country": "DE",
        "card_country": "DE", "lat": 52.52, "lon": 13.40, "device_id": None, "ip": None,
        "channel": "pos"}
events = [base, {**base, "transaction_id": "t-2", "amount": 9000.0, "mcc": "7995",
                 "country": "BR", "channel": "ecom"}]
for e in events:
    e["amount_ref"] = rates.to_reference(e["amount"], e["currency"])
scores = RulesScorer(RuleSet.default()).score_batch(events)
s = Settings()
print(json.dumps({
    "rules": str(DEFAULT_RULES_PATH), "schemas": str(SCHEMA_DIR),
    "avsc": sorted(p.name for p in SCHEMA_DIR.glob("*.avsc")),
    "files": [s.scoring.rules_path.is_file(), s.worker.rates_path.is_file()],
    "decided": [[str(x.outcome), round(x.score, 6), list(x.reasons)] for x in scores],
    "tops": sorted({m.split(".")[0] for m in sys.modules}),
}))
"""


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    # built from a copy: an in-tree build leaves build/lib behind, whose stale files a
    # later wheel would carry
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for folder in ("fraudstream", *FOLDERS):
        shutil.copytree(ROOT / folder, src / folder,
                        ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w",
                    str(out), str(src)],
                   check=True, timeout=120, capture_output=True)
    [whl] = out.glob("fraudstream-*.whl")
    return whl


def test_the_wheel_installs_one_package_with_its_data_files(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops == {"fraudstream", "fraudstream-0.1.0.dist-info"}, tops
    wanted = {f"fraudstream/{p.relative_to(ROOT)}" for f in FOLDERS
              for p in (ROOT / f).rglob("*") if p.suffix in (".py", ".avsc", ".toml")
              and "__pycache__" not in p.parts}
    assert wanted - set(names) == set()
    assert "fraudstream/scorers/rules/default.toml" in names
    assert "fraudstream/schemas/rates.toml" in names
    entry = [n for n in names if n.endswith("entry_points.txt")]
    text = zipfile.ZipFile(wheel).read(entry[0]).decode()
    assert "fraudstream = fraudstream.streams.cli.main:main" in text


def test_a_non_editable_install_decides_with_its_default_rules(wheel, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True,
                   timeout=60)
    py = venv / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "--quiet",
                    "--no-deps", "--no-index", str(wheel)],
                   check=True, timeout=120, capture_output=True)
    site = Path(subprocess.run([str(py), "-c", "import sysconfig; print("
                                "sysconfig.get_paths()['purelib'])"], check=True,
                               capture_output=True, text=True).stdout.strip())
    assert (site / "fraudstream" / "scorers" / "rules" / "default.toml").is_file()
    # the dependencies come from this environment, after the installed package; the
    # editable copy of fraudstream there is not loaded (its .pth is not read from here)
    (site / "zz_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "FRAUDSTREAM_"))}
    out = subprocess.run([str(py), "-I", "-c", CHECK], cwd=tmp_path, env=env, check=True,
                         capture_output=True, text=True, timeout=120)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["rules"].startswith(str(site)), got["rules"]
    assert got["schemas"].startswith(str(site)), got["schemas"]
    assert "transaction.avsc" in got["avsc"] and "decision.avsc" in got["avsc"]
    assert got["files"] == [True, True]  # the settings' default rules and rates files
    # the same decisions as this checkout's own rules: the shipped default.toml is the one
    here = subprocess.run([sys.executable, "-c", CHECK], cwd=ROOT, check=True,
                          capture_output=True, text=True, timeout=120)
    expected = json.loads(here.stdout.strip().splitlines()[-1])["decided"]
    assert got["decided"] == expected
    assert [d[0] for d in got["decided"]][0] == "approve"
    assert [d[0] for d in got["decided"]][1] != "approve", got["decided"]
    assert not set(got["tops"]) & set(FOLDERS), got["tops"]
    help_out = subprocess.run([str(venv / "bin" / "fraudstream"), "--help"], cwd=tmp_path,
                              env=env, check=True, capture_output=True, text=True, timeout=60)
    assert "worker" in help_out.stdout
