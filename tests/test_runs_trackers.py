"""Experiment trackers on short real runs, through the CLI in subprocesses: a real MLflow SQLite store and W&B in
offline mode get every evaluation exactly once across a SIGKILL and a resume, and the held-out table; a tracker
that fails leaves the run going."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from evomerge.config import parse_config
from evomerge.records import UserError
from evomerge.run.store import RunStore
from runs_fixtures import committed
from evomerge.results.trackers import wandb_history, wandb_records

TESTS = Path(__file__).resolve().parent
BUDGET = 24


def _config(tmp_path: Path, trackers: list[dict]) -> Path:
    cfg = {"space": {"bounds": [[0, 1]] * 3, "names": ["w.layer_0", "w.layer_1", "d"]},
           "optimizer": {"name": "random"},
           "fitness": {"function": "runs_fixtures:logged_sphere", "objectives": [{"name": "score", "direction": "max"}]},
           "budget": {"evaluations": BUDGET}, "seed": 5,
           "holdout": {"function": "runs_fixtures:box_table"}, "trackers": trackers}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), str(TESTS.parent)]),
            "EVOMERGE_TEST_CALLS": str(tmp_path / "calls"), "EVOMERGE_TEST_SLEEP": "0.5", "WANDB_SILENT": "true"}


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-c", "from evomerge.cli import main; main()", *args]



def _logging(run_dir: Path) -> bool:
    """Both trackers have their runs, and a few evaluations are in."""
    try:
        state = json.loads((run_dir / "trackers.json").read_text())
    except (OSError, ValueError):
        return False
    return set(state) == {"0:mlflow", "1:wandb"} and committed(run_dir) >= 5


def _wandb_history(wandb_dir: Path) -> tuple[list[dict], dict]:
    """Every history row and the summary W&B's offline files hold, over all sessions of the run."""
    rows, summary = [], {}
    for f in sorted(wandb_dir.glob("wandb/offline-run-*/run-*.wandb")):
        rows += list(wandb_history(f))
        for kind, r in wandb_records(f):
            if kind == "summary":
                summary.update({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.summary.update})
    return rows, summary


def _store_scores(run_dir: Path) -> list[float]:
    with RunStore.open(run_dir, readonly=True) as s:
        return [e.objectives["score"] for e in s.evaluations()]


def test_mlflow_and_wandb_get_every_evaluation_once_across_a_kill_and_resume(tmp_path):
    pytest.importorskip("mlflow")
    pytest.importorskip("wandb")
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # the tracking database and experiment exist (creating the database takes 10 s), its artifacts under tmp_path
    MlflowClient(tracking_uri=uri).create_experiment("merges", artifact_location=(tmp_path / "artifacts").as_uri())
    cfg = _config(tmp_path, [{"kind": "mlflow", "uri": uri, "experiment": "merges"},
                             {"kind": "wandb", "mode": "offline", "project": "merges", "dir": str(tmp_path / "wb")}])
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(_cli("run", str(cfg), "--run-dir", str(run_dir), "-q"), env=_env(tmp_path),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not _logging(run_dir) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)  # kill once the trackers have logged part of the run
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    assert committed(run_dir) < BUDGET
    state = json.loads((run_dir / "trackers.json").read_text())
    assert set(state) == {"0:mlflow", "1:wandb"}
    done = subprocess.run(_cli("resume", str(run_dir), "-q"), env=_env(tmp_path), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "tracker" not in done.stderr
    scores = _store_scores(run_dir)
    assert len(scores) == BUDGET

    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("merges").experiment_id])
    assert run.info.run_id == state["0:mlflow"]["run"] and run.info.status == "FINISHED"
    marks = client.get_metric_history(run.info.run_id, "evaluation")
    assert sorted(m.step for m in marks) == list(range(1, BUDGET + 1))  # each evaluation once, none lost
    logged = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "score")}
    assert [logged[n] for n in range(1, BUDGET + 1)] == pytest.approx(scores)
    assert len(client.get_metric_history(run.info.run_id, "x/w.layer_0")) == BUDGET  # the genome summary
    assert len(client.get_metric_history(run.info.run_id, "time/score")) == BUDGET  # timings
    table = json.loads(Path(run.info.artifact_uri.removeprefix("file://"), "holdout.json").read_text())
    assert set(table["rows"]) == {"centre", "evolved best"}
    assert run.data.metrics["holdout/evolved best/score"] == pytest.approx(table["rows"]["evolved best"]["score"])

    rows, summary = _wandb_history(tmp_path / "wb")
    steps = [r["evaluation"] for r in rows if "evaluation" in r]
    assert sorted(steps) == list(range(1, BUDGET + 1))  # over both sessions: appended, not duplicated
    by_step = {r["evaluation"]: r["score"] for r in rows if "evaluation" in r}
    assert [by_step[n] for n in range(1, BUDGET + 1)] == pytest.approx(scores)
    assert [r["holdout/path"] for r in rows if r.get("holdout/_type") == "table-file"]  # the table, as a W&B Table
    (logged,) = (tmp_path / "wb").glob("wandb/offline-run-*/files/media/table/holdout_*.table.json")
    wb_table = json.loads(logged.read_text())
    assert wb_table["columns"] == ["model", "score"] and [r[0] for r in wb_table["data"]] == ["centre", "evolved best"]
    assert summary["holdout/evolved best/score"] == pytest.approx(table["rows"]["evolved best"]["score"])


def test_a_failing_tracker_is_reported_once_and_the_run_goes_on(tmp_path):
    pytest.importorskip("mlflow")
    pytest.importorskip("wandb")
    (tmp_path / "a_file").write_text("not a folder")
    cfg = _config(tmp_path, [{"kind": "mlflow", "uri": f"sqlite:///{tmp_path / 'a_file' / 'mlflow.db'}"},
                             {"kind": "wandb", "mode": "offline", "dir": str(tmp_path / "wb")}])
    done = subprocess.run(_cli("run", str(cfg), "--run-dir", str(tmp_path / "run"), "-q"), env=_env(tmp_path),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    failures = [line for line in done.stderr.splitlines() if "tracker" in line]
    assert len(failures) == 1 and "tracker mlflow failed" in failures[0] and "goes on without it" in failures[0]
    assert len(_store_scores(tmp_path / "run")) == BUDGET
    rows, _ = _wandb_history(tmp_path / "wb")  # the other tracker got everything
    assert sorted(r["evaluation"] for r in rows if "evaluation" in r) == list(range(1, BUDGET + 1))


@pytest.mark.parametrize("tracker, needle", [
    ({"kind": "mlflow", "project": "p"}, "'project' is not a mlflow setting"),
    ({"kind": "neptune"}, "trackers.0.kind"),
    ({"kind": "wandb", "mode": "sometimes"}, "trackers.0.mode"),
])
def test_a_wrong_tracker_setting_is_one_line(tracker, needle):
    with pytest.raises(UserError, match=needle):
        parse_config({"space": {"bounds": [[0, 1]]}, "budget": {"evaluations": 1},
                      "fitness": {"function": "m:f", "objectives": [{"name": "s", "direction": "max"}]},
                      "trackers": [tracker]})
