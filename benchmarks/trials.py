"""Design trials of the demo's search: variants of runs/demo.yaml (its optimizer, its fitness's metrics, its space's
options) searched for 100 evaluations on search seeds 0 1 2, without comparison rows, each seed's best so far
scored on the held-out problems. What chose the demo's search (the zoo card's "Choosing the search").

    python benchmarks/trials.py [--jobs 2] [--work runs/trials]

Each trial seed is `evomerge run` in WORK/<trial>/seedN (resumed when killed, read back when done), as
benchmarks/headline.py runs a seed. A Gaussian-process search is deterministic per seed (on one CPU model), so a trial's first 100
evaluations are those of a longer run of the same config. Writes benchmarks/results/trials.json: per trial its
overrides and per seed the held-out J math of the best so far at 50 and 100 evaluations; prints the table the
card shows (tests/test_readme_figures.py keeps them equal).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]
import memstat  # noqa: E402
from curves import at, curve, scorer  # noqa: E402
from headline import RESULTS, RUNS, run_seed, seed_config  # noqa: E402

BUDGET, SEEDS, MARKS, COLUMN = 100, [0, 1, 2], [50, 100], "acc_tf/math_j"


def gp(startup: int) -> dict:
    return {"name": "optuna", "options": {"sampler": "gp", "sampler_options": {"n_startup_trials": startup}}}


TOK, PROB, DEFAULT = ["token_accuracy"], ["gold_prob"], ["gold_prob", "token_accuracy"]


def floor(low: float) -> dict:
    return {"metrics": DEFAULT, "space": {"density_range": [low, 1.0]}}


# id -> (what it tries, overrides of runs/demo.yaml: metrics of its task, optimizer, space options). The base is the
# demo with the space's own density floor (10%), under which the trials before the floor's were measured.
TRIALS = {
    "tok-exact": ("token accuracy and exact match (the first default)", {"metrics": ["token_accuracy", "teacher_exact"]}),
    "tok": ("token accuracy alone", {"metrics": TOK}),
    "tok-startup3": ("token accuracy alone, two random draws", {"metrics": TOK, "optimizer": gp(3)}),
    "tok-startup10": ("token accuracy alone, nine random draws", {"metrics": TOK, "optimizer": gp(10)}),
    "tok-knots3": ("token accuracy alone, three knots over depth (36 dimensions)", {"metrics": TOK, "space": {"knots": 3}}),
    "tok-layers2": ("token accuracy alone, groups of two layers (36 dimensions)", {"metrics": TOK, "space": {"granularity": 2}}),
    "tok-nomodules": ("token accuracy alone, one value per layer (24 dimensions)", {"metrics": TOK, "space": {"modules": []}}),
    "loss": ("the answer's loss alone", {"metrics": ["loss"]}),
    "prob": ("the answer's probability alone", {"metrics": PROB}),
    "prob-startup10": ("the answer's probability alone, nine random draws", {"metrics": PROB, "optimizer": gp(10)}),
    "prob-tok": ("the answer's probability and token accuracy, densities from 10% (the default before)", {"metrics": DEFAULT}),
    "floor-0.05": ("probability and token accuracy, densities from 5%", floor(0.05)),
    "floor-0.02": ("probability and token accuracy, densities from 2% (the default)", floor(0.02)),
    "floor-0.01": ("probability and token accuracy, densities from 1%", floor(0.01)),
    "floor-0": ("probability and token accuracy, densities from 0", floor(0.0)),
}


def trial_config(work: Path, overrides: dict) -> Path:
    work.mkdir(parents=True, exist_ok=True)
    path = seed_config("demo", work, zoo=None, evaluations=BUDGET, limit=None)
    cfg = yaml.safe_load(path.read_text())
    cfg["holdout"]["compare"] = {}
    cfg["fitness"]["tasks"][0]["metrics"] = overrides["metrics"]
    cfg["optimizer"] = overrides.get("optimizer", cfg["optimizer"])
    cfg["space"]["options"].pop("density_range", None)
    cfg["space"]["options"].update(overrides.get("space", {}))
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def scored(run_dir: Path, score) -> dict:
    points, done = curve(run_dir, score)
    return {"seed": int(run_dir.name[4:]), "evaluations": done, **{str(n): at(points, n, COLUMN) for n in MARKS}}


def markdown(result: dict) -> str:
    fmt = lambda v: "" if v is None else f"{100 * v:.1f}"  # noqa: E731
    lines = [f"Held-out J math % of the best so far after {result['budget']} evaluations (after 50 in brackets), "
             f"search seeds {', '.join(map(str, result['seeds']))} (`benchmarks/trials.py` → "
             "`benchmarks/results/trials.json`):", "",
             "| search | " + " | ".join(f"seed {s}" for s in result["seeds"]) + " | mean |", "|---" * (len(result["seeds"]) + 2) + "|"]
    for t in result["trials"]:
        cells = [f"{fmt(s[str(result['budget'])])} ({fmt(s['50'])})" for s in t["per_seed"]]
        lines.append(f"| {t['what']} | " + " | ".join(cells) + f" | {fmt(t['mean'])} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--jobs", type=int, default=1, help="trial seeds run at once")
    p.add_argument("--work", type=Path, default=RUNS / "trials")
    args = p.parse_args()
    import torch
    from evomerge.quiet import own_output

    torch.set_num_threads(1)  # as the searches ran
    t0 = time.perf_counter()
    configs = {t: trial_config(args.work.resolve() / t, overrides) for t, (_, overrides) in TRIALS.items()}
    jobs = [(t, s) for t in TRIALS for s in SEEDS]
    with ThreadPoolExecutor(args.jobs) as pool:  # each search is a subprocess
        list(pool.map(lambda j: run_seed(configs[j[0]], configs[j[0]].parent / f"seed{j[1]}", j[1]), jobs))
    with own_output():  # every trial scores held out on the same tasks and sources: one handle for all
        score = scorer(configs[jobs[0][0]].parent / f"seed{jobs[0][1]}")
        done = {(t, s): scored(configs[t].parent / f"seed{s}", score) for t, s in jobs}
    trials = []
    for t, (what, overrides) in TRIALS.items():
        per_seed = [done[(t, s)] for s in SEEDS]
        trials.append({"id": t, "what": what, "overrides": overrides, "per_seed": per_seed,
                       "mean": sum(s[str(BUDGET)] for s in per_seed) / len(per_seed)})
    result = {"benchmark": "trials", "claim": "demo", "budget": BUDGET, "seeds": SEEDS, "column": COLUMN,
              "trials": trials, "seconds": round(time.perf_counter() - t0, 1),
              "machine": memstat.machine(), "versions": memstat.versions(ROOT)}
    (RESULTS / "trials.json").write_text(json.dumps(result, indent=2) + "\n")
    print(markdown(result))


if __name__ == "__main__":
    main()
