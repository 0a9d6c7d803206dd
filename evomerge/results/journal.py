"""Reading a run's results: a pandas view for notebooks, the Pareto front, the best candidate, hypervolume.

`evomerge.open_run(run_dir)` opens the store read-only, so a notebook can watch a run that is still going.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from evomerge.records import Objective, UserError
from evomerge.recipe import Recipe
from evomerge.optimizers.pareto import hypervolume, nondominated
from evomerge.run.store import BUDGET, LOST_CLUSTER, RunLock, RunStore


def knee(values: np.ndarray) -> int:
    """Index of the knee of the front of `values` (larger is better): each objective scaled to [0, 1] between
    its worst and best value in `values`, the front member whose smallest scaled objective is largest (the
    largest sum breaks a tie, then row order). For two skills it is the merge that keeps the most of its weaker
    skill; a sum of the scaled objectives instead would pick an extreme of a concave front."""
    front = np.flatnonzero(nondominated(values))
    lo, span = values.min(axis=0), np.ptp(values, axis=0)
    scaled = np.where(span > 0, (values[front] - lo) / np.where(span > 0, span, 1.0), 1.0)
    order = np.lexsort((-scaled.sum(axis=1), -scaled.min(axis=1)))  # stable: row order breaks the last ties
    return int(front[order[0]])


class Run:
    """A run directory seen as tables. Columns of `frame()`: id, status, one per objective, error, worker,
    seconds, then the genome as `x.<name>` columns."""

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.store = RunStore.open(run_dir, readonly=True)
        self._frame = None  # (evaluations, frame without genomes) as last read

    @property
    def objectives(self) -> list[Objective]:
        return self.store.objectives

    @property
    def config(self) -> dict[str, Any]:
        return self.store.config

    @property
    def space_names(self) -> list[str]:
        """The genome's coordinate names."""
        return self.store.space_names

    @property
    def sources(self) -> dict[str, dict[str, str]] | None:
        """The sources' identities recorded when the run started."""
        return self.store.sources

    def counts(self) -> dict[str, int]:
        """Evaluations done, failed and in flight."""
        return self.store.counts()

    def sessions(self) -> list[dict[str, Any]]:
        """Each process that drove the search: when it started and ended, and why it stopped."""
        return self.store.sessions()

    def elapsed(self) -> float:
        """Seconds the search has run, over its sessions."""
        return self.store.elapsed()

    def evaluations(self, per_example: bool = False) -> list:
        return self.store.evaluations(per_example=per_example)

    def recipes(self, ids) -> dict[int, Recipe]:
        return self.store.recipes(ids)

    def genomes(self, ids, columns=None):
        """The genomes of candidates `ids` (only coordinates `columns` when given), as rows."""
        return self.store.genomes(ids, columns)

    def frame(self, genomes: bool = True):
        """With `genomes=False`, no `x.<name>` columns: a run of 10,000 evaluations of 19,210 dimensions
        would need tens of GB as a frame, so best/pareto select rows first and add their genomes after."""
        import pandas as pd

        n = self.store.counts()["evaluations"]
        if self._frame is None or self._frame[0] != n:  # re-read only when the run has new evaluations
            objs = self.objectives
            rows = []
            for e in self.store.evaluations(per_example=False):
                row: dict[str, Any] = {"id": e.candidate_id, "status": e.status}
                for o in objs:
                    row[o.name] = e.objectives.get(o.name, float("nan"))
                row.update(error=e.error, worker=e.worker, seconds=sum(e.timings.values()))
                rows.append(row)
            cols = ["id", "status", *[o.name for o in objs], "error", "worker", "seconds"]
            self._frame = (n, pd.DataFrame(rows, columns=cols))
        df = self._frame[1].copy()
        return self._with_genomes(df) if genomes else df

    def _with_genomes(self, df):
        """`df` with the `x.<name>` columns of its rows' genomes, read for those rows only."""
        import pandas as pd

        cands = self.store.candidates({int(i) for i in df.id})
        xs = [list(cands[int(i)].x) for i in df.id]
        names = self.store.space_names
        width = len(xs[0]) if xs else 0
        x = pd.DataFrame(xs, index=df.index, columns=[f"x.{names[i] if i < len(names) else i}" for i in range(width)])
        return pd.concat([df, x], axis=1)

    def successes(self):
        """The successful evaluations (every objective finite), without genome columns."""
        df = self.frame(genomes=False)
        names = [o.name for o in self.objectives]
        ok = df[(df.status == "ok")]
        return ok[np.isfinite(ok[names].to_numpy(dtype=float)).all(axis=1)] if len(ok) else ok

    def signed(self, df) -> np.ndarray:
        """Objective values of `df` with every column turned larger-is-better."""
        return np.column_stack([df[o.name].to_numpy(dtype=float) * o.sign() for o in self.objectives])

    def pareto(self):
        """The successful evaluations no other one dominates, over all objectives."""
        ok = self.successes()
        return self._with_genomes(ok[nondominated(self.signed(ok))] if len(ok) else ok)

    def best(self, objective: str | None = None, genomes: bool = True):
        """The row of the best successful evaluation on `objective`; by default the run's own best (its config's
        `best`: the first objective, or the knee of the front). Without its `x.<name>` columns with
        `genomes=False` (a frame of 19,210 columns costs seconds to build)."""
        ok = self.successes()
        if not len(ok):
            raise UserError(f"{self.run_dir} has no successful evaluation yet")
        if objective is None and self.config.get("best") == "knee":
            row = ok.iloc[[knee(self.signed(ok))]]
        else:
            obj = self._objective(objective)
            row = ok.loc[[(ok[obj.name] * obj.sign()).idxmax()]]
        return (self._with_genomes(row) if genomes else row).iloc[0]

    def best_history(self) -> list[int | None]:
        """The run's best candidate by its own rule (`best()`) after each evaluation in commit order, None before
        the first success: what a user stopping the run there would have got (the learning curves' x axis)."""
        df, ok = self.frame(genomes=False), self.successes()
        vals, ids = self.signed(ok), ok.id.to_numpy()
        at = {row: k for k, row in enumerate(ok.index)}
        by_knee = self.config.get("best") == "knee"
        seen: list[int] = []
        out: list[int | None] = []
        for row in df.index:
            if row in at:
                seen.append(at[row])
            if not seen:
                out.append(None)
                continue
            v = vals[seen]
            out.append(int(ids[seen[knee(v) if by_knee else int(np.argmax(v[:, 0]))]]))
        return out

    def best_rule(self) -> str:
        """How `best()` picks by default, in words."""
        if self.config.get("best") == "knee":
            return "the knee of the front over " + ", ".join(o.name for o in self.objectives)
        return f"best on {self.objectives[0].name}"

    def _objective(self, name: str | None) -> Objective:
        objs = self.objectives
        if name is None:
            return objs[0]
        for o in objs:
            if o.name == name:
                return o
        raise UserError(f"no objective {name!r} in this run; objectives: {', '.join(o.name for o in objs)}")

    def recipe(self, candidate_id: int) -> Recipe:
        return self.store.recipe(int(candidate_id))

    def hypervolume(self) -> float | None:
        """Hypervolume of the front (objectives made larger-is-better), the reference point lying 10% of each
        objective's observed range (1.0 where the range is 0) beyond the worst value seen."""
        ok = self.successes()
        if not len(ok):
            return None
        vals = self.signed(ok)
        lo, span = vals.min(axis=0), np.ptp(vals, axis=0)
        ref = lo - 0.1 * np.where(span > 0, span, 10.0)
        return hypervolume(vals[nondominated(vals)], ref)

    def hypervolume_history(self) -> list[float]:
        """The hypervolume after each evaluation, in commit order, all under `hypervolume()`'s final reference
        point so the curve is one comparable measure; the front is kept incrementally (a new point either is
        dominated, or joins and drops what it dominates), so a run of 10,000 evaluations costs well under a second."""
        df = self.frame(genomes=False)
        ok = self.successes()
        if not len(ok):
            return [0.0] * len(df)
        vals = self.signed(ok)
        lo, span = vals.min(axis=0), np.ptp(vals, axis=0)
        ref = lo - 0.1 * np.where(span > 0, span, 10.0)
        by_row = dict(zip(ok.index, vals))
        front, hv, out = vals[:0], 0.0, []
        for i in df.index:
            v = by_row.get(i)
            if v is not None and not np.all(front >= v, axis=1).any():
                front = np.vstack([front[~np.all(v >= front, axis=1)], v])
                hv = hypervolume(front, ref)
            out.append(hv)
        return out

    def best_so_far(self, objective: str | None = None) -> list[float]:
        """Best value of `objective` after each evaluation, in commit order (NaN before the first success)."""
        obj = self._objective(objective)
        best, out = float("nan"), []
        for e in self.store.evaluations():
            v = e.objectives.get(obj.name)
            if e.ok and v is not None and (best != best or v * obj.sign() > best * obj.sign()):
                best = v
            out.append(best)
        return out

    def examples_so_far(self) -> list[float]:
        """Examples scored after each evaluation, in commit order: the cost axis of a search that scores some
        candidates on fewer examples (racing, subsets)."""
        return np.cumsum([e.cost.get("examples") or 0.0 for e in self.store.evaluations()]).tolist()

    def close(self) -> None:
        self.store.close()


