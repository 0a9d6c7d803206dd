"""What every fitness returns, and the protocol the worker calls."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from evomerge.records import Objective, UserError
from evomerge.fitness.handle import ModelHandle


@dataclass
class FitnessResult:
    """Named objective values, per-example scores (larger is better; M2N2's competition uses them) and
    the evaluation's cost (API tokens, money, cache hits)."""

    objectives: dict[str, float]
    per_example: list[float] | None = None
    cost: dict[str, float] = field(default_factory=dict)

    def check(self, objectives: list[Objective]) -> FitnessResult:
        """Every declared objective present and a number; NaN is allowed (the record says not ok)."""
        missing = [o.name for o in objectives if o.name not in self.objectives]
        if missing:
            raise UserError(f"fitness returned no value for objective {missing[0]!r}; it returned {sorted(self.objectives)}")
        for name, v in self.objectives.items():
            if not isinstance(v, (int, float)) or isinstance(v, bool):
                raise UserError(f"fitness objective {name!r} is {type(v).__name__}, not a number")
        self.objectives = {k: float(v) for k, v in self.objectives.items()}
        if self.per_example is not None:
            self.per_example = [float(v) for v in self.per_example]
        return self

    @property
    def finite(self) -> bool:
        return all(math.isfinite(v) for v in self.objectives.values())


@runtime_checkable
class Fitness(Protocol):
    objectives: list[Objective]

    def evaluate(self, handle: ModelHandle) -> FitnessResult: ...


def add_cost(total: dict[str, float], part: dict[str, float]) -> None:
    for k, v in part.items():
        total[k] = total.get(k, 0.0) + float(v)
