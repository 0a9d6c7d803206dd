"""CMA-ES on the `cma` package (Hansen), in normalised coordinates: each dimension's range maps to [0, 1],
so `sigma0` is a fraction of every range (Sakana's parameter-space search: start 0.5, σ = 1/6).

Options: `sigma0` (default 0.2), `popsize` (default cma's 4 + ⌊3 ln d⌋), `diagonal` (separable CMA-ES:
linear time and memory; default on above 500 dimensions, where a full covariance costs d² memory and
d³ eigendecompositions), `restarts` (IPOP: on cma's own stop, restart from a random point with the
population doubled, at most this many times), `step_size` ("csa": cumulative step-size adaptation, "tpa":
two-point adaptation, default cma's own choice, which is TPA from a few hundred dimensions up; on the
19,210-dimensional digits problem TPA shrank σ 50-fold within 8k evaluations and stalled where CSA kept
climbing: benchmarks/m2n2_digits.py), `cma_options` (passed to cma as they are).

The start (x0, a space's untuned recipe) is injected into the first generation, so it is scored first and told like
any other member (cma's `inject`): a search never skips the merge it started from.

Generational: `ask` hands out the current generation in pieces and returns [] once it is all out; the
generation is told to cma when every member has a result. Failures (failed, NaN) get a penalty worse than
every loss seen so far, so they rank last; cma is rank based, so the size of the penalty does not matter.
A generation where every member failed is not told at all: a fresh one is asked instead.
cma samples through its `randn` option, which we bind to a RandomState of our own (it is pickled with the
strategy, so a resumed run continues the same stream); the few places where cma calls np.random directly
run with our own global state swapped in. Runs are deterministic given the seed and isolated from other
users of np.random.
"""
from __future__ import annotations

import pickle
from typing import Any, Sequence

import numpy as np

from evomerge.optimizers.base import Optimizer, check_population, penalise
from evomerge.optimizers.generation import Generation
from evomerge.records import Evaluation, UserError

DIAGONAL_ABOVE = 500
STEP_SIZES = ("csa", "tpa")


