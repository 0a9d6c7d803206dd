"""The report and live status on real runs: the HTML report rendered by a real headless chromium (every plot
drew its points, the held-out table is there), its numbers as people read them, `status --watch` following a
run in another process."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from evomerge import open_run
from evomerge.run.assemble import open_engine
from evomerge.config import load_config
from evomerge.results.report import write_report

TESTS = Path(__file__).resolve().parent
NAMES = ["layer_0.w", "layer_1.w", "layer_0.d", "layer_1.d"]
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"]


def _box_run(tmp_path: Path, evaluations: int = 32) -> Path:
    cfg = {
        "space": {"bounds": [[0, 1]] * 4, "names": NAMES},
        "optimizer": {"name": "nsga2", "options": {"popsize": 8}},
        "fitness": {"function": "runs_fixtures:two_objectives",
                    "objectives": [{"name": "a", "direction": "min"}, {"name": "b", "direction": "min"}]},
        "budget": {"evaluations": evaluations},
        "seed": 3,
    }
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    engine = open_engine(load_config(tmp_path / "run.yaml"), tmp_path / "run", resume=False)
    assert engine.run() == "budget: evaluations"
    engine.store.close()
    return tmp_path / "run"


def _holdout(run_dir: Path) -> dict:
    """A held-out table as the holdout step writes it, with a row and a column of the kind other steps add."""
    result = {"rows": {"MATH": {"a": 0.41, "b": 0.2}, "LANG": {"a": 0.12, "b": 0.77},
                       "fair: best of 32 random": {"a": 0.35, "b": 0.5, "evaluations": 32},
                       "evolved best": {"a": 0.52, "b": 0.61}},
              "best": 7, "seed": 3, "percent": True}
    (run_dir / "holdout.json").write_text(json.dumps(result))
    return result


def test_report_numbers_and_the_held_out_table_are_read_generically(tmp_path):
    run_dir = _box_run(tmp_path)
    _holdout(run_dir)
    write_report(run_dir, tmp_path / "r.html")
    page = (tmp_path / "r.html").read_text()
    run = open_run(run_dir)
    hv = run.hypervolume()
    assert f"hypervolume {hv:.4g}" in page and repr(hv) not in page.split("<body>")[1].split("<script")[0]
    table = page[page.index('<table id="holdout"'):page.index("</table>")]
    # every row and column, the new ones too, percent values, the best per column bold
    for text in ("<th>MATH</th>", "<th>fair: best of 32 random</th>", "<th>evaluations %</th>", "<b>52.0</b>",
                 "<b>77.0</b>", "<td>41.0</td>", "best 7", "seed 3"):
        assert text in table, text
    # self-contained: plotly.js inline, nothing loaded from elsewhere
    assert "<script src" not in page and "<link" not in page and page.count("Plotly.newPlot") == 5


def test_report_of_a_run_without_a_held_out_table_says_how_to_make_one(tmp_path):
    run_dir = _box_run(tmp_path, evaluations=8)
    write_report(run_dir, tmp_path / "r.html")
    assert f"evomerge holdout {run_dir}" in (tmp_path / "r.html").read_text()


def _plots(dom: str) -> dict[str, str]:
    """The dumped DOM cut at each plot's div: what follows a plot's div up to the next one is that plot's."""
    pieces = re.split(r'<div id="(plot\d+)"', dom)
    return {pieces[i]: pieces[i + 1] for i in range(1, len(pieces), 2)}


