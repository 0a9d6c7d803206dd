"""Issue 28's held-out operator table: each merge operator untuned and searched, beside TIES and DARE searched.

    python benchmarks/operators.py --bed zoo      # runs/demo.yaml's problem   -> benchmarks/results/operators.json
    python benchmarks/operators.py --bed real     # runs/real.yaml's problem   -> benchmarks/results/operators_real.json

One run per test bed, through the real CLI as benchmarks/headline.py runs its claims: the bed's ready config whose
`holdout` gets an untuned baseline per operator (the method's own defaults: a weight of 1 per expert, its paper's
density, lambda, alpha...) and a `compare` row per searched operator (the run's layer_weights space with only the
method changed, or LiNeS's start-and-slope over depth instead of the space's layer values: the same fitness, budget
and seed). The run's own search is TIES searched. The data-aware operators read a calibration set made of the dev
split's text (never a test example). Adding an operator is one line in OPERATORS. `--evaluations` and `--limit`
give a quick check; the artifact records the budget, the wall time and the machine. A killed benchmark resumes.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]
import headline  # noqa: E402  (the position-independent config and the run through the CLI)
import memstat  # noqa: E402
from evomerge.merge import methods  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
SEARCHED = " searched"  # a compare row's name: the operator's name and this

# operator: its untuned recipe (method, per-expert parameters, shared parameters, whether it reads the calibration
# set) and its searched row's layer_weights options over the run's space (None: not searchable, NOT_SEARCHED says why)
OPERATORS = {
    "TIES": {"method": "ties", "models": {"weight": 1.0, "density": 0.2}, "search": {"method": "ties"}},
    "DARE": {"method": "dare_ties", "models": {"weight": 1.0, "density": 0.2}, "search": {"method": "dare_ties"}},
    "LiNeS (TIES)": {"search": {"method": "ties", "lines": True}},
    "pcb": {"method": "pcb", "search": {"method": "pcb"}},
    "tsv_m": {"method": "tsv_m", "search": {"method": "tsv_m"}},
    "tall_consensus": {"method": "tall_consensus", "search": {"method": "tall_consensus"}},
    "localize_stitch": {"method": "localize_stitch", "search": {"method": "localize_stitch"}},
    "fisher": {"method": "fisher", "data": True, "search": {"method": "fisher", "base": None}},
    "regmean": {"method": "regmean", "data": True, "search": {"method": "regmean", "base": None}},
    "regmean_plus": {"method": "regmean_plus", "data": True, "search": {"method": "regmean_plus", "base": None}},
}
NOT_SEARCHED = {"LiNeS (TIES)": "a parametrisation of the layer_weights space, not a method: searched row only"}

# per test bed: the ready config, its zoo, the experts' dev files the calibration set comes from, the budget when
# it is not the config's, and the held-out columns the table shows
BEDS = {
    "zoo": {"config": "demo.yaml", "zoo": "evomerge/zoo", "calibration": ["math_e_dev", "lang_j_dev"], "chat": False,
            "budget": {"evaluations": 20, "wall_time": "1h"}, "artifact": "operators",
            "columns": {"acc_tf/math_j": "J math (target)", "acc_tf/lang_j": "J instructions"}},
    "real": {"config": "real.yaml", "zoo": "evomerge/zoo/real", "calibration": ["math_dev", "fr_dev"], "chat": True,
             "budget": None, "artifact": "operators_real",
             "columns": {"acc_tf/math": "MATH (sums)", "acc_tf/fr": "FR (numbers in French)"}},
}
PER_TASK = 32  # calibration examples per expert's dev file


def calibration_set(bed: str, out: Path) -> Path:
    """The first PER_TASK dev examples of each expert's task as text: a chat turn on the real test bed (as its
    fitness templates them), the prompt followed by its answer on the zoo (no template)."""
    spec = BEDS[bed]
    data = ROOT / spec["zoo"] / "data"
    if spec["chat"]:
        import transformers

        tok = transformers.AutoTokenizer.from_pretrained(ROOT / spec["zoo"] / "models" / "base")
        text = lambda ex: tok.apply_chat_template([{"role": "user", "content": ex["prompt"]},  # noqa: E731
                                                   {"role": "assistant", "content": ex["reference"]}], tokenize=False)
    else:
        text = lambda ex: ex["prompt"] + ex["reference"]  # noqa: E731
    rows = [json.dumps({"text": text(json.loads(line))})
            for task in spec["calibration"] for line in (data / f"{task}.jsonl").read_text().splitlines()[:PER_TASK]]
    out.write_text("\n".join(rows) + "\n")
    return out


def untuned(op: dict, experts: list[str], base: str, calibration: Path) -> dict:
    recipe = {"merge_method": op["method"], "models": [{"model": e, "parameters": dict(op.get("models", {}))} for e in experts]}
    if op["method"] not in ("fisher", "regmean", "regmean_plus"):
        recipe["base_model"] = base
    if op.get("data"):
        recipe["parameters"] = {"calibration": str(calibration)}
    return recipe


def searched_space(space: dict, op: dict, calibration: Path) -> dict:
    options = {**space["options"], **op["search"]}
    if options.get("lines"):  # LiNeS takes the place of the space's layer values
        options.pop("knots", None)
        options.pop("granularity", None)
    if op.get("data"):
        options["calibration"] = str(calibration)
    if not any(p.name == "normalize" for p in methods.get(options["method"]).shared_params()):
        options.pop("normalize", None)  # the run's TIES option; a method without it refuses it
    return {"name": space["name"], "options": options}


def bed_config(bed: str, work: Path, *, evaluations: int | None, limit: int | None, skip: tuple[str, ...] = ()) -> Path:
    """The bed's ready config (headline.seed_config) with the operators' holdout: the sources, each operator's
    untuned recipe, and a compare row per searched operator but TIES, which is the run's own search."""
    spec = BEDS[bed]
    path = headline.seed_config("real" if bed == "real" else "demo", work, zoo=None, evaluations=None, limit=limit)
    cfg = yaml.safe_load(path.read_text())
    calibration = calibration_set(bed, work / "calibration.jsonl")
    experts = [s for s in cfg["sources"] if s != cfg["base"]]
    if spec["budget"] is not None:
        cfg["budget"] = dict(spec["budget"])
    if evaluations is not None:
        cfg["budget"]["evaluations"] = evaluations
    cfg["space"]["options"]["method"] = OPERATORS["TIES"]["search"]["method"]
    sources = {name: r for name, r in cfg["holdout"]["baselines"].items() if r["merge_method"] == "linear" and len(r["models"]) == 1}
    cfg["holdout"]["baselines"] = {**sources, **{f"{name} untuned": untuned(op, experts, cfg["base"], calibration)
                                                 for name, op in OPERATORS.items() if "method" in op}}
    cfg["holdout"]["compare"] = {name + SEARCHED: {"space": searched_space(cfg["space"], op, calibration)}
                                 for name, op in OPERATORS.items() if op["search"] is not None and name not in ("TIES", *skip)}
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def table(result: dict) -> dict:
    """Per operator: its untuned and searched held-out rows (None where it has none), the search's evaluations,
    and why a row is missing (`not_searched`: it cannot be; `left_out`: this run did not search it)."""
    rows, found = result["run"]["rows"], result["run"]["searches"]
    out = {}
    for name in OPERATORS:
        searched = rows[list(rows)[-1]] if name == "TIES" else rows.get(name + SEARCHED)  # TIES: the run's own search
        search = result["run"]["search"] if name == "TIES" else found.get(name + SEARCHED)
        out[name] = {"untuned": rows.get(f"{name} untuned"), "searched": searched,
                     "evaluations": search["evaluations"] if searched else None,
                     "not_searched": NOT_SEARCHED.get(name), "left_out": name in result["searches_left_out"]}
    return out


