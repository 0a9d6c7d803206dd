"""Cluster faults said in evomerge's words (issue 22): workers that cannot be placed, and an --address where no Ray
head answers, are one line each, never a silent wait. The address case: refused in one
line, bounded by the executor's TCP probe, instead of Ray's minutes of "Failed to connect to GCS" warnings."""
from __future__ import annotations

import logging
import os
import re
import socket
import subprocess
import sys

import pytest

from evomerge.records import UserError
from test_runs_cli import _box, _write


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    tests = os.path.dirname(__file__)  # the fixtures' module, for the child
    return {**os.environ, "RAY_ADDRESS": "", "PYTHONPATH": os.pathsep.join([tests, os.environ.get("PYTHONPATH", "")])}


@pytest.mark.parametrize("address, needles", [
    (f"127.0.0.1:{_free_port()}", ["cannot reach the Ray cluster at '127.0.0.1:", "nothing answered", "ray start --head"]),
    ("nowhere", ["--address 'nowhere'", "HOST:PORT"]),
])
def test_an_address_where_no_head_answers_is_one_line(tmp_path, address, needles):
    cfg = _write(tmp_path, _box(budget={"evaluations": 2}, executor={"kind": "ray", "workers": 1}))
    # the subprocess's own timeout only guards the suite: Ray alone would retry for minutes
    p = subprocess.run([sys.executable, "-c", "from evomerge.cli import main; main()", "run", str(cfg),
                        "--run-dir", str(tmp_path / "run"), "--address", address],
                       capture_output=True, text=True, timeout=120, env=_env())
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1 and lines[0].startswith("evomerge: error:"), p.stderr
    assert all(n in lines[0] for n in needles), lines[0]
    assert "Failed to connect to GCS" not in p.stdout + p.stderr
    assert not (tmp_path / "run").exists()


def _on_session_ray(tmp_path, workers: int, cpus: float):
    """A run on the session's real Ray (4 CPUs) whose workers reserve `cpus` each, with a 20 s placement grace
    (long enough for a worker to start and load on a busy box)."""
    from evomerge.run.assemble import open_engine
    from evomerge.config import parse_config

    cfg = _box(budget={"evaluations": 6},
               executor={"kind": "ray", "workers": workers, "cpus_per_worker": cpus, "placement_grace": 20})
    return open_engine(parse_config(cfg), tmp_path / "run", resume=False)


def test_more_workers_than_fit_run_on_those_placed_saying_so(ray_local, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="evomerge"):
        engine = _on_session_ray(tmp_path, workers=3, cpus=2)  # two fit in 4 CPUs; the third never can
        assert engine.run() == "budget: evaluations"
    assert len(engine.store.evaluations()) == 6 and all(e.ok for e in engine.store.evaluations())
    said = [r.getMessage() for r in caplog.records if "not placed" in r.getMessage()]
    # which of the three Ray leaves unplaced is its own choice
    assert said == [said[0]] and re.match(r"evomerge: 1 worker \(ray-\d\) not placed after 20 s: the cluster has ", said[0])
    assert "each worker needs 2 CPU" in said[0] and "going on with 2 workers" in said[0]
    engine.store.close()


def test_no_worker_that_fits_is_one_line_not_a_wait(ray_local, tmp_path):
    with pytest.raises(UserError) as e:
        _on_session_ray(tmp_path, workers=1, cpus=8)
    msg = str(e.value)
    assert msg.startswith("1 worker (ray-0) not placed after 20 s") and "no worker is placed" in msg and "\n" not in msg



class _RayStart:
    """A Ray node as a user starts one (`ray start ... --block`), in a session of its own; `kill` SIGKILLs its
    whole process tree (GCS, raylet, agents, actors), as a machine that goes away would."""

    def __init__(self, *args: str):
        ray = os.path.join(os.path.dirname(sys.executable), "ray")
        self.proc = subprocess.Popen([ray, "start", *args, "--block", "--disable-usage-stats"], env=_env(),
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)

    def kill(self) -> None:
        import psutil

        try:
            root = psutil.Process(self.proc.pid)
            tree = root.children(recursive=True) + [root]
        except psutil.NoSuchProcess:
            return
        for p in tree:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        self.proc.wait(timeout=60)


def _cluster(cpus_head: int, cpus_node: int) -> tuple[str, _RayStart, _RayStart]:
    """A head and a node; the head's temp dir of its own, so its address file (ray_current_cluster, which a bare
    `ray.init()` joins) stays out of /tmp/ray, where it would outlive the cluster. Short: Ray's socket paths."""
    import tempfile

    port = _free_port()
    head = _RayStart("--head", f"--port={port}", f"--num-cpus={cpus_head}", "--include-dashboard=false",
                     f"--temp-dir={tempfile.mkdtemp(prefix='evr', dir='/tmp')}")
    node = _RayStart(f"--address=127.0.0.1:{port}", f"--num-cpus={cpus_node}")
    return f"127.0.0.1:{port}", head, node


