"""Resume after SIGKILL, with real processes: nothing completed is lost or re-run, and the history is
exactly that of a run never interrupted."""
from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from evomerge.run.store import STORE_FILE, RunStore

TESTS = Path(__file__).resolve().parent
BUDGET = 36


def _config(tmp_path: Path, optimizer: dict, fitness: dict | None = None) -> Path:
    cfg = {
        "space": {"bounds": [[0, 1]] * 3},
        "optimizer": optimizer,
        "fitness": fitness or {"function": "runs_fixtures:logged_sphere",
                               "objectives": [{"name": "score", "direction": "max"}]},
        "budget": {"evaluations": BUDGET},
        "seed": 11,
        "snapshot_every": 5,
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _env(calls: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), str(TESTS.parent)]),
            "EVOMERGE_TEST_CALLS": str(calls), "EVOMERGE_TEST_SLEEP": "0.03", "OMP_NUM_THREADS": "1"}


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-c", "from evomerge.cli import main; main()", *args]


def _committed(run_dir: Path) -> list[int]:
    path = run_dir / STORE_FILE
    if not path.exists():
        return []
    try:
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
        try:
            return [r[0] for r in con.execute("SELECT candidate_id FROM evaluations ORDER BY seq")]
        finally:
            con.close()
    except sqlite3.OperationalError:  # the store is being created
        return []


def _history(run_dir: Path):
    with RunStore.open(run_dir, readonly=True) as s:
        cands = s.candidates()
        evals = [(e.candidate_id, cands[e.candidate_id].x, cands[e.candidate_id].meta, e.status, e.objectives,
                  e.per_example, e.cost) for e in s.evaluations()]
        return evals, [(e.kind, e.n, e.ids) for e in s.events()]


_SKILL = {"function": "runs_fixtures:logged_skill_examples", "objectives": [{"name": "acc", "direction": "max"}]}


@pytest.mark.parametrize("optimizer,fitness", [
    ({"name": "cmaes", "options": {"popsize": 6}}, None), ({"name": "random"}, None),
    ({"name": "nsga2", "options": {"popsize": 6}}, None), ({"name": "m2n2"}, None),
    ({"name": "optuna", "options": {"sampler": "gp"}}, None), ({"name": "optuna", "options": {"sampler": "tpe"}}, None),
    ({"name": "optuna", "options": {"sampler": "cmaes", "sampler_options": {"popsize": 6}}}, None),
    ({"name": "optuna", "options": {"sampler": "nsga2", "sampler_options": {"population_size": 6}}}, None),
    ({"name": "nevergrad", "options": {"optimizer": "TwoPointsDE", "num_workers": 4}}, None),
    ({"name": "map", "options": {"initial": 10, "batch": 3}}, None),
    # racing and anchor state (thresholds, strata, the plans of candidates in flight) restored exactly
    ({"name": "cmaes", "options": {"popsize": 6}}, {**_SKILL, "racing": {"chunk": 50}}),
    ({"name": "random"}, {**_SKILL, "subset": {"anchors": 20, "warmup": 4, "refit_every": 3, "full_every": 4}}),
], ids=["cmaes", "random", "nsga2", "m2n2", "optuna-gp", "optuna-tpe", "optuna-cmaes", "optuna-nsga2", "nevergrad-de",
        "map", "cmaes-racing", "random-subset"])
