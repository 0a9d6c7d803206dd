"""scripts/setup for real, in a scratch copy of the repository whose .venv runs this test's Python: offline
(no index, the packages already here) and changing nothing (pip's --dry-run), a set-up whose install cannot
be met stops with pip's status and its reason; one that can prints only its own line."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _scratch(tmp_path: Path, dependency: str | None) -> Path:
    """scripts/setup and its helper, a probe project (one dependency or none) and a .venv that is this Python."""
    (tmp_path / "scripts").mkdir()
    for f in ("setup", "pip-quiet.sh"):
        shutil.copy2(ROOT / "scripts" / f, tmp_path / "scripts" / f)
    deps = f'["{dependency}"]' if dependency else "[]"
    (tmp_path / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["setuptools>=77"]\nbuild-backend = "setuptools.build_meta"\n'
        f'[project]\nname = "evomerge-setup-probe"\nversion = "0"\ndependencies = {deps}\n'
        '[project.optional-dependencies]\ndev = []\n[tool.setuptools]\npy-modules = []\n')
    bin_dir = tmp_path / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "python").write_text(f'#!/bin/sh\nexec {sys.executable} "$@"\n')
    (bin_dir / "python").chmod(0o755)
    (bin_dir / "activate").write_text(f'export PATH="{bin_dir}:$PATH"\n')
    return tmp_path


def _setup(root: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PIP_NO_INDEX": "1", "PIP_DRY_RUN": "1",
           "PIP_NO_BUILD_ISOLATION": "0"}  # (sic: pip reads 0 here as "build with the installed setuptools")
    return subprocess.run(["bash", str(root / "scripts" / "setup")], env=env, capture_output=True, text=True, timeout=300)


def test_a_failed_install_fails_the_set_up(tmp_path):
    res = _setup(_scratch(tmp_path, "evomerge-no-such-package==0.0"))
    assert res.returncode != 0 and "ready" not in res.stdout, res.stdout + res.stderr
    assert "set-up: pip install -e .[dev] failed (exit 1)" in res.stderr
    assert "No matching distribution found for evomerge-no-such-package==0.0" in res.stderr  # pip's reason, from the log


def test_a_set_up_that_works_prints_only_its_own_line(tmp_path):
    pytest.importorskip("setuptools")
    res = _setup(_scratch(tmp_path, None))
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stderr == "" and res.stdout.splitlines() == [res.stdout.strip()] and " ready, torch " in res.stdout
    assert "Preparing editable metadata" in (tmp_path / ".venv" / "setup.log").read_text()  # pip ran; its output went to the log
