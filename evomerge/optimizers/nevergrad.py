"""Any optimizer registered in nevergrad, by name (`optimizer="NGOpt"`, "TwoPointsDE", "CMA", "PSO"...).

Options: `optimizer` (default "TwoPointsDE"), `budget` (the evaluation budget nevergrad plans for; some
optimizers choose their strategy from it), `num_workers` (how many candidates may be out at once;
default 1, raise it to the engine's parallelism).

`ask(n)` returns n candidates. Failures are told as a loss worse than every loss seen so far (nevergrad
ranks NaN/inf inconsistently across optimizers, a finite penalty is handled by all of them). Nevergrad
draws from the parametrization's own random state, which we seed, so runs are deterministic.
Known issues: NGOpt's meta-model step fails with numpy >= 2.4 at small budgets (nevergrad 1.0.12 calls
float() on a 1-element array), hence the default; with scipy >= 1.16, optimizers that hand off to scipy (NGOpt, Cobyla, NelderMead, SQP) leave
a thread behind that keeps the process alive; evomerge requires scipy < 1.16.
"""
from __future__ import annotations

import pickle
from typing import Any, Sequence

import numpy as np

from evomerge.optimizers.base import Optimizer, penalise
from evomerge.records import Evaluation, UserError


class Nevergrad(Optimizer):
    def __init__(
        self,
        *,
        optimizer: str = "TwoPointsDE",
        budget: int | None = None,
        num_workers: int = 1,
        **problem: Any,  # bounds, objectives, seed, x0: the base Optimizer's
    ) -> None:
        super().__init__(**problem)
        import nevergrad as ng

        if optimizer not in ng.optimizers.registry:
            close = [n for n in sorted(ng.optimizers.registry) if optimizer.lower() in n.lower()][:10]
            raise UserError(
                f"unknown nevergrad optimizer {optimizer!r}; e.g. NGOpt, CMA, TwoPointsDE, PSO, OnePlusOne"
                + (f"; close: {', '.join(close)}" if close else "")
            )
        init = self.x0 if self.x0 is not None else self.bounds.mean(axis=1)
        # lower/upper (not set_bounds) also scale the step size to a sixth of each range
        param = ng.p.Array(init=init, lower=self.bounds[:, 0], upper=self.bounds[:, 1])
        param.random_state.seed(self.seed)
        try:
            self._opt = ng.optimizers.registry[optimizer](parametrization=param, budget=budget, num_workers=int(num_workers))
        except ValueError as e:  # e.g. "does not support parallelization"
            raise UserError(f"nevergrad {optimizer}: {e}") from e
        if self.x0 is not None:
            self._opt.suggest(self.x0)  # the first ask returns x0, whatever the optimizer's own start
        self._pending: dict[int, Any] = {}  # candidate id -> nevergrad candidate
        self._worst: float | None = None

    def _ask(self, n: int):
        out = []
        for k in range(n):
            cand = self._opt.ask()
            self._pending[self._next_id + k] = cand
            out.append((self.clip(np.asarray(cand.value, dtype=float)), {}))
        return out

    def tell(self, evaluations: Sequence[Evaluation]) -> None:
        for ev in evaluations:
            cand = self._pending.pop(ev.candidate_id, None)
            if cand is None:
                continue  # not pending: a replayed or unknown result
            v = self.loss(ev)
            if v is not None:
                self._worst = v if self._worst is None else max(self._worst, v)
            self._opt.tell(cand, penalise([v], self._worst)[0])

    def _state(self) -> dict[str, Any]:
        return {"blob": pickle.dumps((self._opt, self._pending, self._worst))}

    def _load(self, state: dict[str, Any]) -> None:
        self._opt, self._pending, self._worst = pickle.loads(state["blob"])
