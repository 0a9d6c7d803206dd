"""Search spaces: genomes <-> merge recipes. `make(name, **options)` builds one; `names()` lists them.

Modules are imported on first use, like the optimizers.
"""
from __future__ import annotations

from typing import Any

from evomerge.registry import Registry
from evomerge.search_spaces.base import SearchSpace

REGISTRY = Registry("search space", "evomerge.search_spaces", {
    "layer_weights": "LayerWeights", "layer_swap": "LayerSwap", "data_flow": "DataFlow",
    "sparsity_scaling": "SparsityScaling", "hybrid": "Hybrid"})
names, space_class = REGISTRY.names, REGISTRY.get


def make(name: str, **options: Any) -> SearchSpace:
    """Build space `name` from plain options; unknown or missing options are a one-line UserError."""
    return REGISTRY.build(name, options)


__all__ = ["SearchSpace", "make", "names", "space_class"]
