"""Helpers for the runs tests: a real local Ray started once per session, and user fitness functions.

The fitness functions here are what a user writes: ordinary Python functions of the handle. They live
in this importable module (not in a test file) so Ray worker processes can import them by name.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import pytest


def sphere(handle) -> dict[str, float]:
    """Deterministic: larger is better, optimum at x = 0.3 everywhere."""
    return {"score": -sum((v - 0.3) ** 2 for v in handle.x)}


def two_objectives(handle) -> dict[str, float]:
    """A trade-off: 'a' wants x near 0.2, 'b' wants x near 0.8 (both to minimise)."""
    return {"a": sum((v - 0.2) ** 2 for v in handle.x), "b": sum((v - 0.8) ** 2 for v in handle.x)}


def slow_sphere(handle) -> dict[str, float]:
    """The sphere, after a fixed latency given by $EVOMERGE_TEST_SLEEP (seconds)."""
    time.sleep(float(os.environ.get("EVOMERGE_TEST_SLEEP", "0.05")))
    return sphere(handle)


def sphere_dies_once(handle) -> dict[str, float]:
    """Candidate 2's first evaluation announces its pid in $EVOMERGE_TEST_MARKER and hangs until the test
    SIGKILLs that process; the retry (the marker exists) scores normally."""
    marker = Path(os.environ["EVOMERGE_TEST_MARKER"])
    if handle.candidate_id == 2 and not marker.exists():
        tmp = marker.with_suffix(".tmp")
        tmp.write_text(str(os.getpid()))
        tmp.rename(marker)
        time.sleep(120)
    return sphere(handle)


def hangs_once_off_the_head(handle) -> dict[str, float]:
    """The first evaluation on a node other than $EVOMERGE_TEST_HEAD writes that node's id to
    $EVOMERGE_TEST_MARKER and hangs (the test removes the node under it); every other takes 0.3 s."""
    import ray

    marker, node = Path(os.environ["EVOMERGE_TEST_MARKER"]), ray.get_runtime_context().get_node_id()
    if node != os.environ["EVOMERGE_TEST_HEAD"] and not marker.exists():
        marker.with_suffix(".tmp").write_text(node)
        marker.with_suffix(".tmp").rename(marker)
        time.sleep(120)
    time.sleep(0.3)
    return sphere(handle)


def explodes_on_odd(handle) -> dict[str, float]:
    """A fitness that raises for some candidates: the run must record failures and go on."""
    if handle.candidate_id % 2:
        raise ValueError(f"cannot score candidate {handle.candidate_id}")
    return sphere(handle)


def logged_sphere(handle) -> dict[str, float]:
    """The sphere after $EVOMERGE_TEST_SLEEP seconds, appending the candidate id to $EVOMERGE_TEST_CALLS first
    (so a test can tell which evaluations ever ran, and how often)."""
    with open(os.environ["EVOMERGE_TEST_CALLS"], "a") as f:
        f.write(f"{handle.candidate_id}\n")
    time.sleep(float(os.environ.get("EVOMERGE_TEST_SLEEP", "0.0")))
    return sphere(handle)


def dies_on_candidate_1(handle) -> dict[str, float]:
    """Candidate 1 kills the process evaluating it, every time: its actor dies on each retry."""
    if handle.candidate_id == 1:
        os._exit(1)
    return sphere(handle)


@pytest.fixture(scope="session")
def ray_local(tmp_path_factory):
    """One real local Ray for the whole test session (it takes seconds to start on a busy box).
    Yields the marker path `sphere_dies_once` uses; delete it to arm the kill again."""
    os.environ["RAY_AUTH_MODE"] = "disabled"
    ray = pytest.importorskip("ray")
    marker = tmp_path_factory.mktemp("ray") / "died"
    here = Path(__file__).resolve().parent
    env = {"PYTHONPATH": os.pathsep.join([str(here), str(here.parent)]), "RAY_AUTH_MODE": "disabled",
           "EVOMERGE_TEST_MARKER": str(marker), "OMP_NUM_THREADS": "1"}
    os.environ["EVOMERGE_TEST_MARKER"] = str(marker)
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": env})
    yield marker
    ray.shutdown()


def two_node_run(run_dir: str) -> None:
    """Run in a fresh process: a two-node `ray.cluster_utils.Cluster` (one CPU each), a two-actor run whose
    actor evaluating candidate 2 is SIGKILLed from outside; prints what the test checks, as JSON."""
    import json
    import signal
    import threading

    import ray
    from ray.cluster_utils import Cluster

    from evomerge.run.assemble import open_engine
    from evomerge.config import parse_config
    from evomerge.run.store import RunStore

    here = Path(__file__).resolve().parent
    env = {"PYTHONPATH": os.pathsep.join([str(here), str(here.parent)]), "RAY_AUTH_MODE": "disabled",
           "EVOMERGE_TEST_MARKER": os.environ["EVOMERGE_TEST_MARKER"], "OMP_NUM_THREADS": "1"}
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    marker = Path(os.environ["EVOMERGE_TEST_MARKER"])
    killed: list[int] = []

    def killer() -> None:
        deadline = time.monotonic() + 120
        while not marker.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        if marker.exists():
            killed.append(int(marker.read_text()))
            os.kill(killed[0], signal.SIGKILL)

    threading.Thread(target=killer, daemon=True).start()
    cfg = {"space": {"bounds": [[0, 1]] * 2}, "optimizer": {"name": "random"},
           "fitness": {"function": "runs_fixtures:sphere_dies_once", "objectives": [{"name": "score"}]},
           "budget": {"evaluations": 8}, "seed": 1,
           "executor": {"kind": "ray", "workers": 2, "cpus_per_worker": 1, "runtime_env": {"env_vars": env}}}
    # the run joins the cluster by its address, as `evomerge run --address ...` does
    engine = open_engine(parse_config(cfg), run_dir, resume=False, address=cluster.address)
    reason = engine.run()
    assert not ray.is_initialized()  # the executor disconnected from the cluster it joined
    evals = RunStore.open(run_dir, readonly=True).evaluations()
    print(json.dumps({"reason": reason, "killed": killed, "replaced": engine.executor.replaced,
                      "evals": [[e.candidate_id, e.status, e.worker] for e in evals]}))
    cluster.shutdown()


def node_lost_without_spare_capacity(run_dir: str) -> None:
    """Run in a fresh process: a two-node `ray.cluster_utils.Cluster` (one CPU each), two one-CPU workers; the
    worker node is removed mid-evaluation, so its replacement cannot be placed; a node joins 8 s later. Prints
    what the test checks, as JSON: the run's evaluations and evomerge's own log lines."""
    import json
    import logging
    import subprocess
    import sys
    import threading

    from ray.cluster_utils import Cluster

    from evomerge.run.assemble import open_engine
    from evomerge.config import parse_config
    from evomerge.run.store import RunStore

    here = Path(__file__).resolve().parent
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    worker_node = cluster.add_node(num_cpus=1)
    marker = Path(os.environ["EVOMERGE_TEST_MARKER"])
    env = {"PYTHONPATH": os.pathsep.join([str(here), str(here.parent)]), "RAY_AUTH_MODE": "disabled",
           "EVOMERGE_TEST_MARKER": str(marker), "EVOMERGE_TEST_HEAD": cluster.head_node.node_id, "OMP_NUM_THREADS": "1"}
    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    logging.getLogger("evomerge").addHandler(handler)
    events: list[str] = []
    joined: list[subprocess.Popen] = []

    def lose_then_add() -> None:
        deadline = time.monotonic() + 120
        while not marker.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        if marker.exists():
            cluster.remove_node(worker_node, allow_graceful=False)
            events.append("removed")
            time.sleep(8)  # a node joins as `ray start` joins one (Cluster.add_node fails off the main thread)
            joined.append(subprocess.Popen([str(Path(sys.executable).with_name("ray")), "start", "--address", cluster.address,
                                            "--num-cpus", "1", "--block"], stdout=subprocess.DEVNULL,
                                           stderr=subprocess.DEVNULL, env={**os.environ, **env}))
            events.append("joined")

    threading.Thread(target=lose_then_add, daemon=True).start()
    cfg = {"space": {"bounds": [[0, 1]] * 2}, "optimizer": {"name": "random"},
           "fitness": {"function": "runs_fixtures:hangs_once_off_the_head", "objectives": [{"name": "score"}]},
           "budget": {"evaluations": 100}, "seed": 1,
           "executor": {"kind": "ray", "workers": 2, "cpus_per_worker": 1, "placement_grace": 3,
                        "runtime_env": {"env_vars": env}}}
    engine = open_engine(parse_config(cfg), run_dir, resume=False, address=cluster.address)
    reason = engine.run()
    evals = RunStore.open(run_dir, readonly=True).evaluations()
    print(json.dumps({"reason": reason, "events": events, "lines": lines, "lost_node": marker.read_text(),
                      "evals": [[e.candidate_id, e.status, e.worker] for e in evals]}))
    for p in joined:
        p.terminate()
        p.wait(timeout=60)
    cluster.shutdown()


def node_with_another_checkpoint(run_dir: str) -> None:
    """Run in a fresh process, as root: a two-node Ray cluster on this host whose second node sees another checkpoint
    at the path of source `a` (its `ray start` runs in a mount namespace of its own, where source `b` is bind-mounted
    over `a`); a two-worker run on it. Prints the run's one-line error and that node's id."""
    import json
    import subprocess
    import sys

    import ray
    from ray.cluster_utils import Cluster

    from evomerge.run.assemble import open_engine
    from evomerge.config import parse_config
    from evomerge.records import UserError

    cfg = json.loads(os.environ["EVOMERGE_TEST_CONFIG"])
    here = Path(__file__).resolve().parent
    env = {"PYTHONPATH": os.pathsep.join([str(here), str(here.parent)]), "RAY_AUTH_MODE": "disabled",
           "OMP_NUM_THREADS": "1", "EVOMERGE_CACHE": os.environ["EVOMERGE_CACHE"]}
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    head = cluster.head_node.node_id
    ray_cli = str(Path(sys.executable).with_name("ray"))
    other = subprocess.Popen(
        ["unshare", "-m", "--propagation", "private", "sh", "-c",
         f"mount --bind {cfg['sources']['b']} {cfg['sources']['a']} && exec {ray_cli} start --address={cluster.address} "
         "--num-cpus=1 --block --disable-usage-stats"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        ray.init(address=cluster.address, log_to_driver=False)
        deadline = time.monotonic() + 120
        while len([n for n in ray.nodes() if n["Alive"]]) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        node = next(n["NodeID"] for n in ray.nodes() if n["Alive"] and n["NodeID"] != head)
        cfg["executor"] = {"kind": "ray", "workers": 2, "cpus_per_worker": 1, "runtime_env": {"env_vars": env}}
        try:
            open_engine(parse_config(cfg), run_dir, resume=False)  # joins the Ray this process is connected to
            error = None
        except UserError as e:
            error = str(e)
        print(json.dumps({"error": error, "node": node, "created": Path(run_dir).exists()}))
    finally:
        ray.shutdown()
        other.terminate()
        other.wait(30)
        cluster.shutdown()


# What a user does in notebooks/pareto_explorer.ipynb's widgets, as code: a click on the front's last point, a
# choice in the dropdown, the export button. Appended to the notebook by the tests that execute it.
EXPLORER_CLICKS = '''
from plotly.callbacks import Points
trace = explorer.front.data[1]  # the Pareto front's trace
k = len(trace.x) - 1
trace._dispatch_on_click(Points(point_inds=[k], xs=[trace.x[k]], ys=[trace.y[k]], trace_name=trace.name,
                                trace_index=1), None)
print("clicked", int(trace.customdata[k]), "selected", explorer.selected)
print("heatmap rows", list(explorer.heatmap.data[0].y))
print("recipe", explorer.recipe.value)
print("scores", explorer.scores.value)
last = explorer.picker.options[-1][1]
explorer.picker.value = last
print("picked", last, "selected", explorer.selected)
explorer.export_button.click()
print("export", explorer.export_status.value)
'''


def execute_explorer(run_dir: Path, export_to: Path, workdir: Path):
    """notebooks/pareto_explorer.ipynb executed by nbclient on `run_dir`, with EXPLORER_CLICKS appended;
    returns the executed notebook and the text its cells printed."""
    import nbclient
    import nbformat

    root = Path(__file__).resolve().parent.parent
    nb = nbformat.read(root / "notebooks" / "pareto_explorer.ipynb", as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell(EXPLORER_CLICKS))
    env = {"EVOMERGE_RUN": str(run_dir), "EVOMERGE_EXPORT": str(export_to),
           "PYTHONPATH": os.pathsep.join([str(root / "tests"), str(root)])}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                resources={"metadata": {"path": str(workdir)}}).execute()
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    errors = [o for o in outputs if o.get("output_type") == "error"]
    assert not errors, errors[0].get("traceback", errors)[-3:]
    return nb, "".join(o.get("text", "") for o in outputs)


def box_table(genome) -> dict[str, dict[str, float]]:
    """A held-out table of the user's own (holdout.function): the best genome against the box's centre."""
    return {"centre": {"score": -sum((0.5 - 0.3) ** 2 for _ in genome.x)},
            "evolved best": {"score": -sum((v - 0.3) ** 2 for v in genome.x)}}


def _thresholds(n: int):
    """Fixed uniforms, one per example: example j is right for a genome whose 'skill' exceeds u_j."""
    import numpy as np

    return np.random.default_rng(1234).random(n)


def skill_examples(handle, examples=None):
    """Per-example fitness with a known answer: 400 examples, example j right iff u_j < skill, skill = the
    mean of the genome, so the full-dev accuracy is monotone in it. Takes `examples` (racing, subsets)."""
    from evomerge.fitness.base import FitnessResult

    u = _thresholds(400)
    idx = range(400) if examples is None else examples
    skill = sum(handle.x) / len(handle.x)
    right = [float(u[j] < skill) for j in idx]
    return FitnessResult(objectives={"acc": sum(right) / len(right)}, per_example=right)


def logged_skill_examples(handle, examples=None):
    """`skill_examples`, logging the candidate id to $EVOMERGE_TEST_CALLS and sleeping like `logged_sphere`."""
    with open(os.environ["EVOMERGE_TEST_CALLS"], "a") as f:
        f.write(f"{handle.candidate_id}\n")
    time.sleep(float(os.environ.get("EVOMERGE_TEST_SLEEP", "0.0")))
    return skill_examples(handle, examples)


def sphere_with_tokens(handle):
    """The sphere, costing 10 prompt and 5 completion tokens an evaluation (as an API fitness reports them)."""
    from evomerge.fitness.base import FitnessResult

    return FitnessResult(objectives=sphere(handle), cost={"prompt_tokens": 10.0, "completion_tokens": 5.0})


def committed(run_dir: Path) -> int:
    """Evaluations committed to a run's store so far, read from outside the run's process (0 before it exists)."""
    import sqlite3

    from evomerge.run.store import STORE_FILE

    try:
        con = sqlite3.connect(f"file:{run_dir / STORE_FILE}?mode=ro", uri=True, timeout=5)
        try:
            return con.execute("SELECT COUNT(*) FROM evaluations").fetchone()[0]
        finally:
            con.close()
    except sqlite3.OperationalError:  # not created yet
        return 0


def reads_a_missing_file(handle) -> dict[str, float]:
    """A user's fitness broken from the start: every evaluation raises the same error."""
    with open("no-such-dev.jsonl") as f:
        return {"score": float(len(f.read()))}
