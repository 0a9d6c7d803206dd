"""A fitness computed by the host: the recipe's loss on a dataset `evomerge serve` keeps. The client sees
neither the weights nor the data, only one loss per example (the Evo-Merging setting)."""
from __future__ import annotations

from evomerge.records import Objective, UserError
from evomerge.fitness.base import FitnessResult


class RemoteLossFitness:
    def __init__(self, dataset: str, *, limit: int | None = None, objective: str | None = None) -> None:
        self.dataset, self.limit = dataset, limit
        self.objectives = [Objective(objective or f"loss/{dataset}", "min")]

    def evaluate(self, handle) -> FitnessResult:
        loss = getattr(handle, "loss", None)
        if loss is None:
            raise UserError("a remote loss needs an API handle pointed at evomerge serve (send_recipe: true)")
        answer = loss(self.dataset, self.limit)
        per = [float(v) for v in answer.get("per_example") or []]
        cost = handle.pop_cost() if hasattr(handle, "pop_cost") else {}
        # per-example scores are larger-is-better: the negative loss
        return FitnessResult({self.objectives[0].name: float(answer["loss"])}, [-v for v in per], cost)
