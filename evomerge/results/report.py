"""`evomerge report`: one self-contained HTML file, plotly.js embedded once (it opens offline, no network):
the held-out table with its baselines, the optimization history with the best so far, the learning curves of
this search and its comparison searches (against evaluations or examples scored), the Pareto front with
hover, the hypervolume over evaluations, parallel coordinates over the genome's named dimensions, and the
best candidate's recipe as a per-layer heatmap. The plots are `evomerge.results.figures`', as in the notebook.
"""
from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from evomerge.machine import write_whole
from evomerge.results import figures
from evomerge.results.holdout import read_table

_STYLE = ("body{font-family:sans-serif;max-width:1000px;margin:2em auto;color:#222}h2{margin-top:1.6em}"
          "table.holdout{border-collapse:collapse}table.holdout td,table.holdout th{border:1px solid #ccc;"
          "padding:4px 10px;text-align:right}table.holdout caption{caption-side:bottom;color:#666;font-size:90%}"
          "pre{background:#f6f6f6;padding:1em;overflow:auto}")


def hover_labels(run, ids: list[int]) -> dict[int, str]:
    """A recipe summary per candidate, for hover labels; a plain-box genome's first coordinates instead."""
    recipes = run.recipes(ids)
    missing = [i for i in ids if i not in recipes]
    width = len(run.space_names)
    heads = run.genomes(missing, range(min(figures.SUMMARY_DIMS, width))) if missing else []
    return {**{i: figures.recipe_summary(r) for i, r in recipes.items()},
            **{i: figures.genome_summary(list(x), width) for i, x in zip(missing, heads)}}


def sections(run) -> list[tuple[str, Any]]:
    """The report's sections of an open run, in order: (title, HTML text or a plotly figure)."""
    objs = run.objectives
    df = run.frame(genomes=False)
    ok = run.successes()
    holdout = read_table(run.run_dir)
    parts: list[tuple[str, Any]] = [("Held-out comparison", figures.holdout_html(holdout) if holdout else
                                     f"<p>No held-out table yet: <code>evomerge holdout "
                                     f"{html.escape(str(run.run_dir))}</code> writes it.</p>")]
    if not len(ok):
        return parts + [("Optimization history", "<p>No successful evaluation yet.</p>")]
    parts.append(("Optimization history: every evaluation and the best so far", figures.history_figure(df, objs)))
    searches = comparison_curves(run)
    if len(searches) > 1:
        parts.append((f"Learning curves: the best {objs[0].name} so far of each search",
                      figures.curves_figure(searches, objs[0])))
    best = int(run.best(genomes=False)["id"])
    front_ids = {int(i) for i in run.pareto().id} if len(objs) >= 2 else {best}
    if len(objs) >= 2:
        labels = hover_labels(run, [int(i) for i in ok.id])
        parts.append((f"Pareto front ({len(front_ids)} of {len(ok)} candidates)",
                      figures.pareto_figure(ok, front_ids, objs, labels)))
        parts.append(("Hypervolume over evaluations", figures.hypervolume_figure(run.hypervolume_history())))
    names = run.space_names
    dims = figures.parallel_dims(names)
    rows = figures.parallel_rows(ok, front_ids)
    notes = ([f"{len(dims)} of its {len(names)} dimensions"] if len(dims) < len(names) else []) + (
        [f"{len(rows)} of {len(ok)} candidates"] if len(rows) < len(ok) else [])
    parts.append(("Parallel coordinates over the genome" + (f" ({', '.join(notes)})" if notes else ""),
                  figures.parallel_figure(ok.set_index("id").loc[rows].reset_index(), run.genomes(rows, dims),
                                          [names[k] for k in dims], objs)))
    recipe = run.recipes([best]).get(best)
    parts.append((f"Best candidate {best} ({run.best_rule()}): its recipe per layer",
                  figures.heatmap_figure(*figures.candidate_grid(recipe, names, list(run.genomes([best])[0])))))
    if recipe is not None:
        parts.append(("Its recipe", f"<pre>{html.escape(recipe.to_yaml())}</pre>"))
    return parts


def comparison_curves(run) -> dict[str, tuple[list[float], list[float]]]:
    """Best so far on the first objective and examples scored after each evaluation, for this search and each
    `holdout.compare` search already run that scores the same objectives (a benchmark's baseline with a fitness of
    its own is not on the same scale)."""
    from evomerge.results.comparisons import compare_dir
    from evomerge.results.journal import open_run
    from evomerge.run.store import STORE_FILE

    name = run.objectives[0].name
    out = {"this search": (run.best_so_far(name), run.examples_so_far())}
    for row in ((run.config.get("holdout") or {}).get("compare") or {}):
        path = compare_dir(run.run_dir, row)
        if not (path / STORE_FILE).exists():
            continue
        sub = open_run(path)
        try:
            if [o.name for o in sub.objectives] == [o.name for o in run.objectives]:
                out[row] = (sub.best_so_far(name), sub.examples_so_far())
        finally:
            sub.close()
    return out


def render(run_dir: str | Path) -> str:
    from plotly.offline import get_plotlyjs

    from evomerge.results.journal import open_run, run_status

    info = run_status(Path(run_dir))
    run = open_run(run_dir)
    try:
        parts = sections(run)
    finally:
        run.close()
    best = "".join(f"<li>best {html.escape(k)} ({b['direction']}): {figures.fmt(b['value'])} (candidate {b['candidate']})</li>"
                   for k, b in info["best"].items())
    hv = "" if info["hypervolume"] is None else f"; hypervolume {figures.fmt(info['hypervolume'])}"
    summary = (f"<p>{info['evaluations']} evaluations, {info['failed']} failed, {info['in_flight']} in flight; "
               f"Pareto front {info['pareto_size']}{hv}; {html.escape(info['state'])}"
               f"; examples scored {info['scoring']['examples']:.0f} ({info['scoring']['stopped']} stopped by racing, "
               f"{info['scoring']['estimated']} estimated)</p><ul>{best}</ul>")
    body = "".join(f"<section><h2>{html.escape(title)}</h2>{_html(content, k)}</section>"
                   for k, (title, content) in enumerate(parts))
    title = html.escape(f"evomerge run {run_dir}")
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{title}</title><style>{_STYLE}</style>"
            f"<script>{get_plotlyjs()}</script></head><body><h1>{title}</h1>{summary}{body}</body></html>")


def _html(content: Any, k: int) -> str:
    if isinstance(content, str):
        return content
    return content.to_html(full_html=False, include_plotlyjs=False, div_id=f"plot{k}",
                           config={"displaylogo": False, "responsive": True})


def write_report(run_dir: str | Path, out: str | Path) -> None:
    text = render(run_dir)
    write_whole(Path(out), text)
