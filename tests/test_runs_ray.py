"""The Ray executor on a real local Ray: streaming, resident workers, actors killed mid-evaluation."""
from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from evomerge.run.assemble import open_engine
from evomerge.config import parse_config
from evomerge.run.store import RunStore

pytest.importorskip("ray")


def _cfg(function: str, evaluations: int, workers: int, **executor) -> dict:
    return {
        "space": {"bounds": [[0, 1]] * 2},
        "optimizer": {"name": "random"},
        "fitness": {"function": f"runs_fixtures:{function}", "objectives": [{"name": "score", "direction": "max"}]},
        "budget": {"evaluations": evaluations},
        "executor": {"kind": "ray", "workers": workers, "cpus_per_worker": 0.5, **executor},
        "seed": 5,
    }


def _run(tmp_path, cfg: dict):
    engine = open_engine(parse_config(cfg), tmp_path / "run", resume=False)
    reason = engine.run()
    store = RunStore.open(tmp_path / "run", readonly=True)
    return engine, reason, store


def test_streams_to_resident_actors(ray_local, tmp_path):
    engine, reason, store = _run(tmp_path, _cfg("slow_sphere", 12, 3))
    evals = store.evaluations()
    assert reason == "budget: evaluations" and len(evals) == 12 and all(e.ok for e in evals)
    workers = {e.worker for e in evals}
    # three actors, each built once (one process each) and kept for all its candidates
    assert len(workers) == 3 and all(w.startswith("ray-") for w in workers)
    assert len({w.rsplit(":", 1)[1] for w in workers}) == 3
    assert {e.candidate_id for e in evals} == set(range(12))
    assert engine.executor.replaced == 0


def test_actor_killed_mid_evaluation_is_replaced_and_retried(ray_local, tmp_path):
    marker = ray_local
    marker.unlink(missing_ok=True)
    killed: list[int] = []

    def killer() -> None:  # the outside world: SIGKILL the actor process while it evaluates candidate 2
        deadline = time.monotonic() + 120
        while not marker.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        if marker.exists():
            pid = int(marker.read_text())
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    engine, reason, store = _run(tmp_path, _cfg("sphere_dies_once", 8, 2))
    t.join(5)
    evals = {e.candidate_id: e for e in store.evaluations()}
    assert killed, "candidate 2 never started"
    assert reason == "budget: evaluations" and sorted(evals) == list(range(8))
    assert all(e.ok for e in evals.values())
    assert engine.executor.replaced == 1
    assert not evals[2].worker.endswith(f":{killed[0]}")  # retried elsewhere, after the kill


def test_actor_dying_every_time_is_recorded_as_failed(ray_local, tmp_path):
    engine, reason, store = _run(tmp_path, _cfg("dies_on_candidate_1", 5, 2, max_retries=1))
    evals = {e.candidate_id: e for e in store.evaluations()}
    assert reason == "budget: evaluations" and sorted(evals) == list(range(5))
    assert evals[1].status == "failed" and "worker died 2 times" in evals[1].error
    assert all(evals[i].ok for i in (0, 2, 3, 4))
    assert engine.executor.replaced == 2


def test_failing_fitness_is_a_failed_evaluation_not_a_crash(ray_local, tmp_path):
    _, reason, store = _run(tmp_path, _cfg("explodes_on_odd", 6, 2))
    evals = {e.candidate_id: e for e in store.evaluations()}
    assert reason == "budget: evaluations" and sorted(evals) == list(range(6))
    assert [evals[i].ok for i in range(6)] == [True, False] * 3
    assert "ValueError: cannot score candidate 3" in evals[3].error