def test_sigkill_any_time_then_resume_gives_the_uninterrupted_history(tmp_path, optimizer, fitness):
    cfg = _config(tmp_path, optimizer, fitness)
    ref_calls, calls = tmp_path / "ref_calls", tmp_path / "calls"
    ref = subprocess.run(_cli("run", str(cfg), "--run-dir", str(tmp_path / "ref"), "-q"), env=_env(ref_calls),
                         capture_output=True, text=True, timeout=120)
    assert ref.returncode == 0, ref.stderr
    ref_evals, ref_events = _history(tmp_path / "ref")
    assert len(ref_evals) == BUDGET

    rng = random.Random(len(optimizer["name"]) + len(fitness or ()))
    run_dir = tmp_path / "killed"
    kills = []
    cmd = _cli("run", str(cfg), "--run-dir", str(run_dir), "-q")
    for target in sorted(rng.sample(range(1, BUDGET - 4), 4)):
        proc = subprocess.Popen(cmd, env=_env(calls), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 60
        while len(_committed(run_dir)) < target and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        time.sleep(rng.uniform(0, 0.03))  # land anywhere: mid-evaluation, mid-commit, mid-tell
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        err = proc.stderr.read().decode()
        assert proc.returncode == -signal.SIGKILL, err
        assert "replaying the whole log" not in err  # the optimizer snapshot restored exactly
        kills.append((set(_committed(run_dir)), len(calls.read_text().split())))
        cmd = _cli("resume", str(run_dir), "-q")
    final = subprocess.run(cmd, env=_env(calls), capture_output=True, text=True, timeout=120)
    assert final.returncode == 0, final.stderr
    assert "replaying the whole log" not in final.stderr

    if "popsize" in json.dumps(optimizer) or "population_size" in json.dumps(optimizer):
        assert any(len(committed) % 6 for committed, _ in kills), "no kill fell inside a generation"
    evals, events = _history(run_dir)
    # identical history: same candidates, same order, same results, same optimizer calls
    assert evals == ref_evals
    assert events == ref_events
    if fitness is not None:  # the strategy did act: some evaluations scored only part of the examples
        assert any(e[6]["examples"] < 400 for e in evals)
    # nothing completed before a kill was evaluated again after it
    log = [int(v) for v in calls.read_text().split()]
    for committed, n_calls in kills:
        assert not committed & set(log[n_calls:]), "a committed evaluation was re-run after resume"
    # every candidate was evaluated; repeats only for candidates in flight at a kill
    assert set(log) == {e[0] for e in evals}
    if fitness is not None:  # racing and anchors call the function once per chunk: one evaluation = one streak
        log = [k for i, k in enumerate(log) if i == 0 or log[i - 1] != k]
    assert len(log) - len(set(log)) <= len(kills)
    with RunStore.open(run_dir, readonly=True) as s:
        reasons = [x["reason"] for x in s.sessions()]
    assert reasons[-1] == "budget: evaluations" and reasons.count(None) == len(kills)


def test_status_json_reports_a_killed_run(tmp_path):
    cfg = _config(tmp_path, {"name": "random"})
    run_dir = tmp_path / "r"
    proc = subprocess.Popen(_cli("run", str(cfg), "--run-dir", str(run_dir), "-q"), env=_env(tmp_path / "c"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while len(_committed(run_dir)) < 5 and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.kill()
    proc.wait()
    out = subprocess.run(_cli("status", str(run_dir), "--json"), env=_env(tmp_path / "c"), capture_output=True,
                         text=True, timeout=60)
    info = json.loads(out.stdout)
    assert info["evaluations"] >= 5 and info["failed"] == 0
    assert info["evaluations"] + info["in_flight"] == len(_history(run_dir)[0]) + info["in_flight"]
    assert info["best"]["score"]["value"] <= 0 and info["pareto_size"] == 1


def test_ctrl_c_stops_cleanly_and_resume_completes_the_same_run(tmp_path):
    cfg = _config(tmp_path, {"name": "random"})
    ref = subprocess.run(_cli("run", str(cfg), "--run-dir", str(tmp_path / "ref"), "-q"), env=_env(tmp_path / "rc"),
                         capture_output=True, text=True, timeout=120)
    assert ref.returncode == 0, ref.stderr
    run_dir = tmp_path / "r"
    proc = subprocess.Popen(_cli("run", str(cfg), "--run-dir", str(run_dir), "-q"), env=_env(tmp_path / "c"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while len(_committed(run_dir)) < 10 and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "stopped (interrupted)" in out and "Traceback" not in err
    with RunStore.open(run_dir, readonly=True) as s:
        assert s.sessions()[-1]["reason"] == "interrupted"
        counts = s.counts()
    assert 10 <= counts["evaluations"] < BUDGET
    done = subprocess.run(_cli("resume", str(run_dir), "-q"), env=_env(tmp_path / "c"), capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert _history(run_dir) == _history(tmp_path / "ref")


def test_killed_sessions_count_against_wall_time_up_to_their_last_evaluation(tmp_path):
    """Three killed sessions and a resume: the killed ones count (from their start to their last recorded
    evaluation), so a run that keeps crashing still reaches its wall-time budget."""
    cfg = _config(tmp_path, {"name": "random"})
    data = yaml.safe_load(cfg.read_text())
    data["budget"] = {"evaluations": 10_000, "wall_time": "1h"}
    cfg.write_text(yaml.safe_dump(data))
    run_dir = tmp_path / "r"
    cmd = _cli("run", str(cfg), "--run-dir", str(run_dir), "-q")
    for target in (8, 16, 24):
        proc = subprocess.Popen(cmd, env=_env(tmp_path / "c"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while len(_committed(run_dir)) < target and time.monotonic() < deadline:
            time.sleep(0.005)
        proc.kill()
        proc.wait()
        cmd = _cli("resume", str(run_dir), "-q")
    con = sqlite3.connect(f"file:{run_dir / STORE_FILE}?mode=ro", uri=True)
    starts = [r[0] for r in con.execute("SELECT started_at FROM sessions WHERE ended_at IS NULL ORDER BY id")]
    done = [r[0] for r in con.execute("SELECT finished_at FROM evaluations ORDER BY seq")]
    con.close()
    assert len(starts) == 3
    # each killed session: from its start to the last evaluation before the next session began
    bounds = [*starts[1:], float("inf")]
    spans = [max(t for t in done if s <= t < e) - s for s, e in zip(starts, bounds)]
    assert all(s > 0.03 * 7 for s in spans)  # each recorded 8+ evaluations of 0.03 s
    with RunStore.open(run_dir, readonly=True) as s:
        assert s.elapsed() == pytest.approx(sum(spans), abs=1e-6)
    with RunStore.open(run_dir, readonly=True) as s:
        n = s.counts()["evaluations"] + s.counts()["in_flight"]  # what was in flight at the kill is finished
    # a wall-time budget those sessions already spent: the resumed run asks for nothing new, and says it was cut
    out = subprocess.run(_cli("resume", str(run_dir), "--wall-time", f"{sum(spans) * 0.9:.3f}s", "-q"),
                         env=_env(tmp_path / "c"), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "stopped (budget: wall time)" in out.stdout and len(_committed(run_dir)) == n
    assert f"cut the search of 'this run' at {n} of 10000 evaluations" in out.stdout
