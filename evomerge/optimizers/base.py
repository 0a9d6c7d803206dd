"""The ask/tell protocol every optimizer implements, and the checks and helpers they share.

Optimizers see vectors only: a genome is a point inside `bounds` (d × 2, finite, low < high). The engine
asks ahead, evaluates candidates anywhere, and tells results back as they finish, in any order, failures
included. Each optimizer documents how it treats a failure (see its module docstring).
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any, Sequence

import numpy as np

from evomerge.records import Candidate, Evaluation, Objective, UserError


def check_bounds(bounds: Any) -> np.ndarray:
    """A (d, 2) float array with finite low < high, or a one-line UserError naming the culprit."""
    try:
        b = np.asarray(bounds, dtype=float)
    except (TypeError, ValueError) as e:
        raise UserError(f"bounds must be numbers shaped (d, 2): {e}") from e
    if b.ndim != 2 or b.shape[1] != 2 or b.shape[0] < 1:
        raise UserError(f"bounds must have shape (d, 2) with d >= 1, got {b.shape}")
    if not np.all(np.isfinite(b)):
        raise UserError(f"bounds must be finite; dimension {int(np.argmin(np.isfinite(b).all(1)))} is not")
    bad = np.flatnonzero(b[:, 0] >= b[:, 1])
    if bad.size:
        i = int(bad[0])
        raise UserError(f"bounds inverted or empty at dimension {i}: low {b[i, 0]} >= high {b[i, 1]}; need low < high")
    return b


def check_objectives(objectives: Sequence[Objective]) -> list[Objective]:
    objs = list(objectives)
    if not objs:
        raise UserError("at least one objective is needed")
    for o in objs:
        if not isinstance(o, Objective):
            raise UserError(f"objectives must be Objective records, got {type(o).__name__}")
    return objs


def check_population(name: str, value: int) -> int:
    if int(value) != value or value < 2:
        raise UserError(f"{name} must be an integer >= 2, got {value!r}")
    return int(value)


class StateMismatch(RuntimeError):
    """A state_dict that this optimizer cannot restore exactly (written by another release of its library)."""


class Optimizer(ABC):
    """Base of every optimizer: validated bounds and objectives, candidate ids, losses to minimise.

    Subclasses implement `_ask(n)` (return up to n vectors with their meta), `tell`, `done`,
    `state_dict` and `load_state_dict`. Ids are assigned here, in ask order, so they are unique.
    """

    def __init__(self, *, bounds: Any, objectives: Sequence[Objective], seed: int, x0: Any = None,
                 starts: Sequence[Any] = ()) -> None:
        self.bounds = check_bounds(bounds)
        self.objectives = check_objectives(objectives)
        self.seed = int(seed)
        self.dim = self.bounds.shape[0]
        self.x0 = None if x0 is None else self.clip(self._check_x0(x0))
        # the user's starting genomes (their own recipes): candidates 0 .. len - 1, asked before the optimizer's own
        self.starts = [self.clip(self._check_x0(x)) for x in starts]
        self._next_id = 0

    def _check_x0(self, x0: Any) -> np.ndarray:
        x = np.asarray(x0, dtype=float).ravel()
        if x.shape != (self.dim,):
            raise UserError(f"x0 has {x.size} values but the bounds have {self.dim} dimensions")
        return x

    # -- protocol -------------------------------------------------------------------------------------
    def ask(self, n: int = 1) -> list[Candidate]:
        """Up to n new candidates; fewer (even none) while a generation waits for its results."""
        out = []
        while len(out) < n and self._next_id < len(self.starts):
            out.append(Candidate(id=self._next_id, x=self.starts[self._next_id].tolist(), meta={"start": self._next_id}))
            self._next_id += 1
        for x, meta in self._ask(int(n) - len(out)) if len(out) < n else ():
            out.append(Candidate(id=self._next_id, x=np.asarray(x, dtype=float).tolist(), meta=meta))
            self._next_id += 1
        return out

    def start_of(self, candidate_id: int) -> np.ndarray | None:
        """The genome of a user's start, or None for a candidate the optimizer asked itself (an optimizer that
        learns from any scored point, such as a Gaussian process, tells itself the starts' results)."""
        return self.starts[candidate_id] if 0 <= candidate_id < len(self.starts) else None

    @abstractmethod
    def _ask(self, n: int) -> list[tuple[np.ndarray, dict[str, Any]]]: ...

    @abstractmethod
    def tell(self, evaluations: Sequence[Evaluation]) -> None: ...

    @property
    def done(self) -> bool:
        """True when the optimizer's own stopping rule has fired (the run's budget is the engine's)."""
        return False

    def state_dict(self) -> dict[str, Any]:
        return {"next_id": self._next_id, **self._state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._next_id = int(state["next_id"])
        self._load(state)

    @abstractmethod
    def _state(self) -> dict[str, Any]: ...

    @abstractmethod
    def _load(self, state: dict[str, Any]) -> None: ...

    # -- helpers ----------------------------------------------------------------------------------------
    def clip(self, x: np.ndarray) -> np.ndarray:
        return np.clip(x, self.bounds[:, 0], self.bounds[:, 1])

    def losses(self, ev: Evaluation) -> np.ndarray | None:
        """The evaluation's objectives as values to minimise, or None for a failure (or NaN/missing value)."""
        if not ev.ok:
            return None
        try:
            vals = [-o.sign() * float(ev.objectives[o.name]) for o in self.objectives]
        except KeyError:
            return None
        return np.asarray(vals) if all(math.isfinite(v) for v in vals) else None

    def loss(self, ev: Evaluation) -> float | None:
        """Single-objective view: the first objective as a value to minimise, None for a failure."""
        ls = self.losses(ev)
        return None if ls is None else float(ls[0])


def penalise(losses: list[float | None], worst_seen: float | None) -> list[float]:
    """Replace failures (None) by a loss worse than every finite loss seen: rank-based optimizers then
    treat a failure as the worst candidate of its generation without a magic constant."""
    finite = [v for v in losses if v is not None]
    if worst_seen is not None:
        finite.append(worst_seen)
    worst = max(finite) if finite else 0.0
    penalty = worst + max(1.0, abs(worst))
    return [penalty if v is None else v for v in losses]
