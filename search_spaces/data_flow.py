"""Data-flow space (Sakana's DFS, arXiv 2403.13187 §3.2): which layers the hidden state passes through,
in which order, and how it is scaled between them.

The M layers of all sources are laid out in sequence (source by source) and repeated r times: T = M·r
slots. Slot t is on the path when its indicator I_t > 0. A scaling matrix W (M×M) scales the hidden state
when the path goes from layer i to layer j (step scale = W[i, j]; the first step's scale is 1). The first
source ("model A") supplies embeddings and head; with `pin_ends` (default) the path also starts at A's
first layer and ends at A's last one, as in the paper.

Decodes to a `passthrough` recipe whose `path` lists (model, layer, scale) steps and whose `models` list
the sources (a source may be a nested recipe with a `name`: see the hybrid space). Options: `sources`,
`num_layers` (one int for all sources or one per source), `repeats` (r, default 3), `scale_range`
((0.0, 2.0)). The scales fold into the weights of every family of the architecture table (evomerge.arch:
`Layout.fold_scope`). Initial point: A's first repetition on, everything else off, W = 1 (the paper's start).
Dimensions: T indicators in slot order, then W row by row. Encoding a path places each step at the first
free slot of its layer after the previous step; a path that does not fit, or uses two different scales
for the same (i, j) move, is a UserError.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from evomerge.recipe import ModelRef, PathStep, Recipe
from evomerge.records import UserError
from evomerge.search_spaces.base import SearchSpace, check_layers, check_sources

ON, OFF = 0.5, -0.5


class DataFlow(SearchSpace):
    def __init__(
        self,
        sources: Sequence[str],
        num_layers: int | Sequence[int],
        repeats: int = 3,
        scale_range: tuple[float, float] | None = None,
        pin_ends: bool = True,
    ) -> None:
        self.sources = check_sources(sources)
        counts = [num_layers] * len(self.sources) if isinstance(num_layers, (int, np.integer)) else list(num_layers)
        if len(counts) != len(self.sources):
            raise UserError(f"num_layers needs one count per source ({len(self.sources)}), got {counts}")
        self.counts = [check_layers(c) for c in counts]
        if not isinstance(repeats, int) or repeats < 1:
            raise UserError(f"repeats must be an integer >= 1, got {repeats!r}")
        scale_range = scale_range or (0.0, 2.0)
        if not (scale_range[0] < scale_range[1] and scale_range[0] <= 1.0 <= scale_range[1]):
            raise UserError(f"scale_range must be (low, high) with low < high around 1 (no scaling), got {scale_range}")
        self.repeats, self.pin_ends = repeats, bool(pin_ends)
        self.layers = [(s, l) for s, c in zip(self.sources, self.counts) for l in range(c)]  # the M layers
        self._layer_index = {sl: i for i, sl in enumerate(self.layers)}
        m = len(self.layers)
        self.num_slots = m * repeats
        self._names = [f"slot_{t}.{self.layers[t % m][0]}.layer_{self.layers[t % m][1]}.on" for t in range(self.num_slots)]
        scales = m * m
        self._names += [f"scale.{a}_{i}->{b}_{j}" for a, i in self.layers for b, j in self.layers]
        self.bounds = np.array([[-1.0, 1.0]] * self.num_slots + [list(map(float, scale_range))] * scales)
        ind = np.full(self.num_slots, OFF)
        ind[: self.counts[0]] = ON
        self._initial = np.concatenate([ind, np.ones(scales)])

    def decode(self, x: Any) -> Recipe:
        x = self.clip(x)
        m = len(self.layers)
        order = [t % m for t in range(self.num_slots) if x[t] > 0]
        if self.pin_ends:
            first, last = 0, self.counts[0] - 1  # A's first and last layer
            if not order or order[0] != first:
                order.insert(0, first)
            if order[-1] != last:
                order.append(last)
        W = x[self.num_slots :].reshape(m, m)
        steps = []
        for k, li in enumerate(order):
            scale = 1.0 if k == 0 else float(W[order[k - 1], li])
            steps.append(PathStep(model=self.layers[li][0], layer=self.layers[li][1], scale=scale))
        return Recipe(merge_method="passthrough", models=[ModelRef(model=s) for s in self.sources], path=steps)

    def encode(self, recipe: Recipe) -> np.ndarray:
        if not recipe.path:
            raise UserError("a data-flow recipe needs a non-empty 'path'")
        m = len(self.layers)
        x = np.concatenate([np.full(self.num_slots, OFF), np.ones(m * m)])
        W = x[self.num_slots :].reshape(m, m)  # a view: writing W writes x
        set_w: dict[tuple[int, int], float] = {}
        slot, prev = -1, None
        for k, step in enumerate(recipe.path):
            li = self._layer_index.get((step.model, step.layer))
            if li is None:
                raise UserError(f"path step {k} ({step.model!r}, layer {step.layer}) is not a layer of this space's sources")
            slot = slot + 1 + (li - (slot + 1)) % m  # the first slot of layer li after the previous step
            pinned_end = self.pin_ends and k == len(recipe.path) - 1 and li == self.counts[0] - 1
            if slot < self.num_slots:
                x[slot] = ON
            elif not pinned_end:  # a pinned last step needs no slot: decoding appends it
                raise UserError(f"path does not fit in {self.repeats} repetitions of the layers (step {k})")
            if prev is None:
                if step.scale != 1.0:
                    raise UserError("the first path step's scale must be 1 (nothing scales the embeddings)")
            else:
                if set_w.setdefault((prev, li), step.scale) != step.scale:
                    raise UserError(f"path uses two scales for the move {self.layers[prev]} -> {self.layers[li]}")
                W[prev, li] = step.scale
            prev = li
        return x
