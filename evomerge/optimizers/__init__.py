"""Optimizers behind one ask/tell protocol (see `base.Optimizer`), looked up by name.

Back ends are imported only when their optimizer is made, so listing names costs nothing.
"""
from __future__ import annotations

from typing import Any, Sequence

from evomerge.optimizers.base import Optimizer
from evomerge.records import Objective
from evomerge.registry import Registry

REGISTRY = Registry("optimizer", "evomerge.optimizers", {"random": "RandomSearch", "cmaes": "CMAES", "nsga2": "NSGA2",
                                                        "m2n2": "M2N2", "optuna": "OptunaSampler", "nevergrad": "Nevergrad",
                                                        "map": "MAP"})
names, optimizer_class = REGISTRY.names, REGISTRY.get


def make(name: str, *, bounds: Any, objectives: Sequence[Objective], seed: int, x0: Any = None, starts: Sequence[Any] = (),
         **options: Any) -> Optimizer:
    """Build optimizer `name`. Single-objective optimizers use the first objective. Unknown options are a
    UserError naming the valid ones. `starts`: genomes asked first, before the optimizer's own (x0 included)."""
    return REGISTRY.build(name, options, bounds=bounds, objectives=objectives, seed=seed, x0=x0, starts=starts)


__all__ = ["Optimizer", "make", "names", "optimizer_class"]
