"""Uniform random search: the baseline every other optimizer must beat. `x0`, when given, is the first
candidate. Not generational: `ask(n)` always returns n points. Failures are simply not counted as best."""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from evomerge.optimizers.base import Optimizer
from evomerge.records import Evaluation


class RandomSearch(Optimizer):
    def __init__(self, **problem: Any) -> None:  # bounds, objectives, seed, x0: the base Optimizer's
        super().__init__(**problem)
        self._rng = np.random.default_rng(self.seed)

    def _ask(self, n: int):
        out = []
        for _ in range(n):
            if self._next_id + len(out) == 0 and self.x0 is not None:
                out.append((self.x0.copy(), {}))
            else:
                out.append((self._rng.uniform(self.bounds[:, 0], self.bounds[:, 1]), {}))
        return out

    def tell(self, evaluations: Sequence[Evaluation]) -> None:
        pass  # draws do not depend on what was scored

    def _state(self) -> dict[str, Any]:
        return {"rng": self._rng.bit_generator.state}

    def _load(self, state: dict[str, Any]) -> None:
        self._rng.bit_generator.state = state["rng"]
