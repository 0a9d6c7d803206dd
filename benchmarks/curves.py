"""Learning curves of a headline benchmark's searches: the held-out score of the best so far against evaluations
and against examples scored, for every search of every seed (the evolved run and each `compare` row).

    python benchmarks/curves.py --claim real --jobs 2   # after `headline.py --claim real`: its runs, read back
    python benchmarks/curves.py --jobs 2                # the demo's (runs/headline/headline)
    python benchmarks/curves.py --zoo runs/zoo_seed1

The best so far is each run's own best (its config's `best`: the first objective, or the front's knee) after each
evaluation (evomerge.results.journal.Run.best_history); each distinct one is scored once on the run's held-out tasks
through one model handle, so a curve costs a held-out scoring per change of the best, not per evaluation.
Writes benchmarks/results/curves_<headline artifact>.json: per run its points (evaluations, examples scored,
candidate, held-out values), and per row and column the mean over seeds at each evaluation count.

Sample efficiency (the demo's claims): each seed's evolved search is run again with CMA-ES (the demo's search before
the Bayesian default, same budget and seed; in SEED/compare/<baseline>, resumed or read back like any comparison),
with the run's fitness and space, and with token accuracy first both in the space before (densities from 10%) and in
the run's (what helps the default may hurt CMA-ES: token accuracy first and the floor before give CMA-ES its
highest held-out scores on the zoo), and the artifact's `sample_efficiency` gives, per baseline and seed, the
held-out score its best reaches at the full budget and the first evaluation count at which the default's best so
far scores at least as much; and the same on the mean curves over the seeds (the README's table).
`--summaries` recomputes those summaries from an artifact's stored curves, with no search.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]
import memstat  # noqa: E402
from headline import CLAIMS, RESULTS, RUNS, artifact_name  # noqa: E402

EVOLVED = "evolved best"
BASELINE_SEARCH = {"optimizer": {"name": "cmaes", "options": {"sigma0": 0.2}}}
# the baselines of the sample-efficiency figure, each searched as a comparison row of its own: name -> the first
# task's metrics (None: the run's) and the space's options it changes
TOKEN_FIRST = ["token_accuracy", "teacher_exact"]
BASELINES = {"CMA-ES": (None, {}), "CMA-ES on token accuracy": (TOKEN_FIRST, {}),
             "CMA-ES on token accuracy, densities from 10%": (TOKEN_FIRST, {"density_range": [0.1, 1.0]})}


def searches(seed_dir: Path) -> dict[str, Path]:
    """The run directories of one seed: the evolved run itself and each compare row's search."""
    from evomerge.results.comparisons import compare_dir

    return {EVOLVED: seed_dir, **{row: compare_dir(seed_dir, row) for row in config(seed_dir).holdout.compare}}


def config(seed_dir: Path):
    from evomerge.config import parse_config
    from evomerge.run.store import RunStore

    with RunStore.open(seed_dir, readonly=True) as store:
        return parse_config(store.config)


def baseline(seed_dir: Path, name: str) -> Path:
    """The seed's evolved search done with CMA-ES instead (searched once, then read back)."""
    from evomerge.config import parse_config
    from evomerge.results.comparisons import run_comparison

    data = config(seed_dir).to_dict()
    metrics, space = BASELINES[name]
    data["holdout"]["compare"] = {name: {**BASELINE_SEARCH, "space": {
        **data["space"], "options": {**data["space"].get("options", {}), **space}}}}
    if metrics is not None:
        data["fitness"]["tasks"][0]["metrics"] = metrics
    return run_comparison(parse_config(data), seed_dir, name)


def reach(points: list[dict], target: float, column: str) -> int | None:
    """The first evaluation count whose best so far scores at least `target` held out (None: never)."""
    return next((p["evaluations"] for p in points if p["heldout"][column] >= target - 1e-9), None)


