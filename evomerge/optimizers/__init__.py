"""Optimizers behind one ask/tell protocol (see `base.Optimizer`), looked up by name.

Back ends are imported only when their optimizer is made, so listing names costs nothing.
"""
from __future__ import annotations

import importlib
import inspect
from typing import Any, Sequence

from evomerge.optimizers.base import Optimizer
from evomerge.records import Objective, UserError

# name -> (module, class); modules are imported on first use
_REGISTRY: dict[str, tuple[str, str]] = {
    "random": ("evomerge.optimizers.random", "RandomSearch"),
    "cmaes": ("evomerge.optimizers.cmaes", "CMAES"),
    "nsga2": ("evomerge.optimizers.nsga2", "NSGA2"),
    "m2n2": ("evomerge.optimizers.m2n2", "M2N2"),
    "optuna": ("evomerge.optimizers.optuna", "OptunaSampler"),
    "nevergrad": ("evomerge.optimizers.nevergrad", "Nevergrad"),
    "map": ("evomerge.optimizers.map", "MAP"),
}


def names() -> list[str]:
    return list(_REGISTRY)


def optimizer_class(name: str) -> type[Optimizer]:
    if name not in _REGISTRY:
        raise UserError(f"unknown optimizer {name!r}; valid: {', '.join(_REGISTRY)}")
    module, cls = _REGISTRY[name]
    return getattr(importlib.import_module(module), cls)


def make(name: str, *, bounds: Any, objectives: Sequence[Objective], seed: int, x0: Any = None, **options: Any) -> Optimizer:
    """Build optimizer `name`. Single-objective optimizers use the first objective. Unknown options are a
    UserError naming the valid ones."""
    cls = optimizer_class(name)
    params = inspect.signature(cls.__init__).parameters
    valid = [p for p in params if p not in ("self", "bounds", "objectives", "seed", "x0")]
    unknown = [k for k in options if k not in valid]
    if unknown:
        raise UserError(f"optimizer {name!r} has no option {unknown[0]!r}; valid: {', '.join(valid) or 'none'}")
    return cls(bounds=bounds, objectives=objectives, seed=seed, x0=x0, **options)


__all__ = ["Optimizer", "make", "names", "optimizer_class"]
