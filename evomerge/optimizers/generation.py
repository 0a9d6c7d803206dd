"""Bookkeeping for generational optimizers: hand a generation out in pieces, collect its results in any
order, and say when it is complete. Picklable as plain data (it is part of state_dicts)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class Generation:
    xs: np.ndarray  # (size, d) points in the optimizer's coordinates
    index: int = 0  # generation number
    asked: int = 0  # how many points have been handed out
    ids: dict[int, int] = field(default_factory=dict)  # candidate id -> row
    results: dict[int, Any] = field(default_factory=dict)  # row -> result (None for a failure)

    @property
    def size(self) -> int:
        return len(self.xs)

    def take(self, n: int) -> list[int]:
        """Rows of the next (up to) n points not yet handed out."""
        rows = list(range(self.asked, min(self.size, self.asked + max(0, n))))
        self.asked += len(rows)
        return rows

    def bind(self, candidate_id: int, row: int) -> None:
        self.ids[candidate_id] = row

    def record(self, candidate_id: int, result: Any) -> bool:
        """Store a result; False if the id is not of this generation or already told (a replay)."""
        row = self.ids.get(candidate_id)
        if row is None or row in self.results:
            return False
        self.results[row] = result
        return True

    @property
    def complete(self) -> bool:
        return len(self.results) == self.size

    def ordered(self) -> list[Any]:
        return [self.results[r] for r in range(self.size)]