class CMAES(Optimizer):
    def __init__(
        self,
        *,
        sigma0: float = 0.2,
        popsize: int | None = None,
        diagonal: bool | None = None,
        restarts: int = 0,
        step_size: str | None = None,
        cma_options: dict[str, Any] | None = None,
        **problem: Any,  # bounds, objectives, seed, x0: the base Optimizer's
    ) -> None:
        super().__init__(**problem)
        if not 0 < sigma0 <= 1:
            raise UserError(f"sigma0 is a fraction of each range: need 0 < sigma0 <= 1, got {sigma0}")
        self.sigma0 = float(sigma0)
        self.popsize = None if popsize is None else check_population("popsize", popsize)
        self.diagonal = self.dim > DIAGONAL_ABOVE if diagonal is None else bool(diagonal)
        self.restarts = int(restarts)
        if step_size is not None and step_size not in STEP_SIZES:
            raise UserError(f"step_size {step_size!r} is not valid; use one of {', '.join(STEP_SIZES)} (or leave it to cma)")
        self.step_size = step_size
        self.cma_options = dict(cma_options or {})
        self._np_state = np.random.RandomState(self.seed).get_state()
        self._run = 0  # restart counter
        self._worst: float | None = None
        self._generation_index = 0
        self._failed_generations = 0
        self._es = self._new_es(self._u(self.x0) if self.x0 is not None else np.full(self.dim, 0.5), self.popsize)
        if self.x0 is not None:  # the start itself (a space's untuned recipe) is the first candidate, told like any other
            self._es.inject([self._u(self.x0)], force=True)
        self._gen: Generation | None = None

    # normalised coordinates
    def _u(self, x: np.ndarray) -> np.ndarray:
        return (x - self.bounds[:, 0]) / (self.bounds[:, 1] - self.bounds[:, 0])

    def _x(self, u: np.ndarray) -> np.ndarray:
        return self.clip(self.bounds[:, 0] + np.asarray(u) * (self.bounds[:, 1] - self.bounds[:, 0]))

    def _with_rng(self, fn, *args):
        """Call into cma with our numpy global state swapped in."""
        outer = np.random.get_state()
        np.random.set_state(self._np_state)
        try:
            return fn(*args)
        finally:
            self._np_state = np.random.get_state()
            np.random.set_state(outer)

    def _new_es(self, u0: np.ndarray, popsize: int | None):
        import cma
        from cma.sigma_adaptation import CMAAdaptSigmaCSA, CMAAdaptSigmaTPA

        opts: dict[str, Any] = {
            "bounds": [0.0, 1.0],
            "randn": np.random.RandomState([self.seed, self._run]).randn,
            "seed": float("nan"),  # we seed through randn
            "verbose": -9,
            "CMA_diagonal": self.diagonal,
            **self.cma_options,
        }
        if popsize is not None:
            opts["popsize"] = popsize
        if self.step_size is not None:
            opts["AdaptSigma"] = {"csa": CMAAdaptSigmaCSA, "tpa": CMAAdaptSigmaTPA}[self.step_size]
        return self._with_rng(cma.CMAEvolutionStrategy, u0, self.sigma0, opts)

    def _ask(self, n: int):
        if self._gen is None:
            if self.done:
                return []
            xs = np.asarray(self._with_rng(self._es.ask), dtype=float)
            self._gen = Generation(xs=xs, index=self._generation_index)
        rows = self._gen.take(n)
        out = []
        for k, r in enumerate(rows):
            self._gen.bind(self._next_id + k, r)
            out.append((self._x(self._gen.xs[r]), {"generation": self._gen.index, "restart": self._run}))
        return out

    def tell(self, evaluations: Sequence[Evaluation]) -> None:
        for ev in evaluations:
            if self._gen is not None:
                self._gen.record(ev.candidate_id, self.loss(ev))
        if self._gen is None or not self._gen.complete:
            return
        raw = self._gen.ordered()
        if all(v is None for v in raw):
            # nothing learned: telling cma equal penalties would only trip its flat-fitness stop; re-ask
            self._gen = None
            self._failed_generations += 1
            return
        values = penalise(raw, self._worst)
        finite = [v for v in raw if v is not None]
        if finite:
            self._worst = max(finite + ([self._worst] if self._worst is not None else []))
        self._with_rng(self._es.tell, list(self._gen.xs), values)
        self._gen = None
        self._generation_index += 1
        if self._es.stop() and self._run < self.restarts:
            self._run += 1
            rng = np.random.default_rng([self.seed, self._run])
            self._es = self._new_es(rng.random(self.dim), self._es.popsize * 2)

    @property
    def done(self) -> bool:
        return self._gen is None and bool(self._es.stop()) and self._run >= self.restarts

    def _state(self) -> dict[str, Any]:
        return {"blob": pickle.dumps((self._es, self._gen, self._np_state, self._run, self._worst, self._generation_index, self._failed_generations))}

    def _load(self, state: dict[str, Any]) -> None:
        (self._es, self._gen, self._np_state, self._run, self._worst, self._generation_index, self._failed_generations) = pickle.loads(state["blob"])
        _rehash(self._es.sent_solutions)


def _rehash(solutions: Any) -> None:
    """cma finds the genotype of each told solution in `sent_solutions`, keyed by hash(x.tobytes()), which Python
    salts per process: unpickled in another process (a resumed run) the keys match nothing, and a generation
    asked before the snapshot and told after it was updated with its clipped phenotypes instead. Rekey them."""
    old = dict(solutions.data)
    unhashed, same = dict(solutions._unhashed_keys), dict(solutions.data_with_same_key)
    solutions.data.clear()
    solutions._unhashed_keys.clear()
    solutions.data_with_same_key.clear()
    for k, value in old.items():
        x = unhashed.get(k, k)
        key = solutions.key(x)
        solutions.data[key] = value
        solutions._unhashed_keys[key] = x
        if k in same:
            solutions.data_with_same_key[key] = same[k]
