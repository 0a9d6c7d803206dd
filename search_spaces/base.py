"""The search-space protocol: named, bounded dimensions and a two-way map between vectors and recipes.

A space knows models only through plain options (source names, base name, number of layers); it never
loads a model. `decode` clips x into the bounds first, so any vector an optimizer proposes is valid.
Recipes hold plain Python numbers, so they serialise to YAML and replay without the optimizer, and
`decode(encode(r)) == r` for every recipe a space decodes to.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Sequence

import numpy as np

from evomerge.recipe import Recipe
from evomerge.records import UserError


class SearchSpace(ABC):
    """Subclasses set `self._names`, `self.bounds` ((dim, 2)) and `self._initial` in __init__."""

    _names: list[str]
    bounds: np.ndarray
    _initial: np.ndarray

    @property
    def dim(self) -> int:
        return len(self._names)

    def names(self) -> list[str]:
        return list(self._names)

    def initial(self) -> np.ndarray:
        return self._initial.copy()

    def clip(self, x: Any) -> np.ndarray:
        v = np.asarray(x, dtype=float).ravel()
        if v.shape != (self.dim,):
            raise UserError(f"{type(self).__name__}: a genome has {self.dim} values, got {v.size}")
        return np.clip(v, self.bounds[:, 0], self.bounds[:, 1])

    @abstractmethod
    def decode(self, x: Any) -> Recipe: ...

    @abstractmethod
    def encode(self, recipe: Recipe) -> np.ndarray: ...


def check_sources(sources: Sequence[str], at_least: int = 1) -> list[str]:
    names = [str(s) for s in sources or []]
    if len(names) < at_least:
        raise UserError(f"need at least {at_least} source model name(s), got {names}")
    if len(set(names)) != len(names):
        raise UserError(f"source names must be distinct, got {names}")
    return names


def check_layers(num_layers: Any) -> int:
    if not isinstance(num_layers, (int, np.integer)) or num_layers < 1:
        raise UserError(f"num_layers must be a positive integer, got {num_layers!r}")
    return int(num_layers)


def model_ref(recipe: Recipe, label: str):
    """The recipe's model entry called `label`, or a UserError naming the ones it has."""
    for ref in recipe.models:
        if ref.label == label:
            return ref
    raise UserError(f"recipe has no model {label!r}; it has {[r.label for r in recipe.models]}")
