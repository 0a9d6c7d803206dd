"""The handle for models that are not language models (an MLP, a vision net): `set_recipe` materializes
the merged state dict and keeps it; the user's fitness function reads `handle.weights` and runs its own
model. Nothing here knows the architecture."""
from __future__ import annotations

import time
from typing import Any, Protocol

import torch

from evomerge.recipe import Recipe
from evomerge.records import UserError


class Materializes(Protocol):
    def materialize(self, recipe: Recipe) -> dict[str, torch.Tensor]: ...


class StateDictHandle:
    def __init__(self, materializer: Materializes) -> None:
        self.materializer = materializer
        self.recipe: Recipe | None = None
        self._weights: dict[str, torch.Tensor] | None = None
        self.timings: dict[str, float] = {}

    def set_recipe(self, recipe: Recipe) -> None:
        start = time.perf_counter()
        self._weights = None  # never hand out the previous candidate's weights after a failed merge
        self._weights = self.materializer.materialize(recipe)
        self.recipe = recipe
        self.timings["swap"] = time.perf_counter() - start

    @property
    def weights(self) -> dict[str, torch.Tensor]:
        if self._weights is None:
            raise UserError("no merged weights yet: the worker calls set_recipe before the fitness")
        return self._weights

    def __getattr__(self, name: str) -> Any:  # a clear message where an LLM scorer was expected
        if name in ("generate", "score"):
            raise UserError(f"this run's models are not language models: the fitness cannot call {name}(); "
                            "read handle.weights in your own fitness function")
        raise AttributeError(name)
