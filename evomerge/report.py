"""`evomerge report`: one self-contained HTML file (inline SVG, no scripts, no network): the best value
so far over evaluations, the Pareto front, and the best candidate's genome as a per-layer heatmap.
"""
from __future__ import annotations

import html
import math
import re
from pathlib import Path
from typing import Any

from evomerge.recipe import Recipe
from evomerge.records import UserError

W, H, PAD = 640, 320, 48
_LAYER = re.compile(r"(?:^|[._/])layers?[._]?(\d+(?:-\d+)?)(?=[._/]|$)")


def _scale(lo: float, hi: float, a: float, b: float):
    if not math.isfinite(lo) or not math.isfinite(hi) or hi == lo:
        lo, hi = (lo - 1, hi + 1) if math.isfinite(lo) else (0.0, 1.0)
    return lambda v: a + (v - lo) / (hi - lo) * (b - a)


def _axes(xlabel: str, ylabel: str, xr: tuple[float, float], yr: tuple[float, float]) -> str:
    return (f'<line x1="{PAD}" y1="{H - PAD}" x2="{W - 10}" y2="{H - PAD}" stroke="#333"/>'
            f'<line x1="{PAD}" y1="10" x2="{PAD}" y2="{H - PAD}" stroke="#333"/>'
            f'<text x="{W / 2}" y="{H - 10}" text-anchor="middle">{html.escape(xlabel)}</text>'
            f'<text x="14" y="{H / 2}" transform="rotate(-90 14 {H / 2})" text-anchor="middle">{html.escape(ylabel)}</text>'
            f'<text x="{PAD}" y="{H - PAD + 14}" font-size="10">{xr[0]:.4g}</text>'
            f'<text x="{W - 10}" y="{H - PAD + 14}" font-size="10" text-anchor="end">{xr[1]:.4g}</text>'
            f'<text x="{PAD - 4}" y="{H - PAD}" font-size="10" text-anchor="end">{yr[0]:.4g}</text>'
            f'<text x="{PAD - 4}" y="16" font-size="10" text-anchor="end">{yr[1]:.4g}</text>')


def _svg(body: str) -> str:
    return f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">{body}</svg>'


def best_so_far_svg(values: list[float], best: list[float], name: str) -> str:
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return "<p>No successful evaluation yet.</p>"
    yr = (min(finite), max(finite))
    sx, sy = _scale(0, max(1, len(values) - 1), PAD, W - 10), _scale(*yr, H - PAD, 10)
    dots = "".join(f'<circle cx="{sx(i):.1f}" cy="{sy(v):.1f}" r="2" fill="#9ab"/>' for i, v in enumerate(values) if math.isfinite(v))
    pts = " ".join(f"{sx(i):.1f},{sy(v):.1f}" for i, v in enumerate(best) if math.isfinite(v))
    line = f'<polyline points="{pts}" fill="none" stroke="#c33" stroke-width="2"/>'
    return _svg(_axes("evaluation", name, (0, len(values) - 1), yr) + dots + line)


def pareto_svg(xs: list[float], ys: list[float], front: list[bool], xname: str, yname: str,
               labels: list[str] | None = None) -> str:
    """All candidates, the front in red; `labels` become hover tooltips."""
    if not xs:
        return "<p>No successful evaluation yet.</p>"
    xr, yr = (min(xs), max(xs)), (min(ys), max(ys))
    sx, sy = _scale(*xr, PAD, W - 10), _scale(*yr, H - PAD, 10)
    labels = labels or [""] * len(xs)
    body = "".join(
        f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="{4 if f else 2.5}" fill="{"#c33" if f else "#9ab"}">'
        f'<title>{html.escape(t)}</title></circle>'
        for x, y, f, t in zip(xs, ys, front, labels))
    return _svg(_axes(xname, yname, xr, yr) + body)


def genome_grid(names: list[str], x: list[float]) -> tuple[list[str], list[str], dict[tuple[str, str], float]]:
    """Split genome coordinates into a (parameter, layer) grid: a `layer(s)_N` or `layer(s)_N-M` part of a
    name is its layer column, the rest its row."""
    rows: list[str] = []
    cols: list[str] = []
    cells: dict[tuple[str, str], float] = {}
    for name, v in zip(names, x):
        m = _LAYER.search(name)
        col = m.group(1) if m else "all"
        row = ((name[: m.start()] + "." + name[m.end():]).strip("._") if m else name) or name
        rows += [row] if row not in rows else []
        cols += [col] if col not in cols else []
        cells[(row, col)] = v
    return rows, sorted(cols, key=_col_key), cells