def efficiency(runs: list[dict], column: str, name: str) -> dict:
    """Per seed, the baseline's held-out score at its budget and the evaluations the default needs to reach it; and
    the same on the mean over the seeds (the mean curves of the README's table)."""
    per_seed = []
    for r in runs:
        if r["row"] != name:
            continue
        mine = next(x for x in runs if x["seed"] == r["seed"] and x["row"] == EVOLVED)
        target = at(r["points"], r["evaluations"], column)
        per_seed.append({"seed": r["seed"], "baseline_at_budget": target, "baseline_budget": r["evaluations"],
                         "evaluations_to_reach": reach(mine["points"], target, column)})
    needed = [s["evaluations_to_reach"] for s in per_seed]
    metrics, space = BASELINES[name]
    target = sum(s["baseline_at_budget"] for s in per_seed) / len(per_seed)
    evolved = [r for r in runs if r["row"] == EVOLVED]
    budget = min(r["evaluations"] for r in evolved)
    mean_reach = next((n for n in range(1, budget + 1) if (v := mean_at(evolved, n, column)) is not None
                       and v >= target - 1e-9), None)
    return {"baseline": name, "search": BASELINE_SEARCH, "metrics": metrics, "space_options": space, "column": column,
            "per_seed": per_seed, "most": None if None in needed else max(needed),
            "mean": {"baseline_at_budget": target, "evaluations_to_reach": mean_reach}}


def curve(run_dir: Path, score) -> tuple[list[dict], int]:
    """One point per change of the run's best: when it changed (evaluations, examples scored) and its held-out
    values; and the run's evaluations."""
    from evomerge import open_run

    run = open_run(run_dir)
    try:
        history, examples = run.best_history(), run.examples_so_far()
        points, last = [], None
        for n, cid in enumerate(history, start=1):
            if cid is not None and cid != last:
                points.append({"evaluations": n, "examples": examples[n - 1], "candidate": cid,
                               "heldout": score(run.recipe(cid))})
                last = cid
        return points, len(history)
    finally:
        run.close()


def scorer(seed_dir: Path):
    """Held-out scoring of a recipe through the run's own handle and holdout tasks (as holdout.py scores rows)."""
    from evomerge.run.assemble import build_handle
    from evomerge.fitness.suite import TaskFitness

    cfg = config(seed_dir)
    fitness = TaskFitness.from_config(cfg.holdout.tasks, base_dir=cfg.workdir)
    handle = build_handle(cfg)

    def score(recipe) -> dict[str, float]:
        handle.set_recipe(recipe)
        return dict(fitness.evaluate(handle).objectives)

    return score


def at(points: list[dict], n: int, column: str) -> float | None:
    """The held-out value of the best so far after n evaluations (None before the first success)."""
    known = [p for p in points if p["evaluations"] <= n]
    return known[-1]["heldout"][column] if known else None


def mean_at(runs: list[dict], n: int, column: str) -> float | None:
    """The mean over `runs` (one row's seeds) of the best so far's held-out value after n evaluations."""
    v = [x for r in runs if (x := at(r["points"], n, column)) is not None]
    return sum(v) / len(v) if v else None


def markdown(result: dict) -> str:
    """The curves' means as a table (held-out % of the best so far per evaluation count, one row per search) on the
    target column, or on each expert's column for a claim of several skills, and the sample-efficiency line when the
    artifact has one."""
    claim, marks = CLAIMS[result["claim"]], result["marks"]
    seeds = sorted({r["seed"] for r in result["runs"]})
    lines = []
    for column in claim.get("experts") or result["columns"][:1]:
        lines += [""] * bool(lines) + [
            f"Held-out {claim['columns'][column]} % of each search's best so far, mean over search seeds "
            f"{', '.join(map(str, seeds))} (`benchmarks/curves.py` → `benchmarks/results/curves_{result['headline']}.json`):",
            "", "| search | " + " | ".join(f"{n} evaluations" if n == marks[0] else str(n) for n in marks) + " |",
            "|---" * (len(marks) + 1) + "|"]
        for row, cols in result["mean"].items():
            cells = ["" if cols[column][str(n)] is None else f"{100 * cols[column][str(n)]:.1f}" for n in marks]
            lines.append(f"| {row} | " + " | ".join(cells) + " |")
    for eff in result.get("sample_efficiency") or ():
        per = eff["per_seed"]
        reached = ", ".join(f"{'never' if s['evaluations_to_reach'] is None else s['evaluations_to_reach']} "
                            f"(seed {s['seed']}: {100 * s['baseline_at_budget']:.1f})" for s in per)
        lines += ["", f"Evaluations the evolved search needs to reach the held-out score {eff['baseline']} reaches at "
                      f"{per[0]['baseline_budget']}: {reached}; "
                      + ("never on some seed." if eff["most"] is None else f"at most {eff['most']}.")
                  + f" On the mean over the seeds ({100 * eff['mean']['baseline_at_budget']:.1f} at "
                    f"{per[0]['baseline_budget']}): "
                  + ("never." if eff["mean"]["evaluations_to_reach"] is None else f"{eff['mean']['evaluations_to_reach']}.")]
    return "\n".join(lines)


