"""Optuna samplers behind the ask/tell protocol: an in-memory study used through `study.ask` / `study.tell`.

Options: `sampler` ("gp", "tpe", "cmaes", "nsga2"), `sampler_options` (passed to the sampler's constructor).
"gp" is Bayesian optimisation (a Gaussian process and log expected improvement, optuna's GPSampler): the most per
evaluation for budgets of a few hundred, at a cost per ask that grows with the trials told (about 0.7 s at 300 on a
CPU core), nothing beside scoring a merge. Several objectives need "tpe", "nsga2" or "gp" (seconds an ask there).
Whatever the sampler, the start (x0) is the first trial it asks; the user's starts (scored before it) join the
study as finished trials, so its model learns from them.

Not generational: `ask(n)` always returns n trials. Failures are told to Optuna as FAIL trials, which its
samplers skip; the study then samples elsewhere (no penalty value is invented). Dimensions are named
x0, x1, ... in the study. A snapshot holds no optuna object: the study's trials and attributes as plain data and
the sampler's numpy random states, from which a fresh study of the same sampler and seed is rebuilt (a live study
does not pickle in every release: optuna 5.1's GA samplers hold a thread lock). GPSampler also starts each fit of its
kernel from the last one's parameters; the snapshot keeps them as arrays, so a resumed study fits as the first did.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Sequence

import numpy as np

from evomerge.optimizers.base import Optimizer, StateMismatch
from evomerge.records import Evaluation, UserError

SAMPLERS = ("gp", "tpe", "cmaes", "nsga2")


class OptunaSampler(Optimizer):
    def __init__(
        self,
        *,
        sampler: str = "tpe",
        sampler_options: dict[str, Any] | None = None,
        **problem: Any,  # bounds, objectives, seed, x0: the base Optimizer's
    ) -> None:
        super().__init__(**problem)
        import optuna

        if sampler not in SAMPLERS:
            raise UserError(f"unknown optuna sampler {sampler!r}; valid: {', '.join(SAMPLERS)}")
        if sampler == "cmaes" and len(self.objectives) > 1:
            raise UserError("optuna's cmaes sampler optimises one objective; for several use tpe or nsga2")
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        opts = dict(sampler_options or {})
        cls = {"gp": optuna.samplers.GPSampler, "tpe": optuna.samplers.TPESampler, "cmaes": optuna.samplers.CmaEsSampler,
               "nsga2": optuna.samplers.NSGAIISampler}[sampler]
        self._sampler = (cls, opts)
        self._gp = sampler == "gp"
        self._study = self._new_study()
        if self.x0 is not None:  # scored first, whatever the sampler (optuna deprecated cmaes's own x0 in 4.9)
            self._study.enqueue_trial({f"x{i}": float(v) for i, v in enumerate(self.x0)})
        self._space = {f"x{i}": optuna.distributions.FloatDistribution(float(lo), float(hi)) for i, (lo, hi) in enumerate(self.bounds)}
        self._trials: dict[int, int] = {}  # candidate id -> trial number

    def _new_study(self):
        import optuna

        cls, opts = self._sampler
        return optuna.create_study(
            sampler=cls(seed=self.seed, **opts),
            directions=["maximize" if o.direction == "max" else "minimize" for o in self.objectives],
        )

    def _ask(self, n: int):
        out = []
        for k in range(n):
            with _one_torch_thread(self._gp):
                trial = self._study.ask(self._space)
            self._trials[self._next_id + k] = trial.number
            out.append((np.array([trial.params[f"x{i}"] for i in range(self.dim)]), {"trial": trial.number}))
        return out

    def tell(self, evaluations: Sequence[Evaluation]) -> None:
        from optuna.trial import TrialState

        for ev in evaluations:
            start, losses = self.start_of(ev.candidate_id), self.losses(ev)
            values = None if losses is None else [float(-o.sign() * v) for o, v in zip(self.objectives, losses)]
            if start is not None:
                self._add_start(ev.candidate_id, start, values)
                continue
            number = self._trials.pop(ev.candidate_id, None)
            if number is None:
                continue  # not pending: a replayed or unknown result
            if values is None:
                self._study.tell(number, state=TrialState.FAIL)
            else:
                self._study.tell(number, values if len(values) > 1 else values[0])

    def _add_start(self, candidate_id: int, x: np.ndarray, values: list[float] | None) -> None:
        """A user's start, scored: a finished trial of the study (once: a resumed run replays its result)."""
        from optuna.trial import TrialState, create_trial

        key = {"start": candidate_id}
        if any(t.user_attrs == key for t in self._study.get_trials(deepcopy=False)):
            return
        self._study.add_trial(create_trial(
            state=TrialState.FAIL if values is None else TrialState.COMPLETE, values=values,
            params={f"x{i}": float(v) for i, v in enumerate(x)}, distributions=self._space, user_attrs=key))

    def _state(self) -> dict[str, Any]:
        # plain data only (see the module docstring); _load rebuilds the study through optuna's own add_trial
        storage, sid = self._study._storage, self._study._study_id  # what optuna's copy_study reads too
        trials = [{"state": t.state.name, "params": t.params, "values": t.values,
                   "system_attrs": t.system_attrs, "user_attrs": t.user_attrs}
                  for t in self._study.get_trials(deepcopy=False)]
        return {"trials": trials, "study_attrs": storage.get_study_system_attrs(sid),
                "rngs": {path: rng.get_state() for path, rng in _random_states(self._study.sampler)},
                "kernels": _kernels(self._study.sampler), "pending": dict(self._trials)}

    def _load(self, state: dict[str, Any]) -> None:
        from optuna.trial import TrialState, create_trial

        self._study = self._new_study()
        storage, sid = self._study._storage, self._study._study_id
        for key, value in state["study_attrs"].items():
            storage.set_study_system_attr(sid, key, value)
        for t in state["trials"]:
            self._study.add_trial(create_trial(
                state=TrialState[t["state"]], params=t["params"], values=t["values"],
                distributions={k: self._space[k] for k in t["params"]},
                system_attrs=t["system_attrs"], user_attrs=t["user_attrs"]))
        rngs = dict(_random_states(self._study.sampler))
        if set(rngs) != set(state["rngs"]):
            raise StateMismatch("optuna's sampler holds other random states than the snapshot's (another optuna release?)")
        for path, rng in rngs.items():
            rng.set_state(state["rngs"][path])
        _set_kernels(self._study.sampler, state.get("kernels"))  # none in snapshots before the gp sampler
        self._trials = {int(k): int(v) for k, v in state["pending"].items()}


