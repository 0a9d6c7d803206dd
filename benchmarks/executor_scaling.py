"""Executor scaling on a real local Ray: throughput of the steady-state engine over 1, 2, 4 and 8 CPU-only
actors with a fitness of fixed latency (a sleep), as a fraction of ideal (workers / latency); then, with
latencies that vary, the steady state against a generational loop (what mergekit-evolve does: submit a
generation, wait for all of it) on the same actors. Prints JSON.

    python benchmarks/executor_scaling.py [--latency 0.2] [--per-worker 12] [--workers 1 2 4 8]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("OMP_NUM_THREADS", "1")


def latency_of(candidate_id: int) -> float:
    """Seconds to 'score' a candidate: fixed, or log-normal around the mean when $BENCH_SPREAD > 0."""
    mean, spread = float(os.environ["BENCH_LATENCY"]), float(os.environ.get("BENCH_SPREAD", "0"))
    if spread == 0:
        return mean
    z = random.Random(candidate_id).gauss(0, spread)
    return mean * math.exp(z - spread * spread / 2)  # mean-preserving


def sleep_fitness(handle) -> dict[str, float]:
    time.sleep(latency_of(handle.candidate_id))
    return {"score": -sum((v - 0.3) ** 2 for v in handle.x)}


def sleep_config(function: str, workers: int, evaluations: int, cpus_per_worker: float) -> dict:
    """A random search of a 4-d box on Ray whose fitness `function` sleeps (this benchmark's, and the cluster one's)."""
    return {
        "space": {"bounds": [[0, 1]] * 4},
        "optimizer": {"name": "random"},
        "fitness": {"function": function, "objectives": [{"name": "score"}]},
        "budget": {"evaluations": evaluations},
        "executor": {"kind": "ray", "workers": workers, "cpus_per_worker": cpus_per_worker},
        "seed": 0,
    }


def _config(workers: int, evaluations: int) -> dict:
    return sleep_config("executor_scaling:sleep_fitness", workers, evaluations, 0.25)


def _window(run_dir: Path) -> float:
    """Seconds from the first ask to the last finished evaluation (actor start-up excluded)."""
    import sqlite3

    con = sqlite3.connect(run_dir / "run.sqlite")
    first = con.execute("SELECT MIN(asked_at) FROM candidates").fetchone()[0]
    last = con.execute("SELECT MAX(finished_at) FROM evaluations").fetchone()[0]
    con.close()
    return last - first


def steady_state(workers: int, evaluations: int, tmp: Path) -> float:
    """Evaluations per second of the engine (steady state, streaming to free actors)."""
    from evomerge.run.assemble import open_engine
    from evomerge.config import parse_config

    run_dir = tmp / f"steady-{workers}-{time.monotonic_ns()}"
    engine = open_engine(parse_config(_config(workers, evaluations)), run_dir, resume=False)
    assert engine.run() == "budget: evaluations"
    engine.store.close()
    return evaluations / _window(run_dir)


def generational(workers: int, evaluations: int) -> float:
    """Evaluations per second of a generation-barrier loop on the same executor: submit one generation
    (one candidate per actor), wait for all of it, repeat."""
    from evomerge.run.assemble import WorkerFactory
    from evomerge.config import parse_config
    from evomerge.run.executors import RayExecutor
    from evomerge.records import Candidate

    ex = RayExecutor(WorkerFactory(parse_config(_config(workers, evaluations)).to_dict()), workers=workers,
                     cpus_per_worker=0.25)
    ex.start()
    rng = random.Random(0)
    start, cid = time.monotonic(), 0
    try:
        while cid < evaluations:
            gen = min(workers, evaluations - cid)
            for _ in range(gen):
                ex.submit(Candidate(cid, [rng.random() for _ in range(4)]))
                cid += 1
            got = 0
            while got < gen:
                got += len(ex.wait())
        return evaluations / (time.monotonic() - start)
    finally:
        ex.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--latency", type=float, default=0.2)
    ap.add_argument("--per-worker", type=int, default=12, help="evaluations per worker")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--spread", type=float, default=0.6, help="log-normal sigma of the varying latencies")
    args = ap.parse_args()
    os.environ["BENCH_LATENCY"] = str(args.latency)

    import ray

    env = {k: os.environ[k] for k in ("BENCH_LATENCY", "RAY_AUTH_MODE", "OMP_NUM_THREADS")}
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), str(HERE.parent)])
    env["BENCH_SPREAD"] = "0"
    out: dict = {"latency_s": args.latency, "per_worker": args.per_worker, "fixed_latency": {}, "varying_latency": {}}
    with tempfile.TemporaryDirectory() as tmp:
        ray.init(num_cpus=max(args.workers), include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": env})
        for w in args.workers:
            rate = steady_state(w, w * args.per_worker, Path(tmp))
            ideal = w / args.latency
            out["fixed_latency"][w] = {"evals_per_s": round(rate, 3), "ideal": round(ideal, 3),
                                       "fraction_of_ideal": round(rate / ideal, 3)}
            print(json.dumps({"workers": w, **out["fixed_latency"][w]}), file=sys.stderr)
        ray.shutdown()
        # varying latencies: the generation barrier waits for each generation's slowest member
        env["BENCH_SPREAD"] = os.environ["BENCH_SPREAD"] = str(args.spread)
        ray.init(num_cpus=max(args.workers), include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": env})
        w = max(args.workers)
        steady = steady_state(w, w * args.per_worker, Path(tmp))
        gen = generational(w, w * args.per_worker)
        out["varying_latency"] = {"workers": w, "lognormal_sigma": args.spread, "steady_evals_per_s": round(steady, 3),
                                  "generational_evals_per_s": round(gen, 3), "steady_over_generational": round(steady / gen, 3),
                                  "ideal": round(w / args.latency, 3)}
        ray.shutdown()
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