def measure(claim: str, seed_dir: Path) -> list[dict]:
    """Every search's curve of one seed (CMA-ES searched first where the claim measures sample efficiency), in a
    process of its own with one torch thread, as headline.py's searches ran: a score's sums, and so a tie, move
    with the thread count."""
    import torch
    from evomerge.quiet import own_output

    torch.set_num_threads(1)
    runs = []
    with own_output():  # no "Loading weights" bar per handle
        score = scorer(seed_dir)
        rows = searches(seed_dir)
        if CLAIMS[claim].get("efficiency"):
            rows.update({name: baseline(seed_dir, name) for name in BASELINES})
        for row, run_dir in rows.items():
            points, done = curve(run_dir, score)
            runs.append({"seed": int(seed_dir.name[4:]), "row": row, "evaluations": done, "points": points})
            print(f"seed {runs[-1]['seed']} {row}: {len(runs[-1]['points'])} bests scored", flush=True)
    return runs


def summaries(claim: str, runs: list[dict]) -> dict:
    """What an artifact derives from its curves: the evaluation counts of the table, each row's mean over seeds at
    each, and (the demo's claims) the sample efficiency."""
    columns = list(CLAIMS[claim]["columns"])
    budget = max(r["evaluations"] for r in runs)
    marks = sorted({n for n in (10, 20, 30, 50, 100, 200, 300) if n <= budget} | {budget})
    mean = {row: {c: {str(n): mean_at([r for r in runs if r["row"] == row], n, c) for n in marks} for c in columns}
            for row in dict.fromkeys(r["row"] for r in runs)}
    return {"marks": marks, "mean": mean,
            "sample_efficiency": [efficiency(runs, columns[0], b) for b in BASELINES]
            if CLAIMS[claim].get("efficiency") else None}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--claim", choices=sorted(CLAIMS), default="demo")
    p.add_argument("--zoo", type=Path, help="as given to headline.py")
    p.add_argument("--work", type=Path, help="the headline runs (default runs/headline/<artifact name>)")
    p.add_argument("--out", type=Path, help="artifact path (default benchmarks/results/curves_<artifact name>.json)")
    p.add_argument("--jobs", type=int, default=1, help="seeds measured at once (a process each)")
    p.add_argument("--summaries", action="store_true",
                   help="recompute the artifact's means and sample efficiency from its stored curves (no search)")
    args = p.parse_args()
    name = artifact_name(args.claim, args.zoo)
    out = args.out or RESULTS / f"curves_{name}.json"
    if args.summaries:
        result = json.loads(out.read_text())
        result.update(summaries(result["claim"], result["runs"]))
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(markdown(result))
        return
    work = (args.work or RUNS / "headline" / name).resolve()
    seeds = sorted(work.glob("seed*"), key=lambda d: int(d.name[4:]))
    if not seeds:
        sys.exit(f"no seed runs in {work}: run benchmarks/headline.py --claim {args.claim} first")
    t0 = time.perf_counter()
    with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        runs = [r for one in pool.map(measure, [args.claim] * len(seeds), seeds) for r in one]
    result = {"benchmark": "curves", "claim": args.claim, "headline": name, "columns": list(CLAIMS[args.claim]["columns"]),
              "runs": runs, **summaries(args.claim, runs), "seconds": round(time.perf_counter() - t0, 1),
              "machine": memstat.machine(), "versions": memstat.versions(ROOT)}
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(markdown(result))


if __name__ == "__main__":
    main()
