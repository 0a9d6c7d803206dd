"""benchmarks/fitness_cost.py keeps working: a tiny budget produces every variant's curve, the verdict and the
estimator's accuracy, for both searches."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_tiny_fitness_cost_run_reports_every_variant(tmp_path):
    out, records = tmp_path / "fc.json", tmp_path / "fc.jsonl"
    done = subprocess.run(
        [sys.executable, "benchmarks/fitness_cost.py", "--seeds", "0", "--zoo-examples", "3000",
         "--digits-examples", "20000", "--records", str(records), "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(out.read_text())
    for search, budget in (("zoo", 3000), ("digits", 20000)):
        variants = report[search]["variants"]
        assert set(variants) == {"full", "racing", "subset"}
        for name, v in variants.items():
            (run,) = v["runs"]
            last = run["curve"][-1]
            assert last["fraction"] == 1.0 and budget <= last["examples"] < budget * 1.1
            assert 0 < last["heldout"] <= 1 and last["dev_measured"]  # the best is always fully scored
            if name == "full" or search == "digits" or name == "subset":  # a CMA-ES race needs half a generation told
                assert (run["partially_scored"] > 0) == (name != "full")
        assert set(report[search]["verdict"]) == {"full_heldout_at_budget", "racing", "subset"}
    est = report["zoo"]["estimator"]
    assert -1 <= est["mean_spearman_anchors"] <= 1 and math.isfinite(est["mean_mae_anchors"])
    # the records file alone rebuilds the same report
    again = subprocess.run([sys.executable, "benchmarks/fitness_cost.py", "--summarize", str(records)], cwd=ROOT,
                           capture_output=True, text=True, timeout=120)
    assert json.loads(again.stdout)["zoo"]["verdict"] == report["zoo"]["verdict"]


def test_the_committed_curves_draw_every_strategy_and_seed(tmp_path):
    """The report's curves, drawn from the committed artifact: per search, a mean line per strategy and a line
    per seed, ending at the budget."""
    import re

    artifact = ROOT / "benchmarks" / "results" / "fitness_cost.json"
    html = tmp_path / "curves.html"
    done = subprocess.run([sys.executable, "benchmarks/fitness_cost.py", "--plot", str(artifact), "--html", str(html)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(artifact.read_text())
    names = re.findall(r'"name":"([^"]+)"', html.read_text())
    for search in ("zoo", "digits"):
        for variant, v in report[search]["variants"].items():
            assert f"{search}: {variant}" in names
            assert sum(n.startswith(f"{search} {variant} seed ") for n in names) == len(v["runs"]) == 3