def test_two_node_cluster_actor_killed_mid_evaluation(tmp_path):
    """On a two-node `ray.cluster_utils.Cluster` (its own processes, apart from the session's Ray)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    here = Path(__file__).resolve().parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(here), str(here.parent)]), "RAY_AUTH_MODE": "disabled",
           "EVOMERGE_TEST_MARKER": str(tmp_path / "died")}
    proc = subprocess.run([sys.executable, "-c", f"import runs_fixtures; runs_fixtures.two_node_run({str(tmp_path / 'run')!r})"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["reason"] == "budget: evaluations" and out["killed"]
    evals = {cid: (status, worker) for cid, status, worker in out["evals"]}
    assert sorted(evals) == list(range(8)) and all(s == "ok" for s, _ in evals.values())
    assert out["replaced"] == 1 and not evals[2][1].endswith(f":{out['killed'][0]}")
    # the two actors lived on two different nodes
    assert len({w.split("/")[1].split(":")[0] for _, w in evals.values()}) >= 2



def test_a_node_lost_without_spare_capacity_is_said_and_its_slot_refilled_when_a_node_joins(tmp_path):
    """The worker node goes mid-evaluation with no spare CPU: its candidate is retried on the worker left, the
    replacement that cannot be placed is one line after the grace period and the run goes on (it never hangs); a
    node joining later takes the slot (one line), and evaluations run there. Every evaluation is ok, none twice."""
    import json
    import subprocess
    import sys
    from collections import Counter
    from pathlib import Path

    here = Path(__file__).resolve().parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(here), str(here.parent)]), "RAY_AUTH_MODE": "disabled",
           "EVOMERGE_TEST_MARKER": str(tmp_path / "lost")}
    proc = subprocess.run([sys.executable, "-c", "import runs_fixtures; "
                           f"runs_fixtures.node_lost_without_spare_capacity({str(tmp_path / 'run')!r})"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["reason"] == "budget: evaluations" and out["events"] == ["removed", "joined"]
    assert sorted(c for c, _, _ in out["evals"]) == list(range(100)) and all(s == "ok" for _, s, _ in out["evals"])
    lost, short, refilled = out["lines"]
    assert f"on node {out['lost_node'][:8]} lost evaluating candidate" in lost and "retried (attempt 2)" in lost
    assert "1 worker (ray-1) not placed after 3 s" in short and "going on with 1 worker" in short
    assert refilled.startswith("evomerge: worker ray-1 placed on node") and "2 workers working" in refilled
    new_node = refilled.split("placed on node ")[1].split(";")[0]
    nodes = Counter(w.split("/")[1].split(":")[0] for _, _, w in out["evals"])
    assert new_node != out["lost_node"][:8] and nodes[new_node] >= 1  # the refilled slot evaluated


def test_ctrl_c_lets_ray_workers_finish_their_candidates(ray_local, tmp_path):
    import _thread

    cfg = _cfg("slow_sphere", 200, 2)
    engine = open_engine(parse_config(cfg), tmp_path / "run", resume=False)

    fired: list[bool] = []

    def ctrl_c_after_three(progress) -> None:  # Ctrl-C once the run is streaming
        if progress.done >= 3 and not fired:
            fired.append(True)
            _thread.interrupt_main()

    engine.on_progress = ctrl_c_after_three
    reason = engine.run()
    store = RunStore.open(tmp_path / "run", readonly=True)
    counts = store.counts()
    assert reason == "interrupted" and 3 <= counts["evaluations"] < 10
    assert counts["in_flight"] == 0  # what was running when Ctrl-C came was finished and recorded
    assert store.sessions()[-1]["reason"] == "interrupted"


def test_more_cpus_than_the_local_ray_has_is_refused_in_one_line(tmp_path):
    """`evomerge run` as a user types it, starting its own local Ray (a fresh process): three workers of all
    the machine's CPUs each can never all be placed, so the start would wait for ever; it is refused instead."""
    import subprocess
    import sys
    from pathlib import Path

    import yaml

    here = Path(__file__).resolve().parent
    cfg = tmp_path / "run.yaml"
    cpus = os.cpu_count()
    cfg.write_text(yaml.safe_dump(_cfg("sphere", 4, 3, cpus_per_worker=cpus)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(here), str(here.parent)]), "RAY_AUTH_MODE": "disabled"}
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "evomerge.cli", "run", str(cfg), "--run-dir", str(tmp_path / "r"), "-q"],
                          env=env, capture_output=True, text=True, timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-3000:]
    assert f"workers 3 x cpus_per_worker {cpus} need {3 * cpus} CPUs, but the local Ray has" in lines[0]
    assert "lower executor.workers or executor.cpus_per_worker" in lines[0] and time.monotonic() - start < 240
    assert not (tmp_path / "r").exists()  # refused before the run is created: fix the config and run again


def test_gpus_the_local_ray_lacks_are_refused():
    """The same check for GPUs (the resources a Ray it started reports; the run above shows where it applies)."""
    from evomerge.run.executors import RayExecutor
    from evomerge.records import UserError

    with pytest.raises(UserError, match=r"workers 2 x gpus_per_worker 1 need 2 GPUs, but the local Ray has 1: .*gpus_per_worker"):
        RayExecutor(lambda: None, workers=2, gpus_per_worker=1)._check_fits({"CPU": 16.0, "GPU": 1.0})
    RayExecutor(lambda: None, workers=2, cpus_per_worker=2, gpus_per_worker=0.5)._check_fits({"CPU": 4.0, "GPU": 1.0})


@pytest.mark.skipif(os.geteuid() != 0, reason="a node's own view of the files needs a mount namespace (root)")
def test_a_node_holding_another_checkpoint_at_the_same_path_is_refused(tmp_path, tiny_models):
    """Two real raylets on this host; the second sees source `b`'s weights at source `a`'s path. The run is refused
    before its store exists, in one line naming that node, the source and the file."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    task = tmp_path / "t.jsonl"
    task.write_text("".join(json.dumps({"prompt": f"{a}+{a}=", "reference": str(2 * a)}) + "\n" for a in range(3)))
    cfg = {"sources": {k: str(v) for k, v in tiny_models.items()}, "base": "base",
           "space": {"name": "layer_weights", "options": {"method": "ties"}}, "optimizer": {"name": "random"},
           "fitness": {"tasks": [{"name": "t", "path": str(task), "metrics": ["teacher_exact"]}]},
           "budget": {"evaluations": 2}, "seed": 1}
    here = Path(__file__).resolve().parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(here), str(here.parent)]), "RAY_AUTH_MODE": "disabled",
           "EVOMERGE_TEST_CONFIG": json.dumps(cfg), "EVOMERGE_CACHE": str(tmp_path / "cache")}
    run_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-c", f"import runs_fixtures; runs_fixtures.node_with_another_checkpoint({str(run_dir)!r})"],
                          env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    error = out["error"]
    assert error is not None and "\n" not in error, error
    assert f"source 'a' on node " in error and f"/{out['node'][:8]}:" in error, error
    assert f"{cfg['sources']['a']}/model.safetensors differs from the run's" in error, error
    assert not out["created"]  # nothing written
