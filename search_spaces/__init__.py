"""Search spaces: genomes <-> merge recipes. `make(name, **options)` builds one; `names()` lists them.

Modules are imported on first use, like the optimizers.
"""
from __future__ import annotations

import importlib
import inspect
from typing import Any

from evomerge.records import UserError
from evomerge.search_spaces.base import SearchSpace

_REGISTRY: dict[str, tuple[str, str]] = {
    "layer_weights": ("evomerge.search_spaces.layer_weights", "LayerWeights"),
    "layer_swap": ("evomerge.search_spaces.layer_swap", "LayerSwap"),
    "data_flow": ("evomerge.search_spaces.data_flow", "DataFlow"),
    "sparsity_scaling": ("evomerge.search_spaces.sparsity_scaling", "SparsityScaling"),
    "hybrid": ("evomerge.search_spaces.hybrid", "Hybrid"),
}


def names() -> list[str]:
    return list(_REGISTRY)


def space_class(name: str) -> type[SearchSpace]:
    if name not in _REGISTRY:
        raise UserError(f"unknown search space {name!r}; valid: {', '.join(_REGISTRY)}")
    module, cls_name = _REGISTRY[name]
    return getattr(importlib.import_module(module), cls_name)


def make(name: str, **options: Any) -> SearchSpace:
    """Build space `name` from plain options; unknown or missing options are a one-line UserError."""
    cls = space_class(name)
    params = {k: p for k, p in inspect.signature(cls.__init__).parameters.items() if k != "self"}
    unknown = [k for k in options if k not in params]
    if unknown:
        raise UserError(f"search space {name!r} has no option {unknown[0]!r}; valid: {', '.join(params)}")
    missing = [k for k, p in params.items() if p.default is inspect.Parameter.empty and k not in options]
    if missing:
        raise UserError(f"search space {name!r} needs option(s) {', '.join(missing)}")
    return cls(**options)


__all__ = ["SearchSpace", "make", "names", "space_class"]