def recipe_grid(recipe: Recipe) -> tuple[list[str], list[str], dict[tuple[str, str], float]]:
    """A recipe's numeric parameters per source model: a per-layer list ("gradient") spreads over layer
    columns, a scalar sits in column 'all'; `{filter, value}` entries get a row per filter."""
    rows: list[str] = []
    cols: list[str] = []
    cells: dict[tuple[str, str], float] = {}

    def put(row: str, value: Any) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float, list)):
            return
        if isinstance(value, list):
            if value and all(isinstance(e, dict) for e in value):
                for e in value:
                    put(f"{row}[{e.get('filter', '*')}]", e.get("value"))
                return
            if not all(isinstance(e, (int, float)) for e in value):
                return
            items = [(str(i), float(v)) for i, v in enumerate(value)]
        else:
            items = [("all", float(value))]
        rows.append(row) if row not in rows else None
        for c, v in items:
            cols.append(c) if c not in cols else None
            cells[(row, c)] = v

    for ref in recipe.models:
        if isinstance(ref.model, str):
            for pname, value in ref.parameters.items():
                put(f"{ref.model}.{pname}", value)
    for pname, value in recipe.parameters.items():
        put(pname, value)
    return rows, sorted(cols, key=_col_key), cells


def _col_key(c: str) -> tuple[int, int]:
    m = re.match(r"(\d+)", c)
    return (0, int(m.group(1))) if m else (1, 0)


def heatmap_html(rows: list[str], cols: list[str], cells: dict[tuple[str, str], float]) -> str:
    if not cells:
        return "<p>No genome.</p>"
    lo, hi = min(cells.values()), max(cells.values())
    span = (hi - lo) or 1.0

    def color(v: float) -> str:
        t = (v - lo) / span
        return f"rgb({int(255 * t)},{int(80 + 80 * (1 - abs(2 * t - 1)))},{int(255 * (1 - t))})"

    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = ""
    for r in rows:
        tds = "".join(
            f'<td style="background:{color(cells[(r, c)])}" title="{cells[(r, c)]:.4g}">{cells[(r, c)]:.2f}</td>'
            if (r, c) in cells else "<td></td>" for c in cols)
        body += f"<tr><th>{html.escape(r)}</th>{tds}</tr>"
    return f'<table class="heat"><tr><th>parameter \\ layer</th>{head}</tr>{body}</table>'


def render(run_dir: str | Path) -> str:
    from evomerge.run_commands import run_status
    from evomerge.results import open_run

    info = run_status(Path(run_dir))
    run = open_run(run_dir)
    try:
        objs = run.objectives
        first = objs[0]
        df = run.frame(genomes=False)
        values = [float(v) if s == "ok" else float("nan") for v, s in zip(df[first.name], df.status)]
        parts = [f"<h2>Best {html.escape(first.name)} so far ({first.direction})</h2>",
                 best_so_far_svg(values, run.best_so_far(), first.name)]
        ok = run._ok()
        if len(objs) >= 2 and len(ok):
            front = set(run.pareto().id)
            parts += [f"<h2>Pareto front ({len(front)} of {len(ok)} candidates)</h2>",
                      pareto_svg([float(v) for v in ok[objs[0].name]], [float(v) for v in ok[objs[1].name]],
                                 [i in front for i in ok.id], objs[0].name, objs[1].name,
                                 [f"candidate {i}" for i in ok.id])]
        if len(ok):
            best = run.best()
            cid = int(best["id"])
            names = run.store.space_names
            x = run.store.candidates([cid])[cid].x
            try:
                recipe = run.recipe(cid)
            except UserError:  # a plain-box search: show the genome itself
                recipe = None
            grid = recipe_grid(recipe) if recipe is not None else ([], [], {})
            if not grid[2]:
                grid = genome_grid(names or [f"x{i}" for i in range(len(x))], x)
            parts += [f"<h2>Best candidate {cid}: its recipe per layer</h2>", heatmap_html(*grid)]
            if recipe is not None:
                parts += ["<h2>Its recipe</h2>", f"<pre>{html.escape(recipe.to_yaml())}</pre>"]
    finally:
        run.close()
    best_lines = "".join(f"<li>{html.escape(k)} ({b['direction']}): {b['value']:.6g} (candidate {b['candidate']})</li>"
                         for k, b in info["best"].items())
    summary = (f"<p>{info['evaluations']} evaluations, {info['failed']} failed, {info['in_flight']} in flight; "
               f"Pareto front {info['pareto_size']}; hypervolume {info['hypervolume']}; last stop: "
               f"{html.escape(str(info['last_stop']))}; examples scored {info['scoring']['examples']:.0f} "
               f"({info['scoring']['stopped']} stopped by racing, {info['scoring']['estimated']} estimated)</p>"
               f"<ul>{best_lines}</ul>")
    style = ("body{font-family:sans-serif;max-width:900px;margin:2em auto}table.heat{border-collapse:collapse;font-size:11px}"
             "table.heat td,table.heat th{border:1px solid #ddd;padding:3px 5px;text-align:center}"
             "pre{background:#f6f6f6;padding:1em;overflow:auto}")
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>evomerge run {html.escape(str(run_dir))}</title>"
            f"<style>{style}</style></head><body><h1>evomerge run {html.escape(str(run_dir))}</h1>{summary}"
            + "".join(parts) + "</body></html>")


def write_report(run_dir: str | Path, out: str | Path) -> None:
    text = render(run_dir)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".partial")
    tmp.write_text(text)
    tmp.replace(out)