def test_report_renders_in_headless_chromium(tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("Debian's chromium is not installed (.ci/run installs it with apt-get where it runs as root)")
    run_dir = _box_run(tmp_path)
    _holdout(run_dir)
    page = tmp_path / "report.html"
    write_report(run_dir, page)
    run = open_run(run_dir)
    n_ok = int((run.frame(genomes=False).status == "ok").sum())
    base = [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=20000"]
    dom = subprocess.run([*base, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=180).stdout
    plots = _plots(dom)
    points = {k: len(re.findall(r'class="point[ "]', v)) for k, v in plots.items()}
    # history: every evaluation on both objectives, with the best-so-far lines
    assert points["plot1"] == 2 * n_ok and plots["plot1"].count('class="js-line"') == 2
    assert points["plot2"] == n_ok  # the Pareto front plot: every successful candidate
    assert 'class="js-line"' in plots["plot3"] and re.search(r'class="js-line"[^>]* d="M[\d.]+,', plots["plot3"])
    # parallel coordinates: an axis per genome dimension and objective, lines drawn on its canvases
    assert len(re.findall(r'class="y-axis"', plots["plot4"])) == len(NAMES) + 2 and "<canvas" in plots["plot4"]
    assert re.search(r'<g class="hm"[^>]*>\s*<image', plots["plot5"])  # the heatmap drew its cells
    assert dom.count("<tr>") >= 5 and "fair: best of 32 random" in dom.split('id="holdout"')[1]

    shot = tmp_path / "report.png"
    subprocess.run([*base, "--window-size=1100,4200", f"--screenshot={shot}", page.as_uri()], capture_output=True,
                   timeout=180)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000


def test_status_watch_follows_a_running_run(tmp_path):
    cfg = {"space": {"bounds": [[0, 1]] * 3}, "optimizer": {"name": "random"},
           "fitness": {"function": "runs_fixtures:slow_sphere", "objectives": [{"name": "score", "direction": "max"}]},
           "budget": {"evaluations": 40}, "seed": 1}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), str(TESTS.parent)]), "EVOMERGE_TEST_SLEEP": "0.25"}
    cli = [sys.executable, "-c", "from evomerge.cli import main; main()"]
    run = subprocess.Popen([*cli, "run", str(tmp_path / "run.yaml"), "--run-dir", str(tmp_path / "r"), "-q"], env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not (tmp_path / "r" / "run.sqlite").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    watch = subprocess.run([*cli, "status", str(tmp_path / "r"), "--watch", "--every", "0.2"], env=env,
                           capture_output=True, text=True, timeout=120)
    assert run.wait(timeout=60) == 0, run.stderr.read().decode()[-2000:]
    assert watch.returncode == 0, watch.stderr
    counts = [int(n) for n in re.findall(r"\] \S+: (\d+) evaluations", watch.stdout)]
    # several refreshes while it ran, never fewer evaluations (a block also changes with the evaluations in flight
    # or the stop, so one count may repeat), the last one when it stopped
    assert len(set(counts)) >= 3 and counts == sorted(counts)
    assert counts[-1] == 40 and "last stop: budget: evaluations" in watch.stdout.splitlines()[-3]


def test_explorer_follows_a_run_still_going(tmp_path):
    """The explorer holds no connection: refresh() sees what a writer committed since, the pick is kept."""
    pytest.importorskip("ipywidgets")
    from evomerge.results.explorer import Explorer

    run_dir = _box_run(tmp_path, evaluations=8)
    explorer = Explorer(run_dir, export_to=tmp_path / "out")
    assert explorer.summary.value.startswith("8 evaluations") and len(explorer.picker.options) == 8
    picked = explorer.picker.options[-1][1]
    explorer.picker.value = picked
    engine = open_engine(None, run_dir, resume=True, budget={"evaluations": 16})
    assert engine.run() == "budget: evaluations"
    engine.store.close()
    explorer.refresh()
    assert explorer.summary.value.startswith("16 evaluations") and len(explorer.picker.options) == 16
    assert explorer.selected == picked and sum(len(t.x) for t in explorer.front.data) == 16
    assert "No held-out table yet" in explorer.scores.value
    _holdout(run_dir)
    explorer.refresh()
    assert '<table id="holdout"' in explorer.scores.value
    explorer.export_button.click()  # a plain-box run has genomes, not recipes: said in the widget, not raised
    assert "has no recorded recipe" in explorer.export_status.value
