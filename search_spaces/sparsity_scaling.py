"""Sparsity and sign-aware scaling (Evo-Merging, arXiv 2509.12951): per source a density α ∈ [0, 1]
(keep the top α fraction of the task vector by magnitude) and a signed scale β (negative β subtracts a
source: the "sign-aware" part). Built for black-box use, where only a loss comes back.

Decodes to mergekit's `breadcrumbs` with `gamma = 0` (magnitude top-k, no outlier cut, no sign election,
no rescaling): θ = θ_base + Σ_i β_i TopK_{α_i}(τ_i). (Evo-Merging sparsifies only LoRA-A of adapters; on
full weights the task vector itself is sparsified.)

Options: `sources`, `base`, `beta_range` ((-1.5, 1.5)), `search` ("both", "alpha" or "beta": the paper's
two stages search α with β fixed at `beta0`, then β with α fixed at `alpha0`), `alpha0` (initial or fixed
α, default 1.0), `beta0` (initial or fixed β, default 1/N). Dimensions: per source α then β.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from evomerge.recipe import ModelRef, Recipe
from evomerge.records import UserError
from evomerge.search_spaces.base import SearchSpace, check_sources, model_ref

SEARCH = ("both", "alpha", "beta")


class SparsityScaling(SearchSpace):
    def __init__(
        self,
        sources: Sequence[str],
        base: str,
        beta_range: tuple[float, float] = (-1.5, 1.5),
        search: str = "both",
        alpha0: float | Sequence[float] = 1.0,
        beta0: float | Sequence[float] | None = None,
    ) -> None:
        self.sources = check_sources(sources)
        if search not in SEARCH:
            raise UserError(f"search {search!r} is not valid; use one of {', '.join(SEARCH)}")
        if not beta_range[0] < beta_range[1]:
            raise UserError(f"beta_range must be (low, high) with low < high, got {beta_range}")
        n = len(self.sources)
        self.base, self.search = base, search
        self.alpha0 = np.broadcast_to(np.asarray(alpha0, dtype=float), (n,)).copy()
        self.beta0 = np.broadcast_to(np.asarray(1.0 / n if beta0 is None else beta0, dtype=float), (n,)).copy()
        self._slots = [(s, p) for s in self.sources for p in ("alpha", "beta") if search in ("both", p)]
        self._names = [f"{s}.{p}" for s, p in self._slots]
        ranges = {"alpha": (0.0, 1.0), "beta": tuple(map(float, beta_range))}
        self.bounds = np.array([ranges[p] for _, p in self._slots])
        start = {("alpha", i): self.alpha0[i] for i in range(n)} | {("beta", i): self.beta0[i] for i in range(n)}
        self._initial = np.clip([start[(p, self.sources.index(s))] for s, p in self._slots], self.bounds[:, 0], self.bounds[:, 1])

    def decode(self, x: Any) -> Recipe:
        x = self.clip(x)
        values = {(s, "alpha"): a for s, a in zip(self.sources, self.alpha0)} | {(s, "beta"): b for s, b in zip(self.sources, self.beta0)}
        values.update({slot: v for slot, v in zip(self._slots, x)})
        models = [
            ModelRef(model=s, parameters={"weight": float(values[(s, "beta")]), "density": float(values[(s, "alpha")])})
            for s in self.sources
        ]
        return Recipe(merge_method="breadcrumbs", models=models, base_model=self.base, parameters={"gamma": 0.0, "normalize": False})

    def encode(self, recipe: Recipe) -> np.ndarray:
        if recipe.merge_method != "breadcrumbs":
            raise UserError(f"a sparsity_scaling recipe is a breadcrumbs merge, got {recipe.merge_method!r}")
        key = {"alpha": "density", "beta": "weight"}
        try:
            return np.array([float(model_ref(recipe, s).parameters[key[p]]) for s, p in self._slots])
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"recipe does not fit this sparsity_scaling space: {e}") from e
