"""The notebook's Pareto explorer: the front as a clickable plotly FigureWidget, a dropdown of candidates (front
first), the picked candidate's objectives, recipe, per-layer heatmap and the run's held-out table, and an export
button. The run is opened read-only on each `refresh()`, so it follows a run that is still going.

Everything a click or a widget does goes through `select(candidate_id)` and `export()`, which a test (or a
script) calls directly; the plots are `evomerge.results.figures`', the same as in the HTML report.
"""
from __future__ import annotations

import html
from pathlib import Path

import numpy as np

from evomerge.results import figures
from evomerge.records import UserError


class Explorer:
    def __init__(self, run_dir: str | Path, export_to: str | Path = "exported", x: str | None = None,
                 y: str | None = None):
        import ipywidgets as w
        import plotly.graph_objects as go

        self.run_dir, self.export_to, self.axes = Path(run_dir), Path(export_to), (x, y)
        self.front = go.FigureWidget()
        self.heatmap = go.FigureWidget()
        self.picker = w.Dropdown(description="candidate", layout=w.Layout(width="320px"))
        self.summary = w.HTML()
        self.scores = w.HTML()
        self.recipe = w.HTML()
        self.export_format = w.Dropdown(options=["recipe", "mergekit", "hf"], value="recipe", description="format")
        self.export_button = w.Button(description="export")
        self.export_status = w.HTML()
        self.refresh_button = w.Button(description="refresh")
        self.selected: int | None = None
        self.picker.observe(lambda change: change["new"] is not None and self.select(change["new"]), names="value")
        self.export_button.on_click(self._export_clicked)
        self.refresh_button.on_click(lambda _: self.refresh())
        self.refresh()

    def widget(self):
        import ipywidgets as w

        return w.VBox([w.HBox([self.picker, self.refresh_button]), self.summary, self.front,
                       w.HBox([self.export_format, self.export_button, self.export_status]),
                       self.scores, self.heatmap, self.recipe])

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.widget())

    def refresh(self) -> None:
        """Re-read the run: new evaluations, a new front, the held-out table once it exists."""
        from evomerge.results.holdout import read_table
        from evomerge.results.report import hover_labels
        from evomerge.results.journal import open_run

        run = open_run(self.run_dir)
        try:
            self.objectives = run.objectives
            df = run.frame(genomes=False)
            self.ok = run.successes()
            self.names = run.space_names
            self.holdout = read_table(self.run_dir)
            front = run.pareto() if len(self.ok) else self.ok
            self.front_ids = [int(i) for i in front.id]
            labels = hover_labels(run, [int(i) for i in self.ok.id])
            default = self._closest_to_ideal(run, front)
        finally:
            run.close()
        self.summary.value = (f"{len(df)} evaluations, {int((df.status != 'ok').sum())} failed; objectives: "
                              + ", ".join(f"{o.name} ({o.direction})" for o in self.objectives)
                              + f"; Pareto front: {len(self.front_ids)} candidates")
        fig = figures.pareto_figure(self.ok, set(self.front_ids), self.objectives, labels, *self.axes)
        with self.front.batch_update():
            self.front.data = []
            self.front.layout = fig.layout
            for trace in fig.data:
                self.front.add_trace(trace)
        for trace in self.front.data:
            trace.on_click(self._on_click)
        others = [int(i) for i in self.ok.id if int(i) not in set(self.front_ids)]
        options = [(f"{i} (front)", i) for i in self.front_ids] + [(str(i), i) for i in others]
        keep = self.selected if self.selected in self.front_ids + others else default
        self.picker.options = options
        if keep is not None:
            self.picker.value = keep
            self.select(keep)

    def _closest_to_ideal(self, run, front) -> int | None:
        """The front member nearest the ideal point, each objective scaled by its range on the front."""
        if not len(front):
            return None
        vals = run.signed(front)
        span = np.ptp(vals, axis=0)
        span[span == 0] = 1.0
        return int(front.id.iloc[int(np.argmin(np.linalg.norm((vals.max(axis=0) - vals) / span, axis=1)))])

    def _on_click(self, trace, points, _state) -> None:
        """A click on the front plot picks the candidate under the pointer."""
        if points.point_inds:
            self.picker.value = int(trace.customdata[points.point_inds[0]])

    def select(self, candidate_id: int) -> None:
        """Show candidate `candidate_id`: its objectives, recipe, per-layer heatmap and the held-out table."""
        from evomerge.results.journal import open_run

        cid = int(candidate_id)
        run = open_run(self.run_dir)
        try:
            recipe = run.recipes([cid]).get(cid)
            genomes = run.genomes([cid])
            if not len(genomes):
                raise UserError(f"no candidate {cid} in {self.run_dir}")
            x = list(genomes[0])
        finally:
            run.close()
        self.selected = cid
        row = self.ok[self.ok.id == cid]
        values = ", ".join(f"{o.name} = {figures.fmt(float(row[o.name].iloc[0]))}" for o in self.objectives) if len(row) else ""
        tag = " (on the Pareto front)" if cid in self.front_ids else ""
        self.scores.value = f"<h4>candidate {cid}{tag}</h4><p>{values}</p>" + self._holdout_html(cid)
        self.recipe.value = (f"<pre>{html.escape(recipe.to_yaml())}</pre>" if recipe is not None else
                             f"<p>a plain-box genome: {html.escape(figures.genome_summary(x[:12], len(x)))}</p>")
        fig = figures.heatmap_figure(*figures.candidate_grid(recipe, self.names, x), title=f"candidate {cid} per layer")
        with self.heatmap.batch_update():
            self.heatmap.data = []
            self.heatmap.layout = fig.layout
            self.heatmap.add_trace(fig.data[0])

    def _holdout_html(self, cid: int) -> str:
        if self.holdout is None:
            return "<p>No held-out table yet (it is written when the run reaches its budget).</p>"
        note = ("this candidate is the table's evolved best" if self.holdout.get("best") == cid else
                f"the table's evolved best is candidate {self.holdout.get('best')}; export this one and score it to compare")
        return f"<p>Held-out table ({note}):</p>" + figures.holdout_html(self.holdout)

    def _export_clicked(self, _button) -> None:
        try:
            self.export()
        except UserError as e:  # e.g. a plain-box run: no recipe to write
            self.export_status.value = html.escape(str(e))

    def export(self, fmt: str | None = None) -> list[Path]:
        """Write the picked candidate as `fmt` (default: the format dropdown's) under `export_to`."""
        from evomerge.results.export import export_run

        fmt = fmt or self.export_format.value
        if self.selected is None:
            raise UserError("no candidate picked yet")
        target = self.export_to / (f"candidate_{self.selected}" + {"recipe": ".yaml", "mergekit": ".yml"}.get(fmt, ""))
        written = export_run(self.run_dir, target, fmt=fmt, candidate=self.selected)
        self.export_status.value = "wrote " + ", ".join(html.escape(str(p)) for p in written)
        return written
