"""Optuna samplers behind the ask/tell protocol: an in-memory study used through `study.ask` / `study.tell`.

Options: `sampler` ("tpe", "cmaes", "nsga2"; multi-objective studies need "tpe" or "nsga2"),
`sampler_options` (passed to the sampler's constructor).

Not generational: `ask(n)` always returns n trials. Failures are told to Optuna as FAIL trials, which its
samplers skip; the study then samples elsewhere (no penalty value is invented). Dimensions are named
x0, x1, ... in the study.
"""
from __future__ import annotations

import pickle
from typing import Any, Sequence

import numpy as np

from evomerge.optimizers.base import Optimizer
from evomerge.records import Evaluation, Objective, UserError

SAMPLERS = ("tpe", "cmaes", "nsga2")


class OptunaSampler(Optimizer):
    def __init__(
        self,
        *,
        bounds: Any,
        objectives: Sequence[Objective],
        seed: int,
        x0: Any = None,
        sampler: str = "tpe",
        sampler_options: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(bounds=bounds, objectives=objectives, seed=seed, x0=x0)
        import optuna

        if sampler not in SAMPLERS:
            raise UserError(f"unknown optuna sampler {sampler!r}; valid: {', '.join(SAMPLERS)}")
        if sampler == "cmaes" and len(self.objectives) > 1:
            raise UserError("optuna's cmaes sampler optimises one objective; for several use tpe or nsga2")
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        opts = dict(sampler_options or {})
        cls = {"tpe": optuna.samplers.TPESampler, "cmaes": optuna.samplers.CmaEsSampler, "nsga2": optuna.samplers.NSGAIISampler}[sampler]
        if sampler == "cmaes" and self.x0 is not None:
            opts.setdefault("x0", {f"x{i}": float(v) for i, v in enumerate(self.x0)})
        self._study = optuna.create_study(
            sampler=cls(seed=self.seed, **opts),
            directions=["maximize" if o.direction == "max" else "minimize" for o in self.objectives],
        )
        if self.x0 is not None and sampler != "cmaes":
            self._study.enqueue_trial({f"x{i}": float(v) for i, v in enumerate(self.x0)})
        self._space = {f"x{i}": optuna.distributions.FloatDistribution(float(lo), float(hi)) for i, (lo, hi) in enumerate(self.bounds)}
        self._trials: dict[int, int] = {}  # candidate id -> trial number

    def _ask(self, n: int):
        out = []
        for k in range(n):
            trial = self._study.ask(self._space)
            self._trials[self._next_id + k] = trial.number
            out.append((np.array([trial.params[f"x{i}"] for i in range(self.dim)]), {"trial": trial.number}))
        return out

    def tell(self, evaluations: Sequence[Evaluation]) -> None:
        from optuna.trial import TrialState

        for ev in evaluations:
            number = self._trials.pop(ev.candidate_id, None)
            if number is None:
                continue  # not pending: a replayed or unknown result
            losses = self.losses(ev)
            if losses is None:
                self._study.tell(number, state=TrialState.FAIL)
            else:
                values = [float(-o.sign() * v) for o, v in zip(self.objectives, losses)]
                self._study.tell(number, values if len(values) > 1 else values[0])

    def progress(self) -> dict[str, float]:
        done = [t for t in self._study.trials if t.values is not None]
        if not done or len(self.objectives) > 1:
            return {"trials": float(len(self._study.trials))}
        return {"trials": float(len(self._study.trials)), "best_loss": float(-self.objectives[0].sign() * self._study.best_value)}

    def _state(self) -> dict[str, Any]:
        return {"blob": pickle.dumps((self._study, self._trials))}

    def _load(self, state: dict[str, Any]) -> None:
        self._study, self._trials = pickle.loads(state["blob"])
