"""The end-of-run comparison: the evolved best against the sources and untuned merges, on held-out data.

Configured by the run config's `holdout:` section. With `tasks`, each baseline recipe, the best recipe of
each `compare` search (evomerge/results/comparisons.py: the same budget spent another way) and the best candidate's
recipe (the run's best: on its first objective, or the knee of its front) are scored on those tasks through the run's own model handle (HF,
vLLM or an API), so every row is measured the same way; with `function`, the user's `module:function` gets
the best candidate's genome and returns its own rows. The numbers and each tuned row's evaluations are
printed as a table, written to `holdout.json` in the run directory, and the best model is exported to
`export`. Read-only on the run's store: the comparison never modifies a run.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from evomerge.machine import write_whole
from evomerge.records import UserError

BEST = "evolved best"
RESULT_FILE = "holdout.json"


def evaluate_holdout(run_dir: str | Path, *, progress: bool = True) -> dict[str, Any]:
    """Score the baselines, the best of each `compare` search (run first, or finished) and the best candidate;
    returns {"rows": {row: {objective: value}}, "best": id, "seed": run seed, "searches": {tuned row: how its
    search ended (comparisons.searched)}, ...} and writes it to RUN_DIR/holdout.json."""
    from evomerge.run.assemble import build_handle, build_space, importable
    from evomerge.results.comparisons import run_comparison, searched
    from evomerge.config import parse_config
    from evomerge.recipe import Recipe
    from evomerge.results.journal import open_run
    from evomerge.registry import load_callable
    from evomerge.run.worker import Genome

    run_dir = Path(run_dir)
    run = open_run(run_dir)
    try:
        cfg = parse_config(run.config)
        best = run.best(None)
        best_id, rule = int(best["id"]), run.best_rule()
        best_recipe = run.recipe(best_id) if cfg.space.name is not None else None  # plain boxes have no recipe
        best_x = [float(v) for v in run.genomes([best_id])[0]]
        searches = {BEST: searched(run, cfg.budget.model_dump(exclude_none=True))}
    finally:
        run.close()
    h = cfg.holdout
    if h is None:
        raise UserError(f"the run in {run_dir} has no holdout section in its config")
    found = {}  # compare rows: the best recipe of each one's own search
    for row in h.compare:
        sub = open_run(run_comparison(cfg, run_dir, row, progress=progress))
        try:
            found[row] = sub.recipe(int(sub.best(None)["id"]))
            searches[row] = searched(sub.store, cfg.budget.model_dump(exclude_none=True))
        finally:
            sub.close()
    if h.function is not None:
        importable(cfg)
        genome = Genome(best_id, best_x, build_space(cfg).names(), best_recipe)
        rows = {str(k): {str(m): float(v) for m, v in r.items()} for k, r in load_callable(h.function, "holdout function")(genome, **h.options).items()}
    else:
        if best_recipe is None:
            raise UserError("holdout.tasks score recipes, but this run's candidates have none (a plain box space)")
        from evomerge.fitness.suite import TaskFitness

        if h.lm_eval is not None:
            from evomerge.fitness.lmeval import LMEvalFitness

            fitness = LMEvalFitness.from_config(h.lm_eval.model_dump(), base_dir=cfg.workdir)
        else:
            fitness = TaskFitness.from_config(h.tasks or [], base_dir=cfg.workdir)
        handle = build_handle(cfg.model_copy(update={"sources": {**cfg.sources, **h.sources}}))  # with the baselines' own models
        if handle is None:
            raise UserError("holdout.tasks need the run's models (sources or an API backend)")
        recipes = {name: Recipe.from_dict(r) for name, r in h.baselines.items()}
        recipes.update(found)
        recipes[BEST] = best_recipe
        rows = {}
        for name, recipe in _progress(recipes.items(), progress):
            handle.set_recipe(recipe)
            rows[name] = dict(fitness.evaluate(handle).objectives)
    result = {"rows": rows, "best": best_id, "best_rule": rule, "seed": cfg.seed, "percent": h.percent,
              "searches": {row: searches[row] for row in rows if row in searches}, "wall_time": cfg.budget.wall_time}
    write_whole(run_dir / RESULT_FILE, json.dumps(result, indent=2))
    return result


def _progress(items, show: bool):
    items = list(items)
    if not show:
        return items
    from rich.progress import track

    return track(items, description="held-out scoring", transient=True)


def _number(v: float, percent: bool) -> str:
    return f"{v * 100:.1f}" if percent else f"{v:.4g}"


def _console():
    from rich.console import Console

    console = Console()
    return console if console.width >= 120 else Console(width=120)  # a log or CI: wide enough for the column names


def print_table(result: dict[str, Any], title: str = "held-out comparison") -> None:
    """The rows as a rich table; values × 100 when the config says percent. The best value per column is bold."""
    from rich.table import Table

    from evomerge.results.comparisons import cut_message

    rows: dict[str, dict[str, float]] = result["rows"]
    searches: dict[str, dict[str, Any]] = result.get("searches", {})
    columns = list(dict.fromkeys(c for r in rows.values() for c in r))
    percent = bool(result.get("percent", True))
    cuts = [row for row, s in searches.items() if s["cut"]]
    rule = f": {result['best_rule']}" if "best_rule" in result else ""
    table = Table(title=f"{title} (run seed {result['seed']}, best candidate {result['best']}{rule})",
                  caption="CUT BY THE WALL-TIME CAP: " + ", ".join(cuts) if cuts else None)
    table.add_column("model")
    for c in columns:
        table.add_column(c + (" %" if percent else ""), justify="right")
    if searches:
        table.add_column("evaluations", justify="right")  # what each tuned row's search did; untuned rows: none
    tops = {c: max((r[c] for r in rows.values() if c in r), default=None) for c in columns}
    for name, r in rows.items():
        cells = []
        for c in columns:
            v = r.get(c)
            text = "" if v is None else _number(v, percent)
            cells.append(f"[bold]{text}[/bold]" if v is not None and v == tops[c] else text)
        s = searches.get(name)
        if searches:
            cells.append("" if s is None else f"{s['evaluations']}" + (f" of {s['budget']}, CUT" if s["cut"] else ""))
        table.add_row(name, *cells)
    _console().print(table)
    for row in cuts:
        print(cut_message(row, searches[row], result.get("wall_time")))


def read_table(run_dir: str | Path, required: bool = False) -> dict[str, Any] | None:
    """The run's held-out table as `evomerge holdout` wrote it; before it exists None, or (`required`) one line."""
    path = Path(run_dir) / RESULT_FILE
    if not path.is_file():
        if required:
            raise UserError(f"{run_dir} has no held-out table ({RESULT_FILE}): run `evomerge holdout {run_dir}` first")
        return None
    try:
        return json.loads(path.read_text())
    except (ValueError, OSError) as e:
        raise UserError(f"{path}: not a held-out table ({e})") from None


