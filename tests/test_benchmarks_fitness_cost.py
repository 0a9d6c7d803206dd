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
