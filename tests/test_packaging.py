"""The installed distribution's import names: everything under `evomerge` (fitness/ and search_spaces/ are
evomerge.fitness and evomerge.search_spaces), so installing evomerge beside PyPI's `fitness` breaks neither."""
from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_wheel_installs_one_top_level_name(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(ROOT)],
                   check=True, capture_output=True, timeout=600)
    (wheel,) = tmp_path.glob("evomerge-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")} == {"evomerge"}
    for package in ("fitness", "search_spaces"):  # the folders' modules, installed under evomerge
        modules = {p.name for p in (ROOT / package).glob("*.py")}
        assert modules and modules <= {Path(n).name for n in names if n.startswith(f"evomerge/{package}/")}
    # the real zoo's card and task files ship, its weights (built in the tree by `zoo build --real`) never
    assert "evomerge/zoo/real/data/math_fr_test.jsonl" in names and "evomerge/zoo/real/CARD.md" in names
    assert not [n for n in names if n.startswith("evomerge/zoo/real/models/")]
