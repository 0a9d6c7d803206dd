"""The worker: turns a candidate into an evaluation. Decode the genome to a recipe, hand the recipe to the
model handle (which brings the merged weights in), score it. Any exception becomes a failed Evaluation
with its message: one bad candidate never stops a run.

A fitness may be a scorer from `fitness/` or the user's own function `fn(handle) -> dict | FitnessResult`
(`FunctionFitness`). A run without sources is a plain black-box search: the handle is then a `Genome`
(candidate id, x, names, recipe) for the function to read.
"""
from __future__ import annotations

import inspect
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from evomerge.records import Candidate, Evaluation, Objective
from evomerge.registry import load_callable
from evomerge.recipe import Recipe


@dataclass
class Genome:
    """The handle of a run with no model: what a user fitness function reads."""

    candidate_id: int
    x: list[float]
    names: list[str]
    recipe: Recipe | None = None

    def set_recipe(self, recipe: Recipe | None) -> None:
        self.recipe = recipe


class FunctionFitness:
    """The user's own fitness: a function of the handle returning {objective: value} or a FitnessResult.
    A function taking `examples` (indices into its per-example scores) can be raced or scored on a subset:
    it then returns one per-example score per index; the first objective is read as their mean (the
    others, as the function returns them for the subset)."""

    def __init__(self, fn: Callable[[Any], Any] | str, objectives: Sequence[Objective]):
        from evomerge.fitness.base import FitnessResult  # imported here, once, not inside the first evaluation

        self._result = FitnessResult
        self.fn = load_callable(fn, "fitness function") if isinstance(fn, str) else fn
        self.objectives = list(objectives)

    def evaluate(self, handle: Any, **kw: Any):
        out = self.fn(handle, **kw)
        result = out if isinstance(out, self._result) else self._result(objectives=dict(out))
        return result.check(self.objectives)

    @property
    def scores_subsets(self) -> bool:
        return "examples" in inspect.signature(self.fn).parameters

    def score_examples(self, handle: Any, indices: Sequence[int]):
        from evomerge.fitness.partial import ExampleScores, check_primary

        indices = list(indices)
        result = self.evaluate(handle, examples=indices)
        primary = check_primary(result.per_example, indices, "fitness function")
        first = self.objectives[0]
        values = {o.name: np.full(len(indices), result.objectives[o.name]) for o in self.objectives[1:]}
        values[first.name] = first.sign() * primary
        return ExampleScores(values=values, primary=primary, cost=dict(result.cost))


class Worker:
    """handle + fitness (+ a decoder from genome to recipe). `evaluate` never raises for a bad candidate."""

    def __init__(self, fitness: Any, *, handle: Any = None, decode: Callable[[np.ndarray], Recipe] | None = None,
                 names: Sequence[str] = ()):
        self.fitness, self.handle, self.decode, self.names = fitness, handle, decode, list(names)

    def evaluate(self, candidate: Candidate) -> Evaluation:
        timings: dict[str, float] = {}
        t = time.perf_counter()
        stage = "decode"
        try:
            recipe = self.decode(np.asarray(candidate.x, dtype=float)) if self.decode else None
            timings["decode"] = time.perf_counter() - t
            stage, t = "load weights", time.perf_counter()
            handle = self.handle
            if handle is None:
                handle = Genome(candidate.id, list(candidate.x), self.names, recipe)
            else:
                handle.set_recipe(recipe)
            timings["materialize"] = time.perf_counter() - t
            stage, t = "score", time.perf_counter()
            plan = candidate.meta.get("scoring")  # racing or anchors (evomerge/run/frugal.py)
            if plan:
                from evomerge.fitness.partial import plan_from_json, score_plan

                result = score_plan(self.fitness, handle, plan_from_json(plan))
            else:
                result = self.fitness.evaluate(handle)
            if result.per_example is not None:  # the budget in examples scored
                result.cost.setdefault("examples", float(len(result.per_example)))
            timings["score"] = time.perf_counter() - t
        except Exception as e:  # noqa: BLE001 - a failed candidate is data, not a crash
            timings[stage.replace(" ", "_")] = time.perf_counter() - t
            return Evaluation.failure(candidate.id, f"{stage}: {type(e).__name__}: {e}", timings=timings)
        return Evaluation(candidate_id=candidate.id, objectives=dict(result.objectives),
                          per_example=result.per_example, timings=timings, cost=dict(result.cost))

    def close(self) -> None:
        """Release the handle's resources (a vLLM engine's processes), where it holds any."""
        close = getattr(self.handle, "close", None)
        if close is not None:
            close()