def open_run(run_dir: str | Path) -> Run:
    """Open a run directory read-only for analysis (notebooks, reports)."""
    return Run(run_dir)


def run_state(holder: str | None, last_stop: str | None) -> str:
    """Running (a live process holds the run's lock), finished (its budget reached), ended by a lost cluster,
    stopped for another reason, or killed (the lock is free, the last session never ended: its process died without a clean stop)."""
    if holder is not None:
        return f"running ({holder})"
    if last_stop is None:
        return "killed (no clean stop; `evomerge resume` continues it)"
    if last_stop.startswith(LOST_CLUSTER):
        return f"ended by a lost cluster ({last_stop}); `evomerge resume` on a running cluster continues it"
    return f"{'finished' if last_stop.startswith(BUDGET) else 'stopped'}, last stop: {last_stop}"


def run_status(run_dir: Path) -> dict[str, Any]:
    """The figures `evomerge status` shows, as plain data."""
    from evomerge.run.frugal import scoring_summary

    run = open_run(run_dir)
    try:
        counts = run.store.counts()
        best: dict[str, Any] = {}
        for o in run.objectives:
            try:
                row = run.best(o.name, genomes=False)
            except UserError:
                continue
            best[o.name] = {"value": float(row[o.name]), "candidate": int(row["id"]), "direction": o.direction}
        hv = run.hypervolume()
        sessions = run.store.sessions()
        holder = RunLock.holder(run_dir)
        return {
            "state": run_state(holder, sessions[-1]["reason"] if sessions else None), "holder": holder,
            **counts, "best": best, "pareto_size": int(len(run.pareto())),
            "hypervolume": None if hv is None or math.isnan(hv) else hv,
            "cost": run.store.total_cost(), "sessions": len(sessions),
            "last_stop": sessions[-1]["reason"] if sessions else None,
            "objectives": [[o.name, o.direction] for o in run.objectives],
            "scoring": scoring_summary(run.store.evaluations(per_example=False), run.store.candidate_meta()),
        }
    finally:
        run.close()
