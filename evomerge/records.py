"""Plain records that flow between optimizers, workers and the run store.

Ground floor: no torch, no optional back ends. Everything here is JSON-serialisable through
`to_dict` / `from_dict`, so the run store can keep it and a notebook can read it back.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

Direction = Literal["min", "max"]
DIRECTIONS: tuple[str, ...] = ("min", "max")
Status = Literal["ok", "failed"]


class UserError(ValueError):
    """A mistake in the user's input. The CLI prints its message as one line, never a traceback."""


@dataclass(frozen=True)
class Objective:
    """A named quantity to optimise, with its direction."""

    name: str
    direction: Direction = "max"

    def __post_init__(self) -> None:
        if self.direction not in DIRECTIONS:
            raise UserError(
                f"objective {self.name!r}: direction {self.direction!r} is not valid; use one of {', '.join(DIRECTIONS)}"
            )

    def sign(self) -> float:
        """+1 for max, -1 for min: multiply a value by it to get 'larger is better'."""
        return 1.0 if self.direction == "max" else -1.0


@dataclass
class Candidate:
    """A point the optimizer asks to evaluate: a genome in the search space's coordinates."""

    id: int
    x: list[float]
    meta: dict[str, Any] = field(default_factory=dict)  # optimizer bookkeeping: generation, parents, ...

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Candidate:
        return cls(id=int(d["id"]), x=[float(v) for v in d["x"]], meta=dict(d.get("meta") or {}))


@dataclass
class Evaluation:
    """The outcome of evaluating one candidate. A failure is a status, not an exception."""

    candidate_id: int
    status: Status = "ok"
    objectives: dict[str, float] = field(default_factory=dict)
    per_example: list[float] | None = None  # one score per fitness example, for M2N2's competition
    error: str | None = None
    timings: dict[str, float] = field(default_factory=dict)  # seconds: materialize, score, ...
    worker: str | None = None
    cost: dict[str, float] = field(default_factory=dict)  # API tokens and money

    @property
    def ok(self) -> bool:
        return self.status == "ok" and all(math.isfinite(v) for v in self.objectives.values())

    @classmethod
    def failure(cls, candidate_id: int, error: str, **kw: Any) -> Evaluation:
        return cls(candidate_id=candidate_id, status="failed", error=error, **kw)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Evaluation:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})
