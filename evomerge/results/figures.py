"""The plots of a run, as plotly figures, shared by `evomerge report` and the notebook explorer.

Plotly because it is what optuna's visualization (the search library users of a black-box optimizer know)
draws with: one figure object renders as an offline HTML div with its JavaScript embedded, and as a live
`FigureWidget` in Jupyter, so the report and the notebook show the very same plots, with zoom and hover.
"""
from __future__ import annotations

import math
import re
from typing import Any

import numpy as np

from evomerge.recipe import Recipe

_LAYER = re.compile(r"(?:^|[._/])layers?[._]?(\d+(?:-\d+)?)(?=[._/]|$)")
PARALLEL_DIMS = 24  # more axes than this are unreadable: an evenly spaced choice of the genome's dimensions
SUMMARY_DIMS = 6  # coordinates a plain-box genome shows in a hover label
HEATMAP_ROWS = 64  # parameters a heatmap shows
WEBGL_POINTS = 5000  # more markers than this draw with WebGL: as SVG nodes they take a browser many seconds
PARALLEL_ROWS = 1000  # lines drawn: the front plus an even sample of the rest (each line costs every axis)


def fmt(v: Any) -> str:
    """A number as people read it: 4 significant digits (hypervolume 0.1507, not 0.15071356666666702)."""
    if isinstance(v, bool) or not isinstance(v, (int, float, np.floating, np.integer)):
        return str(v)
    return f"{v:.4g}" if math.isfinite(v) else str(v)


def genome_summary(head: list[float], dims: int) -> str:
    """One line for a hover label of a plain-box genome: its first coordinates."""
    more = f", … ({dims} dims)" if dims > len(head) else ""
    return "x = [" + ", ".join(fmt(v) for v in head) + more + "]"


def recipe_summary(recipe: Recipe) -> str:
    """One line for a hover label: the method and each source's numeric parameters (a per-layer list as its
    mean, marked ~)."""
    parts = []
    for ref in recipe.models:
        if not isinstance(ref.model, str):
            parts.append("(nested recipe)")
            continue
        vals = []
        for name, v in ref.parameters.items():
            if isinstance(v, list) and v and all(isinstance(e, (int, float)) and not isinstance(e, bool) for e in v):
                vals.append(f"{name} ~{fmt(sum(v) / len(v))}")
            elif isinstance(v, (int, float)) and not isinstance(v, bool):
                vals.append(f"{name} {fmt(v)}")
        parts.append(f"{ref.model}: {', '.join(vals)}" if vals else ref.model)
    if recipe.path:
        parts.append(f"path of {len(recipe.path)} layers")
    return f"{recipe.merge_method}: " + "; ".join(parts)


def history_figure(df, objectives) -> "Any":
    """Every evaluation's value per objective (a row each) and the best so far, against the evaluation number."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    n = len(objectives)
    fig = make_subplots(rows=n, cols=1, shared_xaxes=True, vertical_spacing=0.08,
                        subplot_titles=[f"{o.name} ({o.direction})" for o in objectives])
    number = np.arange(1, len(df) + 1)
    ok = (df.status == "ok").to_numpy()
    for row, o in enumerate(objectives, start=1):
        v = df[o.name].to_numpy(dtype=float)
        good = ok & np.isfinite(v)
        signed = np.where(good, v * o.sign(), -np.inf)
        best = np.maximum.accumulate(signed) * o.sign() if len(v) else v
        best = np.where(np.isfinite(best), best, np.nan)
        fig.add_trace(_scatter(int(good.sum()))(x=number[good], y=v[good], mode="markers", name=f"{o.name}: evaluation",
                                 marker=dict(size=4, color="#8fa9bf"), customdata=df.id.to_numpy()[good],
                                 hovertemplate="evaluation %{x}<br>candidate %{customdata}<br>"
                                               f"{o.name} %{{y:.4g}}<extra></extra>"), row=row, col=1)
        fig.add_trace(go.Scatter(x=number, y=best, mode="lines", name=f"{o.name}: best so far", line=dict(color="#c33"),
                                 hovertemplate=f"evaluation %{{x}}<br>best {o.name} %{{y:.4g}}<extra></extra>"),
                      row=row, col=1)
    fig.update_xaxes(title_text="evaluation", row=n, col=1)
    fig.update_layout(height=260 * n + 60, margin=dict(t=40, b=40), showlegend=False)
    return fig


def curves_figure(searches: dict[str, tuple[list[float], list[float]]], objective) -> "Any":
    """Each search's best so far on `objective` (name -> (best after each evaluation, examples scored after each)),
    against evaluations; a button redraws them against examples scored, the cost when racing or subsets score
    some candidates on fewer examples."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for name, (best, _) in searches.items():
        fig.add_trace(go.Scatter(x=np.arange(1, len(best) + 1), y=best, mode="lines", name=name,
                                 hovertemplate=f"{name}<br>%{{x:.4g}}<br>best {objective.name} %{{y:.4g}}<extra></extra>"))
    axes = [("evaluations", [np.arange(1, len(b) + 1) for b, _ in searches.values()]),
            ("examples scored", [np.asarray(e) for _, e in searches.values()])]
    fig.update_layout(xaxis_title="evaluations", yaxis_title=f"best {objective.name} ({objective.direction})",
                      height=420, margin=dict(t=50), legend=dict(orientation="h", y=-0.2),
                      updatemenus=[dict(type="buttons", direction="right", x=0, y=1.15, xanchor="left",
                                        buttons=[dict(label=label, method="update",
                                                      args=[{"x": xs}, {"xaxis.title.text": label}])
                                                 for label, xs in axes])])
    return fig


