"""The README's headline claims as artifacts: a ready run over several search seeds, through the real CLI.

    python benchmarks/headline.py --seeds 0 1 2 3 4 5 --jobs 2   # the demo on the shipped zoo, six seeds
    python benchmarks/headline.py --zoo runs/zoo_seed1           # another zoo (`evomerge zoo build --seed 1`), seeds 0 1 2
    python benchmarks/headline.py --claim digits                 # runs/digits_m2n2.yaml (M2N2, the user's own fitness)
    python benchmarks/headline.py --claim real --jobs 2          # runs/real.yaml: two real experts (zoo build --real)

Each seed is `evomerge run CONFIG --seed N` in WORK/seedN (default runs/headline/<artifact name>/; a killed
benchmark resumes its runs, a finished seed is read back). Writes the per-seed held-out rows, each tuned row's
evaluations, mean / min / max over the seeds, the versions and the machine to the artifact
(benchmarks/results/headline*.json) and prints the claim's table, which is what README.md and
evomerge/zoo/CARD.md show (tests/test_readme_figures.py keeps them equal). `--evaluations` and `--limit`
(problems per task) give a quick version for CI; an artifact records which budget it ran.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
RUNS = ROOT / "runs"
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]  # this checkout's evomerge, as the runs' subprocesses use
import memstat  # noqa: E402  (machine facts and versions, shared with the other benchmarks)

# per claim: the ready run, and the held-out columns its table shows (name as the table labels it)
CLAIMS = {
    "demo": {"config": "demo.yaml", "columns": {"acc_tf/math_j": "J math (target)",
                                                 "acc_tf/lang_j": "J instructions (LANG's task)"},
             "efficiency": True},  # curves.py measures the default's evaluations against CMA-ES's
    "digits": {"config": "digits_m2n2.yaml", "columns": {"test_acc": "all ten digits"}},
    # two real experts of SmolLM2-135M-Instruct: the claim is that the merge keeps both skills at once
    "real": {"config": "real.yaml", "zoo": "evomerge/zoo/real", "columns": {"acc_tf/math": "MATH (sums)", "acc_tf/fr": "FR (numbers in French)"},
             "experts": {"acc_tf/math": "MATH", "acc_tf/fr": "FR"}},
}


def artifact_name(claim: str, zoo: Path | None) -> str:
    return "headline" + ("" if claim == "demo" else f"_{claim}") + (f"_{zoo.name}" if zoo is not None else "")


def seed_config(claim: str, work: Path, *, zoo: Path | None, evaluations: int | None, limit: int | None) -> Path:
    """The claim's ready config, made position-independent (absolute sources, runs/ as its folder), on `zoo`'s
    models and task files when given, with a reduced budget when asked."""
    cfg = yaml.safe_load((RUNS / CLAIMS[claim]["config"]).read_text())
    cfg["workdir"] = str(RUNS)
    cfg["sources"] = {k: str((RUNS / v).resolve()) for k, v in (cfg.get("sources") or {}).items()}
    if zoo is not None:
        cfg["sources"] = {k: str((zoo / "models" / k).resolve()) for k in cfg["sources"]}
    for section in ("fitness", "holdout"):
        for task in (cfg.get(section) or {}).get("tasks") or []:
            if zoo is not None:
                task["path"] = str((zoo / "data" / Path(task["path"]).name).resolve())
            if limit is not None:
                task["limit"] = limit
    if evaluations is not None:
        cfg["budget"]["evaluations"] = evaluations
    path = work / "config.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def run_seed(config: Path, run_dir: Path, seed: int) -> dict:
    """One search seed's held-out table, and how its search ended (`search`: evaluations done, cut or not);
    read back when that run finished before, else run (or resumed)."""
    from evomerge.results.comparisons import searched
    from evomerge.config import load_config, parse_config
    from evomerge.run.store import RunStore

    want = parse_config({**load_config(config).to_dict(), "seed": seed}).to_dict()
    table = run_dir / "holdout.json"
    if (run_dir / "run.sqlite").is_file():
        with RunStore.open(run_dir, readonly=True) as store:
            have = parse_config(store.config).to_dict()
        if {**have, "holdout": None} != {**want, "holdout": None}:
            sys.exit(f"{run_dir} holds a run of another config: remove it or pass another --work")
        if have != want:  # other held-out rows (an operator added) for the same search: only the table is made again
            from evomerge.results.holdout import replace_holdout

            replace_holdout(run_dir, want, str(config))
            table.unlink(missing_ok=True)
        command = ["resume", str(run_dir)]
    else:
        command = ["run", str(config), "--run-dir", str(run_dir), "--seed", str(seed)]
    if not table.is_file():
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        done = subprocess.run([sys.executable, "-m", "evomerge.cli", *command, "-q"], cwd=ROOT, env=env,
                              capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"seed {seed} failed:\n{done.stderr[-3000:]}")
    with RunStore.open(run_dir, readonly=True) as store:
        search = {**searched(store, want["budget"]), "seconds": round(store.elapsed(), 1)}
    return {**json.loads(table.read_text()), "search": search}


def summarise(tables: list[dict]) -> dict:
    rows = tables[0]["rows"]
    return {r: {c: {"mean": sum(t["rows"][r][c] for t in tables) / len(tables),
                    "min": min(t["rows"][r][c] for t in tables), "max": max(t["rows"][r][c] for t in tables)}
                for c in cols} for r, cols in rows.items()}


def kept(result: dict) -> dict:
    """Per expert's task: the evolved best's held-out score over that expert's own, per seed, with the lowest."""
    per_seed = [{c: t["rows"][list(t["rows"])[-1]][c] / t["rows"][expert][c] if t["rows"][expert][c] else None
                 for c, expert in CLAIMS[result["claim"]]["experts"].items()} for t in result["runs"]]
    lows = {c: min((s[c] for s in per_seed if s[c] is not None), default=None) for c in per_seed[0]}
    return {"per_seed": per_seed, "min": lows, "all_at_least": min((v for v in lows.values() if v is not None), default=None)}