def markdown(result: dict) -> str:
    columns = BEDS[result["bed"]]["columns"]
    fmt = lambda r, c: "—" if r is None else f"{100 * r[c]:.1f}"  # noqa: E731
    lines = [f"Held-out %, search seed {result['seed']}, {result['budget']['evaluations']} evaluations per searched row "
             f"(`benchmarks/operators.py --bed {result['bed']}` → `benchmarks/results/{result['artifact']}.json`):", "",
             "| operator | " + " | ".join(f"{c} untuned | {c} searched" for c in columns.values()) + " |",
             "|---" * (2 * len(columns) + 1) + "|"]
    for name, cols in result["sources"].items():
        lines.append(f"| {name} | " + " | ".join(f"{fmt(cols, c)} | —" for c in columns) + " |")
    for name, t in result["table"].items():
        lines.append(f"| {name} | " + " | ".join(f"{fmt(t['untuned'], c)} | {fmt(t['searched'], c)}" for c in columns) + " |")
    notes = [f"{name}: {t['not_searched']}" for name, t in result["table"].items() if t["not_searched"]]
    left = [name for name, t in result["table"].items() if t["left_out"]]
    if left:
        notes.append(f"not searched in this run (each merge too slow for the budget here): {', '.join(left)}")
    return "\n".join(lines + [""] + [f"- {n}" for n in notes])