def pareto_figure(ok, front_ids: set[int], objectives, labels: dict[int, str], xo: str | None = None,
                  yo: str | None = None) -> "Any":
    """The successful candidates on two objectives (default: the first two), the front in red; hover: id,
    every objective, the recipe summary. `customdata` carries the candidate id, for clicks in the notebook."""
    import plotly.graph_objects as go

    xo = xo or objectives[0].name
    yo = yo or objectives[min(1, len(objectives) - 1)].name
    fig = go.Figure()
    on_front = ok.id.isin(front_ids).to_numpy()
    for name, mask, color, size in (("others", ~on_front, "#8fa9bf", 6), ("Pareto front", on_front, "#c33", 9)):
        part = ok[mask]
        values = [part[o.name].to_numpy(dtype=float) for o in objectives]
        text = ["<br>".join([f"candidate {cid}", *(f"{o.name} = {fmt(v[k])}" for o, v in zip(objectives, values)),
                             labels.get(cid, "")])
                for k, cid in enumerate(int(i) for i in part.id)]
        fig.add_trace(_scatter(len(ok))(x=part[xo], y=part[yo], mode="markers", name=name, text=text,
                                 customdata=part.id.to_numpy(), hovertemplate="%{text}<extra></extra>",
                                 marker=dict(color=color, size=size, line=dict(width=0.5, color="#333"))))
    fig.update_layout(xaxis_title=xo, yaxis_title=yo, height=480, margin=dict(t=30), hoverlabel=dict(align="left"))
    return fig


def _scatter(points: int):
    import plotly.graph_objects as go

    return go.Scattergl if points > WEBGL_POINTS else go.Scatter


def hypervolume_figure(history: list[float]) -> "Any":
    import plotly.graph_objects as go

    fig = go.Figure(go.Scatter(x=np.arange(1, len(history) + 1), y=history, mode="lines", line=dict(color="#36c"),
                               hovertemplate="evaluation %{x}<br>hypervolume %{y:.4g}<extra></extra>"))
    fig.update_layout(xaxis_title="evaluation", yaxis_title="hypervolume", height=320, margin=dict(t=30))
    return fig


def parallel_dims(names: list[str]) -> list[int]:
    """The genome dimensions given an axis: all, or PARALLEL_DIMS evenly spaced ones."""
    if len(names) <= PARALLEL_DIMS:
        return list(range(len(names)))
    return sorted({int(round(i)) for i in np.linspace(0, len(names) - 1, PARALLEL_DIMS)})


def parallel_rows(ok, front_ids: set[int]) -> list[int]:
    """Candidate ids drawn as lines: all, or the front plus an even sample of the others, PARALLEL_ROWS in all."""
    ids = [int(i) for i in ok.id]
    if len(ids) <= PARALLEL_ROWS:
        return ids
    front = [i for i in ids if i in front_ids][:PARALLEL_ROWS]
    rest = [i for i in ids if i not in front_ids]
    take = np.linspace(0, len(rest) - 1, PARALLEL_ROWS - len(front)).round().astype(int) if rest else []
    return front + [rest[k] for k in sorted(set(take))]


def parallel_figure(ok, genomes: np.ndarray, names: list[str], objectives) -> "Any":
    """One line per candidate (rows of `ok` matching `genomes`) across the genome's named dimensions and the
    objectives, colored by the first objective."""
    import plotly.graph_objects as go

    first = objectives[0]
    dims = [dict(label=_short(n), values=genomes[:, k], tickformat=".3g") for k, n in enumerate(names)]
    dims += [dict(label=o.name, values=ok[o.name].to_numpy(dtype=float), tickformat=".4g") for o in objectives]
    color = ok[first.name].to_numpy(dtype=float)
    fig = go.Figure(go.Parcoords(dimensions=dims, line=dict(color=color, colorscale="Viridis",
                                                              reversescale=first.direction == "min",
                                                              showscale=True, colorbar=dict(title=first.name))))
    fig.update_layout(height=460, margin=dict(l=60, r=60, t=60, b=30))
    return fig


