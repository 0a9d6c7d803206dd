"""NSGA-II on pymoo's ask/tell interface: any number of objectives, optional inequality constraints.

Options: `popsize` (default 20), `constraints` (names of measured values in `Evaluation.objectives` that
must be <= 0 to be feasible; pymoo's convention).

Generational like CMA-ES: `ask` hands the offspring out in pieces and returns [] until every member of the
generation has a result. Failures (failed, NaN, a missing objective or constraint) get, per objective, a
loss worse than every loss seen so far, so they are dominated and leave the population.
"""
from __future__ import annotations

import pickle
from typing import Any, Sequence

import numpy as np

from evomerge.optimizers.base import Optimizer, check_population
from evomerge.optimizers.generation import Generation
from evomerge.records import Evaluation


class NSGA2(Optimizer):
    def __init__(
        self,
        *,
        popsize: int = 20,
        constraints: Sequence[str] = (),
        **problem: Any,  # bounds, objectives, seed, x0: the base Optimizer's
    ) -> None:
        super().__init__(**problem)
        from pymoo.algorithms.moo.nsga2 import NSGA2 as PymooNSGA2
        from pymoo.core.problem import Problem
        from pymoo.core.termination import NoTermination

        self.popsize = check_population("popsize", popsize)
        self.constraints = list(constraints)
        m = len(self.objectives)
        problem = Problem(n_var=self.dim, n_obj=m, n_ieq_constr=len(self.constraints), xl=self.bounds[:, 0], xu=self.bounds[:, 1])
        sampling = None
        if self.x0 is not None:
            rng = np.random.default_rng(self.seed)
            sampling = np.vstack([self.x0, rng.uniform(self.bounds[:, 0], self.bounds[:, 1], (self.popsize - 1, self.dim))])
        self._algo = PymooNSGA2(pop_size=self.popsize, **({"sampling": sampling} if sampling is not None else {}))
        self._algo.setup(problem, termination=NoTermination(), seed=self.seed, verbose=False)
        self._pop = None  # the pymoo Population being evaluated
        self._gen: Generation | None = None
        self._worst: np.ndarray | None = None
        self._generations = 0

    def _ask(self, n: int):
        if self._gen is None:
            self._pop = self._algo.ask()
            self._gen = Generation(xs=np.asarray(self._pop.get("X"), dtype=float), index=self._generations)
        rows = self._gen.take(n)
        for k, r in enumerate(rows):
            self._gen.bind(self._next_id + k, r)
        return [(self.clip(self._gen.xs[r]), {"generation": self._gen.index}) for r in rows]

    def _measure(self, ev: Evaluation) -> tuple[np.ndarray, np.ndarray] | None:
        f = self.losses(ev)
        if f is None:
            return None
        try:
            g = np.array([float(ev.objectives[c]) for c in self.constraints])
        except KeyError:
            return None
        return (f, g) if np.all(np.isfinite(g)) else None

    def tell(self, evaluations: Sequence[Evaluation]) -> None:
        for ev in evaluations:
            if self._gen is not None:
                self._gen.record(ev.candidate_id, self._measure(ev))
        if self._gen is None or not self._gen.complete:
            return
        from pymoo.core.evaluator import Evaluator
        from pymoo.problems.static import StaticProblem

        results = self._gen.ordered()
        ok = [r for r in results if r is not None]
        if ok:
            fs = np.array([r[0] for r in ok])
            self._worst = fs.max(axis=0) if self._worst is None else np.maximum(self._worst, fs.max(axis=0))
        base = self._worst if self._worst is not None else np.zeros(len(self.objectives))
        penalty = base + np.maximum(1.0, np.abs(base))
        F = np.array([r[0] if r is not None else penalty for r in results])
        G = np.array([r[1] if r is not None else np.zeros(len(self.constraints)) for r in results]).reshape(len(results), -1)
        kw = {"F": F, **({"G": G} if self.constraints else {})}
        Evaluator().eval(StaticProblem(self._algo.problem, **kw), self._pop)
        self._algo.tell(infills=self._pop)
        self._pop, self._gen = None, None
        self._generations += 1

    def pareto_front(self) -> tuple[np.ndarray, np.ndarray]:
        """The current feasible non-dominated set: (X, objective values in the objectives' own units)."""
        opt = self._algo.opt
        if opt is None or not len(opt):
            return np.empty((0, self.dim)), np.empty((0, len(self.objectives)))
        feasible = opt[opt.get("FEAS").ravel()]
        signs = np.array([-o.sign() for o in self.objectives])
        return np.asarray(feasible.get("X")), np.asarray(feasible.get("F")) * signs

    def _state(self) -> dict[str, Any]:
        return {"blob": pickle.dumps((self._algo, self._pop, self._gen, self._worst, self._generations))}

    def _load(self, state: dict[str, Any]) -> None:
        self._algo, self._pop, self._gen, self._worst, self._generations = pickle.loads(state["blob"])