def search_seconds(run_dir: Path, cfg: dict) -> dict:
    """Each search's wall time, from its run's journal (so a table read back still says it)."""
    from evomerge.results.comparisons import compare_dir
    from evomerge.run.store import RunStore

    dirs = {"TIES searched (the run's own)": run_dir, **{row: compare_dir(run_dir, row) for row in cfg["holdout"]["compare"]}}
    out = {}
    for row, d in dirs.items():
        with RunStore.open(d, readonly=True) as store:
            out[row] = round(store.elapsed(), 1)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--bed", choices=sorted(BEDS), default="zoo")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--evaluations", type=int, help="a smaller evaluation budget (a quick check)")
    p.add_argument("--limit", type=int, help="problems per task (a quick check)")
    p.add_argument("--skip-search", nargs="+", default=[], choices=sorted(OPERATORS), metavar="OPERATOR",
                   help="operators whose searched row is left out (the artifact then says `complete: false`)")
    p.add_argument("--partial", action="store_true", help="write what an unfinished run has done, without running it")
    p.add_argument("--work", type=Path, help="where the run goes (default runs/operators/<bed>)")
    p.add_argument("--out", help="artifact path (default benchmarks/results/<artifact>.json)")
    args = p.parse_args()
    spec = BEDS[args.bed]
    work = (args.work or ROOT / "runs" / "operators" / args.bed).resolve()
    work.mkdir(parents=True, exist_ok=True)
    config = bed_config(args.bed, work, evaluations=args.evaluations, limit=args.limit, skip=tuple(args.skip_search))
    t0 = time.perf_counter()
    run_dir = work / f"seed{args.seed}"
    if args.partial:
        return write(progress(run_dir, yaml.safe_load(config.read_text()), args), args)
    run = headline.run_seed(config, run_dir, args.seed)
    cfg = json.loads(json.dumps(yaml.safe_load(config.read_text())).replace(f"{ROOT}/", ""))  # paths from the repo root
    result = {
        "benchmark": "operators", "bed": args.bed, "artifact": spec["artifact"], "config": f"runs/{spec['config']}",
        "complete": not args.skip_search, "searches_left_out": args.skip_search, "budget": cfg["budget"], "limit": args.limit, "seed": args.seed,
        "calibration": f"the first {PER_TASK} examples of each of {', '.join(spec['calibration'])} (dev split) as text",
        "run_config": cfg,
        "run": {"rows": run["rows"], "search": run["search"], "searches": run.get("searches", {})},
        "sources": {name: run["rows"][name] for name in cfg["holdout"]["baselines"] if not name.endswith(" untuned")},
        "search_seconds": search_seconds(run_dir, cfg),
        "seconds": round(time.perf_counter() - t0, 1),  # of this call (searches and held-out): ~0 when read back
        "machine": memstat.machine(), "versions": memstat.versions(ROOT),
    }
    result["table"] = table(result)
    write(result, args)
    print(markdown(result))


def write(result: dict, args: argparse.Namespace) -> None:
    out = Path(args.out) if args.out else RESULTS / f"{BEDS[args.bed]['artifact']}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")


def progress(run_dir: Path, cfg: dict, args: argparse.Namespace) -> dict:
    """What an unfinished run has done (`complete: false`, no held-out numbers): each search's evaluations so
    far, its wall time and its best dev fitness (the run's own rule)."""
    from evomerge.results.comparisons import compare_dir, searched
    from evomerge.results.journal import open_run

    searches = {}
    for row, d in {"TIES searched (the run's own)": run_dir, **{r: compare_dir(run_dir, r) for r in cfg["holdout"]["compare"]}}.items():
        if not (d / "run.sqlite").is_file():
            searches[row] = None  # not started
            continue
        run = open_run(d)
        try:
            best = run.best(None, genomes=False)
            searches[row] = {**searched(run, cfg["budget"]), "seconds": round(run.elapsed(), 1),
                             "best_dev": {k: float(best[k]) for k in best.index if k.startswith("acc_tf/")}}
        finally:
            run.close()
    return {"benchmark": "operators", "bed": args.bed, "artifact": BEDS[args.bed]["artifact"], "complete": False,
            "missing": "the held-out table: the run had not finished its searches and held-out scoring",
            "searches_left_out": args.skip_search, "budget": cfg["budget"], "seed": args.seed, "dev_progress": searches,
            "machine": memstat.machine(), "versions": memstat.versions(ROOT)}


if __name__ == "__main__":
    main()