def _cli(*args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "from evomerge.cli import main; main()", *args], env={
        **_env(), "EVOMERGE_TEST_SLEEP": "0.3"}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def _by_candidate(run_dir):
    from evomerge.run.store import RunStore

    with RunStore.open(run_dir, readonly=True) as s:
        cands = s.candidates()
        evals = s.evaluations()
        assert len(evals) == len({e.candidate_id for e in evals})  # none twice
        return {e.candidate_id: (cands[e.candidate_id].x, e.status, e.objectives) for e in evals}


def _wait_committed(run_dir, n: int, proc: subprocess.Popen) -> None:
    import time

    from runs_fixtures import committed

    deadline = time.monotonic() + 180
    while committed(run_dir) < n and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert committed(run_dir) >= n, proc.poll() is None or proc.communicate()[0]


def test_a_node_then_the_head_lost_are_evomerges_lines_only_and_a_new_head_resumes_to_the_same_history(tmp_path):
    """Real `ray start` head and node. The node goes mid-run (one line, the run goes on), then the head: one line
    naming the address, the session marked as ended by a lost cluster, exit 3, and in the whole output not one of
    Ray's own lines (they go to RUN_DIR/ray.log). A new head and node: `evomerge resume` finishes the run, whose
    evaluations equal an uninterrupted local run's, candidate for candidate."""
    from evomerge.cli import main  # noqa: F401  (the children import it; fail here first if it cannot)
    from evomerge.results.journal import run_status

    cfg = {"space": {"bounds": [[0, 1]] * 2}, "optimizer": {"name": "random"}, "seed": 3,
           "fitness": {"function": "runs_fixtures:slow_sphere", "objectives": [{"name": "score"}]},
           "budget": {"evaluations": 100}, "executor": {"kind": "ray", "workers": 2, "cpus_per_worker": 1}}
    config, run = _write(tmp_path, cfg), tmp_path / "run"
    started: list[_RayStart] = []
    try:
        address, head, node = _cluster(1, 1)
        started += [head, node]
        proc = _cli("run", str(config), "--run-dir", str(run), "--address", address, "-q", "--placement-grace", "30")
        _wait_committed(run, 8, proc)
        node.kill()
        _wait_committed(run, 70, proc)  # the GCS takes seconds to say a node is dead; the head stays till then
        head.kill()
        out = proc.communicate(timeout=120)[0]
        lines = out.strip().splitlines()
        assert proc.returncode == 3, out
        assert all(ln.startswith("evomerge: ") for ln in lines), out  # no raw Ray line reached the terminal
        lost = [ln for ln in lines if "lost the Ray cluster" in ln]
        assert lost == [lines[-1]] and f"at {address} " in lost[0] and "marked as ended by a lost cluster" in lost[0]
        assert lost[0].endswith(f"evomerge resume {run} --address {address}"), lost[0]
        node_lost = [ln for ln in lines if "lost evaluating candidate" in ln]  # the node's loss, in evomerge's words
        assert node_lost and "(its node was lost)" in node_lost[0] and "OOM" not in node_lost[0], out
        assert (run / "ray.log").is_file()
        state = run_status(run)["state"]
        assert state.startswith("ended by a lost cluster") and address.split(":")[1] in state, state

        address, head, node = _cluster(1, 1)  # a new head (and node), as after a reboot
        started += [head, node]
        proc = _cli("resume", str(run), "--address", address, "-q")
        out = proc.communicate(timeout=300)[0]
        assert proc.returncode == 0, out
        assert all(ln.startswith("evomerge: ") for ln in out.strip().splitlines()), out
        assert run_status(run)["state"].startswith("finished")
    finally:
        for r in started:
            r.kill()
    local = tmp_path / "local"
    ref = _write(tmp_path, {**cfg, "executor": {"kind": "local"}}, "local.yaml")
    p = subprocess.run([sys.executable, "-c", "from evomerge.cli import main; main()", "run", str(ref), "--run-dir",
                        str(local), "-q"], env={**_env(), "EVOMERGE_TEST_SLEEP": "0"}, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr
    resumed, uninterrupted = _by_candidate(run), _by_candidate(local)
    assert sorted(resumed) == list(range(100)) and resumed == uninterrupted


@pytest.mark.parametrize("command", ["run", "resume"])
@pytest.mark.parametrize("grace", ["0", "-1", "nan", "inf"])
def test_a_placement_grace_that_is_no_time_is_one_line(tmp_path, monkeypatch, capsys, command, grace):
    from tests.test_merge_cli import run_cli

    cfg = _write(tmp_path, _box(executor={"kind": "ray", "workers": 1}))
    target = [str(cfg), "--run-dir", str(tmp_path / "run")] if command == "run" else [str(tmp_path / "run")]
    code, out, err = run_cli(monkeypatch, capsys, command, *target, "--placement-grace", grace)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and f"--placement-grace must be a number of seconds > 0, got {float(grace)}" in lines[0], err
    assert not (tmp_path / "run").exists()