def compare(run_dirs: list[Path]) -> dict[str, Any]:
    """The held-out tables of several runs (e.g. one search over seeds) side by side: per row and column the
    mean, min and max over the runs. Every run must have its table and the same rows and columns."""
    if len(run_dirs) < 2:
        raise UserError("compare needs two or more run directories")
    results = [read_table(d, required=True) for d in run_dirs]
    shape = {r: sorted(v) for r, v in results[0]["rows"].items()}
    for d, res in zip(run_dirs[1:], results[1:]):
        if {r: sorted(v) for r, v in res["rows"].items()} != shape:
            raise UserError(f"{d}: its held-out table has other rows or columns than {run_dirs[0]}'s")
    rows = {r: {c: [res["rows"][r][c] for res in results] for c in cols} for r, cols in shape.items()}
    return {"runs": [{"dir": str(d), "seed": res["seed"], "best": res["best"]} for d, res in zip(run_dirs, results)],
            "percent": results[0].get("percent", True),
            "rows": {r: {c: {"mean": sum(v) / len(v), "min": min(v), "max": max(v)} for c, v in cols.items()}
                     for r, cols in rows.items()}}


def print_comparison(result: dict[str, Any]) -> None:
    """`compare`'s numbers as a rich table: mean [min-max] per cell."""
    from rich.markup import escape
    from rich.table import Table

    percent = bool(result["percent"])

    def fmt(v: float) -> str:
        return _number(v, percent)

    columns = list(dict.fromkeys(c for r in result["rows"].values() for c in r))
    seeds = ", ".join(str(r["seed"]) for r in result["runs"])
    table = Table(title=escape(f"held-out comparison over {len(result['runs'])} runs (seeds {seeds}): mean [min-max]"))
    table.add_column("model")
    for c in columns:
        table.add_column(c + (" %" if percent else ""), justify="right")
    for name, r in result["rows"].items():
        table.add_row(escape(name), *[escape(fmt(r[c]["mean"]) + ("" if r[c]["min"] == r[c]["max"] else
                                                           f" [{fmt(r[c]['min'])}-{fmt(r[c]['max'])}]")) for c in columns])
    _console().print(table)


def replace_holdout(run_dir: str | Path, config: dict[str, Any], where: str) -> None:
    """Store `config`'s holdout section as the run's: other baselines and comparison rows for a search already
    done. Every section that shaped the search must equal the run's (the seed is the run's own: `--seed` may have
    set it); else one line naming the first that differs, nothing changed."""
    from evomerge.config import parse_config
    from evomerge.run.store import RunStore

    new = parse_config(config).to_dict()
    with RunStore.open(run_dir) as store:
        old = parse_config(store.config).to_dict()
        differ = [k for k in sorted({*old, *new} - {"holdout", "seed"}) if old.get(k) != new.get(k)]
        if differ:
            raise UserError(f"{where}: its {differ[0]!r} differs from the run's in {run_dir}; only its holdout "
                            "section may differ")
        store.set_config({**store.config, "holdout": new.get("holdout")})  # one transaction: the old or the new


def finish_run(run_dir: str | Path, *, progress: bool = True) -> dict[str, Any] | None:
    """What `evomerge run` does once the budget is reached: the held-out table, then the best model exported
    (once: an export already there is kept). None when the config has no holdout section."""
    from evomerge.config import parse_config
    from evomerge.results.export import export_run
    from evomerge.results.journal import open_run

    run_dir = Path(run_dir)
    run = open_run(run_dir)
    try:
        cfg = parse_config(run.config)
    finally:
        run.close()
    if cfg.holdout is None:
        return None
    result = evaluate_holdout(run_dir, progress=progress)
    print_table(result)
    if cfg.holdout.export is not None and cfg.sources:
        target = run_dir / cfg.holdout.export
        if target.exists():
            print(f"best model already exported at {target}")
        else:
            export_run(run_dir, target, fmt="hf")
            print(f"exported the best model (candidate {result['best']}) to {target}")
    return result