@contextmanager
def _one_torch_thread(needed: bool):
    """GPSampler fits and searches in torch, whose sums change with the thread count: on one thread, a seed gives the
    same search on every machine (a search with the default threads of a 2-core box and one with 1 parted ways)."""
    if not needed:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _kernels(sampler: Any) -> list[tuple[np.ndarray, float, float]] | None:
    """GPSampler's last fitted kernel parameters per objective (the start of its next fit), or None."""
    cache = getattr(sampler, "_gprs_cache_list", None)
    if cache is None:
        return None
    return [(g.inverse_squared_lengthscales.detach().numpy().copy(), float(g.kernel_scale), float(g.noise_var))
            for g in cache]


def _set_kernels(sampler: Any, kernels: list[tuple[np.ndarray, float, float]] | None) -> None:
    if kernels is None:
        return
    import torch
    from optuna._gp.gp import GPRegressor

    if not hasattr(sampler, "_gprs_cache_list"):
        raise StateMismatch("the snapshot holds GP kernel parameters that this optuna's sampler does not keep")
    # only these three are read from the cache (optuna's fit_kernel_params); the training data is the fit's own
    sampler._gprs_cache_list = [
        GPRegressor(is_categorical=torch.zeros(len(ls), dtype=torch.bool), X_train=torch.zeros(1, len(ls), dtype=torch.float64),
                    y_train=torch.zeros(1, dtype=torch.float64), inverse_squared_lengthscales=torch.from_numpy(ls),
                    kernel_scale=torch.tensor(scale, dtype=torch.float64), noise_var=torch.tensor(noise, dtype=torch.float64))
        for ls, scale, noise in kernels]


def _random_states(obj: Any, path: str = "sampler", seen: set[int] | None = None):
    """(attribute path, numpy RandomState) for every random state inside an optuna sampler, each once, in a fixed
    order: a sampler's random state is all of it that its trials and study attributes do not hold."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, np.random.RandomState):
        yield path, obj
        return
    if not type(obj).__module__.startswith("optuna") or not hasattr(obj, "__dict__"):
        return
    for name, value in sorted(vars(obj).items()):
        yield from _random_states(value, f"{path}.{name}", seen)