def _short(name: str, width: int = 18) -> str:
    return name if len(name) <= width else "…" + name[-(width - 1):]


def genome_grid(names: list[str], x: list[float]) -> tuple[list[str], list[str], dict[tuple[str, str], float]]:
    """Split genome coordinates into a (parameter, layer) grid: a `layer(s)_N` or `layer(s)_N-M` part of a
    name is its layer column, the rest its row."""
    rows: dict[str, None] = {}  # ordered sets: 19,210 flat parameters must not cost a list search each
    cols: dict[str, None] = {}
    cells: dict[tuple[str, str], float] = {}
    for name, v in zip(names, x):
        m = _LAYER.search(name)
        col = m.group(1) if m else "all"
        row = ((name[: m.start()] + "." + name[m.end():]).strip("._") if m else name) or name
        rows[row] = cols[col] = None
        cells[(row, col)] = v
    return list(rows), sorted(cols, key=_col_key), cells


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


def candidate_grid(recipe: Recipe | None, names: list[str], x: list[float]):
    """What the heatmap shows for a candidate: its recipe's parameters per layer, else its genome's."""
    grid = recipe_grid(recipe) if recipe is not None else ([], [], {})
    return grid if grid[2] else genome_grid(names or [f"x{i}" for i in range(len(x))], x)


def heatmap_figure(rows: list[str], cols: list[str], cells: dict[tuple[str, str], float], title: str = "") -> "Any":
    """Parameters (rows) by layer (columns), the value written in each cell; an empty cell has no value."""
    import plotly.graph_objects as go

    if len(rows) > HEATMAP_ROWS:  # e.g. a genome of flat parameters: 19,210 rows would be 650,000 pixels high
        title = f"{title + ': ' if title else ''}the first {HEATMAP_ROWS} of {len(rows)} rows"
        rows = rows[:HEATMAP_ROWS]
    z = [[cells.get((r, c)) for c in cols] for r in rows]
    text = [[fmt(v) if v is not None else "" for v in line] for line in z]
    fig = go.Figure(go.Heatmap(z=z, x=[f"layer {c}" if c != "all" else "all" for c in cols], y=rows, text=text,
                               texttemplate="%{text}", colorscale="RdBu", reversescale=True,
                               hovertemplate="%{y}<br>%{x}: %{z:.4g}<extra></extra>", xgap=1, ygap=1))
    fig.update_layout(title=title or None, height=max(220, 34 * len(rows) + 120), margin=dict(t=50 if title else 20),
                      yaxis=dict(autorange="reversed"))
    return fig


def holdout_frame(result: dict[str, Any]):
    """The held-out table as a DataFrame: a row per model (baselines, the evolved best and whatever else the
    table holds), a column per measure, read generically so new rows or columns show up as they are."""
    import pandas as pd

    rows = result.get("rows", {})
    columns = list(dict.fromkeys(c for r in rows.values() for c in r))
    return pd.DataFrame([[r.get(c) for c in columns] for r in rows.values()], index=list(rows), columns=columns)


def holdout_html(result: dict[str, Any]) -> str:
    """The held-out table as HTML: values ×100 when the run says percent, the best per numeric column bold,
    the table's other facts (seed, best candidate, ...) in its caption."""
    import html

    df = holdout_frame(result)
    percent = bool(result.get("percent", True))  # as `evomerge holdout` prints it
    tops = {}
    for c in df.columns:
        nums = [v for v in df[c] if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]
        tops[c] = max(nums) if nums else None

    def cell(v: Any, c: str) -> str:
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return "<td></td>"
        num = isinstance(v, (int, float)) and not isinstance(v, bool)
        text = html.escape(f"{v * 100:.1f}" if num and percent else fmt(v))
        return f"<td><b>{text}</b></td>" if num and v == tops[c] else f"<td>{text}</td>"

    head = "".join(f"<th>{html.escape(str(c))}{' %' if percent else ''}</th>" for c in df.columns)
    body = "".join(f"<tr><th>{html.escape(str(name))}</th>{''.join(cell(v, c) for v, c in zip(row, df.columns))}</tr>"
                   for name, row in zip(df.index, df.itertuples(index=False)))
    facts = "; ".join(f"{html.escape(str(k))} {html.escape(fmt(v))}" for k, v in result.items()
                      if k not in ("rows", "percent") and not isinstance(v, (dict, list)))
    return (f'<table id="holdout" class="holdout"><caption>{facts}</caption>'
            f"<thead><tr><th>model</th>{head}</tr></thead><tbody>{body}</tbody></table>")
