"""Cluster scaling on a real multi-node Ray cluster on this host (ray.cluster_utils.Cluster: a head with no CPU
for work, and worker nodes of 1 CPU each, each its own raylet): evaluations per minute of the steady-state
engine with 1, 2 and 3 nodes (one worker per node, a fitness of fixed latency: a sleep) against one node's rate;
then the cost of losing a node mid-run: 2 workers on 3 nodes, the node of one worker killed once a third of the
budget is done (its candidate retried on the spare node), in worker-seconds over the same run without the loss.
Writes benchmarks/results/cluster_scaling.json and prints it.

    python benchmarks/cluster_scaling.py [--latency 1.0] [--per-node 8]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("OMP_NUM_THREADS", "1")
from executor_scaling import sleep_config  # noqa: E402


def sleep_fitness(handle) -> dict[str, float]:
    if os.environ.get("BENCH_MARKS"):  # which nodes host a worker, for the node-loss run to pick one
        import ray

        Path(os.environ["BENCH_MARKS"], ray.get_runtime_context().get_node_id()).touch()
    time.sleep(float(os.environ["BENCH_LATENCY"]))
    return {"score": -sum((v - 0.3) ** 2 for v in handle.x)}


def _config(workers: int, evaluations: int) -> dict:
    return sleep_config("cluster_scaling:sleep_fitness", workers, evaluations, 1)


def _committed(run_dir: Path) -> int:
    try:
        con = sqlite3.connect(f"file:{run_dir / 'run.sqlite'}?mode=ro", uri=True, timeout=5)
        try:
            return con.execute("SELECT COUNT(*) FROM evaluations").fetchone()[0]
        finally:
            con.close()
    except sqlite3.Error:
        return 0


def _window(run_dir: Path) -> float:
    """Seconds from the first ask to the last finished evaluation (actor start-up excluded)."""
    con = sqlite3.connect(run_dir / "run.sqlite")
    first = con.execute("SELECT MIN(asked_at) FROM candidates").fetchone()[0]
    last = con.execute("SELECT MAX(finished_at) FROM evaluations").fetchone()[0]
    con.close()
    return last - first


def _run(address: str, workers: int, evaluations: int, run_dir: Path, on_progress=None) -> float:
    from evomerge.run.assemble import open_engine
    from evomerge.config import parse_config

    engine = open_engine(parse_config(_config(workers, evaluations)), run_dir, resume=False, address=address)
    try:
        assert engine.run() == "budget: evaluations"
    finally:
        engine.store.close()
    assert _committed(run_dir) == evaluations
    return _window(run_dir)


def _cluster(nodes: int, env: dict):
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    workers = [cluster.add_node(num_cpus=1) for _ in range(nodes)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False, runtime_env={"env_vars": env})
    return cluster, workers


def _teardown(cluster) -> None:
    import ray

    ray.shutdown()
    cluster.shutdown()


def _kill_a_worker_node(cluster, nodes, run_dir: Path, after: int, done: list) -> None:
    """Once `after` evaluations are committed, remove a node that hosts a live evomerge worker."""
    while _committed(run_dir) < after:
        time.sleep(0.05)
    hosting = {p.name for p in Path(os.environ["BENCH_MARKS"]).iterdir()}
    victim = next(n for n in nodes if n.node_id in hosting)
    cluster.remove_node(victim)
    done.append(time.time())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--latency", type=float, default=1.0)
    ap.add_argument("--per-node", type=int, default=8, help="evaluations per node")
    ap.add_argument("--nodes", type=int, nargs="+", default=[1, 2, 3])
    args = ap.parse_args()
    os.environ["BENCH_LATENCY"] = str(args.latency)
    env = {k: os.environ[k] for k in ("BENCH_LATENCY", "RAY_AUTH_MODE", "OMP_NUM_THREADS")}
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), str(HERE.parent)])

    out: dict = {"latency_s": args.latency, "per_node": args.per_node, "machine_cores": os.cpu_count(),
                 "note": f"every node is a raylet on this {os.cpu_count()}-core host: beyond {os.cpu_count()} nodes they "
                         "contend for cores (the fitness sleeps, so the contention is Ray's and evomerge's own work)",
                 "nodes": {}}
    with tempfile.TemporaryDirectory() as tmp:
        base = None
        for n in args.nodes:
            cluster, _ = _cluster(n, env)
            try:
                window = _run(cluster.address, n, n * args.per_node, Path(tmp) / f"n{n}")
            finally:
                _teardown(cluster)
            rate = 60 * n * args.per_node / window
            base = base or rate / n  # one node's rate (the first run's, per node)
            out["nodes"][n] = {"evals_per_min": round(rate, 1), "ideal": round(60 * n / args.latency, 1),
                               "over_one_node": round(rate / base, 3)}
            print(json.dumps({"nodes": n, **out["nodes"][n]}), file=sys.stderr)

        # a node lost mid-run: 2 workers on 3 nodes, the third is the spare the lost worker comes back on
        evaluations = 3 * args.per_node
        env["BENCH_MARKS"] = os.environ["BENCH_MARKS"] = str(Path(tmp) / "marks")
        windows = {}
        for lose in (False, True):
            cluster, nodes = _cluster(3, env)
            shutil.rmtree(env["BENCH_MARKS"], ignore_errors=True)
            run_dir, killed = Path(tmp) / f"loss-{lose}", []
            Path(env["BENCH_MARKS"]).mkdir(exist_ok=True)
            killer = threading.Thread(target=_kill_a_worker_node, args=(cluster, nodes, run_dir, evaluations // 3, killed),
                                      daemon=True) if lose else None
            try:
                if killer:
                    killer.start()
                windows[lose] = _run(cluster.address, 2, evaluations, run_dir)
            finally:
                _teardown(cluster)
            assert not lose or killed, "the node was not killed before the run finished"
        lost = 2 * (windows[True] - windows[False])  # worker-seconds the same budget took beyond the run without loss
        out["node_loss"] = {"workers": 2, "nodes": 3, "evaluations": evaluations, "killed_after": evaluations // 3,
                            "window_s_without_loss": round(windows[False], 2), "window_s_with_loss": round(windows[True], 2),
                            "worker_seconds_lost": round(lost, 2), "evaluations_lost": round(lost / args.latency, 2)}
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "cluster_scaling.json").write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
