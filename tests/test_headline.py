"""benchmarks/headline.py at a CI budget, through the real CLI: the artifact holds what the runs wrote, the
printed table is the artifact's, and a second call reads finished seeds back and resumes unfinished ones."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def headline():
    spec = importlib.util.spec_from_file_location("headline", ROOT / "benchmarks" / "headline.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(tmp_path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / "headline.py"), "--seeds", "0", "1",
                           "--evaluations", "2", "--limit", "8", "--work", str(tmp_path / "work"),
                           "--out", str(tmp_path / "headline.json")], capture_output=True, text=True, timeout=900)


@pytest.mark.skipif(not (ROOT / "evomerge" / "zoo" / "models" / "base" / "config.json").is_file(), reason="no zoo")
def test_headline_at_a_ci_budget_writes_the_runs_into_the_artifact_and_prints_its_table(tmp_path):
    out = _run(tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    art = json.loads((tmp_path / "headline.json").read_text())
    assert art["budget"]["evaluations"] == 2 and art["limit"] == 8 and art["seeds"] == [0, 1]
    assert art["versions"]["torch"] and art["machine"]["cpus"] >= 1
    for run in art["runs"]:
        table = json.loads((tmp_path / "work" / f"seed{run['seed']}" / "holdout.json").read_text())
        assert run["rows"] == table["rows"] and table["seed"] == run["seed"]
        assert {r: s["evaluations"] for r, s in run["searches"].items()} == {
            "random search": 2, "global TIES": 2, "evolved best": 2}
        assert run["search"]["evaluations"] == 2 and not run["search"]["cut"] and run["search"]["seconds"] > 0
    for row, cols in art["summary"].items():
        for col, stats in cols.items():
            values = [run["rows"][row][col] for run in art["runs"]]
            assert stats == {"mean": sum(values) / 2, "min": min(values), "max": max(values)}
    assert out.stdout.strip() == headline().markdown(art)
    assert "| random search |" in out.stdout and "| global TIES |" in out.stdout
    # a second call reads finished seeds back; one without its table (killed before it) is resumed, not redone
    (tmp_path / "work" / "seed1" / "holdout.json").unlink()
    again = _run(tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout == out.stdout
    from evomerge.run.store import RunStore

    with RunStore.open(tmp_path / "work" / "seed1", readonly=True) as store:
        assert store.counts()["evaluations"] == 2 and len(store.sessions()) == 2
