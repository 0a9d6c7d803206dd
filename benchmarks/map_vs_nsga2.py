"""MAP against NSGA-II at equal evaluations, on the shipped zoo's two-objective problem (issue 28).

    python benchmarks/map_vs_nsga2.py                                  # 300 evaluations, seeds 0 1 2
    python benchmarks/map_vs_nsga2.py --evaluations 50 --seeds 0       # a quick version

Both search runs/demo_pareto.yaml's problem (math in J and LANG's J instructions, teacher-forced exact match on
the dev splits, both maximised) in one small space, the same for both: layer_weights, TIES, one weight and one
density per expert for the whole model (granularity 0: 4 dimensions, so MAP's quadratic has 15 coefficients).
Each (optimizer, seed) is one `evomerge run` of the largest budget in WORK/<optimizer>/seed<N> (a killed
benchmark resumes it, a finished one is read back). At each checkpoint N (50, 100, 300) the dev front of the
first N evaluations is scored on the held-out test splits; the artifact reports the hypervolume of the
held-out front (the non-dominated held-out scores of those candidates) with reference point (0, 0), the
worst possible accuracy on both tasks, so the hypervolume is in [0, 1].
Writes benchmarks/results/map_vs_nsga2.json (with `complete: false` and what ran, if some runs are missing)
and prints the README's table (`markdown`; tests/test_readme_figures.py keeps them equal).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]
import memstat  # noqa: E402

ZOO = ROOT / "evomerge" / "zoo"
TASKS = ("math_j", "lang_j")
REF = [0.0, 0.0]
SPACE = {"name": "layer_weights", "options": {"method": "ties", "granularity": 0, "normalize": False, "weight_max": 1.5}}
OPTIMIZERS = {"map": {"name": "map", "options": {"batch": 10}}, "nsga2": {"name": "nsga2", "options": {"popsize": 10}}}


def tasks(split: str, limit: int | None) -> list[dict]:
    return [{"name": t, "path": str(ZOO / "data" / f"{t}_{split}.jsonl"), "metrics": ["teacher_exact"],
             **({"limit": limit} if limit else {})} for t in TASKS]


def config(optimizer: str, evaluations: int, seed: int, limit: int | None) -> dict:
    return {"sources": {k: str(ZOO / "models" / k) for k in ("base", "math", "lang")}, "base": "base",
            "space": SPACE, "optimizer": OPTIMIZERS[optimizer],
            "fitness": {"handle": {"batch_size": 200}, "tasks": tasks("dev", limit)},
            "budget": {"evaluations": evaluations, "wall_time": "24h"}, "seed": seed}


def search(run_dir: Path, cfg: dict) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir.parent / f"{run_dir.name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    command = ["resume", str(run_dir)] if (run_dir / "run.sqlite").is_file() else ["run", str(path), "--run-dir", str(run_dir)]
    done = subprocess.run([sys.executable, "-m", "evomerge.cli", *command, "-q"], cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{run_dir} failed:\n{done.stderr[-3000:]}")


def heldout_fronts(run_dir: Path, checkpoints: list[int], limit: int | None) -> dict:
    """Per checkpoint N: the dev front of the first N evaluations, its held-out scores, and their hypervolume."""
    from evomerge.run.assemble import build_handle
    from evomerge.config import parse_config
    from evomerge.fitness.suite import TaskFitness
    from evomerge.optimizers.pareto import hypervolume, nondominated
    from evomerge.results.journal import open_run

    run = open_run(run_dir)
    try:
        cfg = parse_config(run.config)
        names = [o.name for o in run.objectives]
        evals = [e for e in run.evaluations() if e.ok]
        done = len(run.evaluations())
        recipes = {}
        out = {}
        for n in checkpoints:
            first = [e for e in evals if e.candidate_id < n]
            dev = np.array([[e.objectives[k] for k in names] for e in first])
            front = [first[i].candidate_id for i in np.flatnonzero(nondominated(dev))]
            out[n] = {"front_ids": front, "dev_front": dev[nondominated(dev)].tolist()}
            recipes.update({i: run.recipe(i) for i in front})
    finally:
        run.close()
    fitness = TaskFitness.from_config(tasks("test", limit), base_dir=cfg.workdir)
    handle = build_handle(cfg)
    scores = {}
    for i, recipe in sorted(recipes.items()):
        handle.set_recipe(recipe)
        objs = fitness.evaluate(handle).objectives
        scores[i] = [float(objs[k]) for k in names]
    for n, row in out.items():
        held = np.array([scores[i] for i in row["front_ids"]])
        row["heldout_front"] = held[nondominated(held)].tolist()
        row["heldout_hypervolume"] = hypervolume(held, np.array(REF))
    return {"evaluations_done": done, "objectives": names, "checkpoints": {str(n): r for n, r in out.items()}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--evaluations", type=int, default=300)
    p.add_argument("--checkpoints", type=int, nargs="+", default=[50, 100, 300])
    p.add_argument("--limit", type=int, help="problems per task (a quick check)")
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "map_vs_nsga2")
    p.add_argument("--out", type=Path, default=RESULTS / "map_vs_nsga2.json")
    args = p.parse_args()
    checkpoints = [n for n in args.checkpoints if n <= args.evaluations]
    t0 = time.perf_counter()
    runs = {}
    for seed in args.seeds:
        for name in OPTIMIZERS:
            run_dir = args.work.resolve() / name / f"seed{seed}"
            search(run_dir, config(name, args.evaluations, seed, args.limit))
            runs.setdefault(name, {})[str(seed)] = heldout_fronts(run_dir, checkpoints, args.limit)
            write(args, checkpoints, runs, t0)
    print(markdown(json.loads(args.out.read_text())))


def write(args, checkpoints, runs, t0) -> None:
    summary = {name: {str(n): {"mean": float(np.mean(h)), "min": min(h), "max": max(h), "seeds": len(h)}
                      for n in checkpoints
                      if (h := [r["checkpoints"][str(n)]["heldout_hypervolume"] for r in per_seed.values()])}
               for name, per_seed in runs.items()}
    complete = all(len(runs.get(name, {})) == len(args.seeds) for name in OPTIMIZERS)
    result = {"benchmark": "map_vs_nsga2", "complete": complete, "command": " ".join(["python", *sys.argv]),
              "space": SPACE, "optimizers": OPTIMIZERS, "tasks": list(TASKS), "reference_point": REF,
              "evaluations": args.evaluations, "checkpoints": checkpoints, "seeds": args.seeds, "limit": args.limit,
              "summary": summary, "runs": runs, "seconds": round(time.perf_counter() - t0, 1),
              "machine": memstat.machine(), "versions": memstat.versions(ROOT)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


def markdown(result: dict) -> str:
    """The held-out hypervolume per optimizer at each checkpoint: mean [min-max] over the seeds."""
    marks = [str(n) for n in result["checkpoints"]]
    lines = ["| held-out hypervolume | " + " | ".join(f"{n} evaluations" for n in marks) + " |",
             "|---" * (len(marks) + 1) + "|"]
    for name, row in result["summary"].items():
        cells = [f"{row[n]['mean']:.3f} [{row[n]['min']:.3f}-{row[n]['max']:.3f}]" for n in marks]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    seeds = ", ".join(str(s) for s in result["seeds"])
    lines.append(f"\nSeeds {seeds}; {result['seconds'] / 60:.0f} min on {result['machine']['cpus']} CPU cores "
                 f"(`{result['command']}`).")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
