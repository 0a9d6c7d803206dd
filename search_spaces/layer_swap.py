"""Layer-swap space (Layer Swapping, arXiv 2410.01335): for each layer, which source model supplies it.

One dimension per layer in [0, S) for S sources: the layer comes from source ⌊x⌋. With `transition` = w > 0,
layers near a swap are weighted averages of their neighbours' sources:
    weights_i = ½ onehot(c_i) + ½ Σ_j K(i−j) onehot(c_j) / Σ_j K(i−j),  K(d) = max(0, 1 − |d|/(w+1)),
so each layer's own source always keeps more than half the weight (the choice stays recoverable) and
blocks blend smoothly over about w layers on each side.

Decodes to a `linear` recipe whose per-source `weight` is a per-layer gradient list (exact at each layer);
tensors outside the layers (names containing any of `non_layer_filters`) come from `embeddings_from`
(default: the first source). Options: `sources`, `num_layers`, `transition` (0), `non_layer_filters`
(default: the architecture's embeddings, final norm and stored head, from evomerge/arch.py),
`embeddings_from`, `initial` (a source per layer; default all from the first source), `architecture` and
`tied_embeddings` (filled in from the base checkpoint by `evomerge run`).
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from evomerge import arch
from evomerge.recipe import ModelRef, Recipe
from evomerge.records import UserError
from evomerge.search_spaces.base import SearchSpace, check_layers, check_sources, model_ref


class LayerSwap(SearchSpace):
    def __init__(
        self,
        sources: Sequence[str],
        num_layers: int,
        transition: int = 0,
        non_layer_filters: Sequence[str] | None = None,
        embeddings_from: str | None = None,
        initial: Sequence[str] | None = None,
        architecture: str = "llama",
        tied_embeddings: bool = False,
    ) -> None:
        self.sources = check_sources(sources, at_least=2)
        self.num_layers = check_layers(num_layers)
        if not isinstance(transition, int) or transition < 0:
            raise UserError(f"transition must be an integer >= 0 (layers), got {transition!r}")
        self.transition = transition
        if non_layer_filters is None:
            non_layer_filters = arch.outside_filters(arch.family(architecture), tied_embeddings)
        self.non_layer_filters = list(non_layer_filters)
        self.embeddings_from = embeddings_from or self.sources[0]
        if self.embeddings_from not in self.sources:
            raise UserError(f"embeddings_from {self.embeddings_from!r} is not a source; sources: {self.sources}")
        self._names = [f"layer_{i}.source" for i in range(self.num_layers)]
        self.bounds = np.tile([0.0, float(len(self.sources))], (self.num_layers, 1))
        choice = [self.sources[0]] * self.num_layers if initial is None else list(initial)
        if len(choice) != self.num_layers or any(c not in self.sources for c in choice):
            raise UserError(f"initial must name one of {self.sources} for each of the {self.num_layers} layers")
        self._initial = np.array([self.sources.index(c) + 0.5 for c in choice])

    def choices(self, x: Any) -> np.ndarray:
        return np.minimum(np.floor(self.clip(x)).astype(int), len(self.sources) - 1)

    def layer_weights(self, choices: np.ndarray) -> np.ndarray:
        """(num_layers, S) mixing weights; rows sum to 1, each layer's own source holds more than half."""
        onehot = np.eye(len(self.sources))[choices]
        if self.transition == 0:
            return onehot
        d = np.abs(np.arange(self.num_layers)[:, None] - np.arange(self.num_layers)[None, :])
        k = np.maximum(0.0, 1.0 - d / (self.transition + 1))
        return 0.5 * onehot + 0.5 * (k @ onehot) / k.sum(axis=1, keepdims=True)

    def decode(self, x: Any) -> Recipe:
        w = self.layer_weights(self.choices(x))
        models = []
        for s_i, s in enumerate(self.sources):
            fixed = 1.0 if s == self.embeddings_from else 0.0
            entries: list[dict[str, Any]] = [{"filter": f, "value": fixed} for f in self.non_layer_filters]
            entries.append({"value": [float(v) for v in w[:, s_i]]})
            models.append(ModelRef(model=s, parameters={"weight": entries}))
        return Recipe(merge_method="linear", models=models, parameters={"normalize": True})

    def encode(self, recipe: Recipe) -> np.ndarray:
        if recipe.merge_method != "linear":
            raise UserError(f"a layer-swap recipe is a linear merge, got {recipe.merge_method!r}")
        try:
            w = np.array([model_ref(recipe, s).parameters["weight"][-1]["value"] for s in self.sources], dtype=float).T
        except (KeyError, IndexError, TypeError, ValueError) as e:
            raise UserError(f"recipe does not fit this layer_swap space: {e}") from e
        if w.shape != (self.num_layers, len(self.sources)):
            raise UserError(f"recipe weights have shape {w.shape}, expected {(self.num_layers, len(self.sources))}")
        return np.argmax(w, axis=1) + 0.5