def markdown(result: dict) -> str:
    """The claim's table: per row and column, mean [min-max] over the seeds in %, and each tuned row's evaluations."""
    columns = CLAIMS[result["claim"]]["columns"]
    seeds = result["seeds"]
    fmt = lambda v: f"{100 * v:.1f}"  # noqa: E731
    head = (f"Held-out %, mean [min-max] over search seeds {', '.join(map(str, seeds))} "
            f"(`benchmarks/headline.py` → `benchmarks/results/{result['artifact']}.json`):")
    lines = [head, "", "| model | " + " | ".join(columns.values()) + " | evaluations |",
             "|---" * (len(columns) + 2) + "|"]
    last = list(result["summary"])[-1]
    for row, cols in result["summary"].items():
        cells = [fmt(cols[c]["mean"]) + ("" if cols[c]["min"] == cols[c]["max"] else
                                         f" [{fmt(cols[c]['min'])}-{fmt(cols[c]['max'])}]") for c in columns]
        # the last row is the run's own search (whatever a holdout function names it)
        found = [s["search"] if row == last else s["searches"].get(row) for s in result["runs"]]
        evals = {f["evaluations"] for f in found if f}
        cut = any(f and f["cut"] for f in found)
        n = "" if not evals else "-".join(map(str, sorted(evals))) + (" (cut by wall time)" if cut else "")
        lines.append(f"| {row} | " + " | ".join(cells) + f" | {n} |")
    *others, evolved = result["summary"]  # the evolved best is the table's last row
    m, minutes = result["machine"], math.ceil(max(r["search"]["seconds"] for r in result["runs"]) / 60)
    lines += ["", f"Budget {result['budget']['evaluations']} evaluations a search; the {evolved} search took at most "
                  f"{minutes} min a seed on {m['cpus']} CPU cores ({m['cpu_model']})."]
    if "experts" in CLAIMS[result["claim"]]:
        k = result["summary_kept"]
        parts = [f"{CLAIMS[result['claim']]['experts'][c]}'s {100 * v:.0f}%" for c, v in k["min"].items() if v is not None]
        return "\n".join(lines + ["", f"{evolved} keeps, at its lowest over the seeds, {' and '.join(parts)} of "
                                       "each expert's own held-out score on that expert's task."])
    target = next(iter(columns))
    rival = max(others, key=lambda r: result["summary"][r][target]["mean"])
    margins = [t["rows"][evolved][target] - max(t["rows"][r][target] for r in others) for t in result["runs"]]
    lines += ["", f"{evolved} minus the best other row of the same seed on {columns[target]}: "
              f"{100 * sum(margins) / len(margins):+.1f} points on average ({100 * min(margins):+.1f} to "
              f"{100 * max(margins):+.1f}); the best other row on average is {rival}."]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--claim", choices=sorted(CLAIMS), default="demo")
    p.add_argument("--zoo", type=Path, help="another zoo's directory (models/, data/) instead of the shipped one")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--evaluations", type=int, help="a smaller evaluation budget (a quick check)")
    p.add_argument("--limit", type=int, help="problems per task (a quick check)")
    p.add_argument("--jobs", type=int, default=1, help="seeds run at once")
    p.add_argument("--work", type=Path, help="where the runs go (default runs/headline/<artifact name>)")
    p.add_argument("--out", help="artifact path (default benchmarks/results/<artifact name>.json)")
    args = p.parse_args()
    name = artifact_name(args.claim, args.zoo)
    work = (args.work or RUNS / "headline" / name).resolve()
    work.mkdir(parents=True, exist_ok=True)
    config = seed_config(args.claim, work, zoo=args.zoo, evaluations=args.evaluations, limit=args.limit)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(args.jobs) as pool:  # seeds side by side: each run is one process of one thread
        tables = list(pool.map(lambda s: run_seed(config, work / f"seed{s}", s), args.seeds))
    cfg = yaml.safe_load(config.read_text())
    zoo = args.zoo or ROOT / CLAIMS[args.claim].get("zoo", "evomerge/zoo")
    build = zoo / "build.json"
    result = {
        "benchmark": "headline", "claim": args.claim, "artifact": name,
        "config": f"runs/{CLAIMS[args.claim]['config']}",
        "zoo": str(zoo.resolve().relative_to(ROOT)) if zoo.resolve().is_relative_to(ROOT) else str(zoo),
        "zoo_build": json.loads(build.read_text()) if args.claim != "digits" and build.is_file() else None,
        "budget": cfg["budget"], "limit": args.limit, "seeds": args.seeds,
        "runs": [{"seed": s, "best": t["best"], "rows": t["rows"], "search": t["search"],
                  "searches": t.get("searches", {})} for s, t in zip(args.seeds, tables)],
        "summary": summarise(tables),
        "seconds": round(time.perf_counter() - t0, 1),  # of this call: ~0 when every seed was read back
        "machine": memstat.machine(), "versions": memstat.versions(ROOT),
    }
    if "experts" in CLAIMS[args.claim]:
        result["summary_kept"] = kept(result)
    out = Path(args.out) if args.out else RESULTS / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(markdown(result))


if __name__ == "__main__":
    main()
