"""mergekit YAML in and out: read a mergekit config (or an evomerge recipe) into a Recipe; write a Recipe
as a mergekit config when mergekit can express it."""
from __future__ import annotations

import dataclasses

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from evomerge.recipe import Recipe, read_yaml_mapping
from evomerge.records import UserError

# mergekit config keys that evomerge's merge does not implement (and would silently misread)
_UNSUPPORTED = {
    "modules": "per-module configs",
    "tokenizer": "tokenizer surgery",
    "chat_template": "chat templates",
}
# methods mergekit 0.1.5 knows, of those evomerge implements
MERGEKIT_METHODS = {
    "linear", "task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties",
    "della", "della_linear", "model_stock", "slerp", "passthrough", "nuslerp", "multislerp", "karcher", "sce",
    "ram", "ramplus_tl", "nearswap", "arcee_fusion",
}


def read_config(path: str | Path) -> Recipe:
    """A mergekit config or an evomerge recipe YAML, as a Recipe."""
    p = Path(path)
    data = read_yaml_mapping(p, "merge config")
    for key, what in _UNSUPPORTED.items():
        if data.get(key) is not None:
            raise UserError(f"{p}: mergekit's {key!r} ({what}) is not supported by evomerge merge")
    return Recipe.from_dict(data)


def expressible(recipe: Recipe) -> str | None:
    """Why mergekit cannot express `recipe`, or None when it can."""
    if recipe.path is not None:
        return "a data-flow 'path' recipe has no mergekit form"
    if recipe.merge_method not in MERGEKIT_METHODS:
        return f"mergekit has no method {recipe.merge_method!r}"
    if isinstance(recipe.base_model, Recipe) or any(isinstance(m.model, Recipe) for m in recipe.models):
        return "nested recipes have no mergekit form (export the inner merge first)"
    return None


def float32_replay(recipe: Recipe, written: str) -> Recipe:
    """A recipe merged by the float32 kernels (a search's: no `dtype` of its own) as mergekit must be told to replay
    it: merged in float32 and written in `written` (else mergekit merges in the sources' dtype)."""
    return recipe if recipe.dtype is not None else dataclasses.replace(recipe, dtype="float32", out_dtype=written)


def to_mergekit(recipe: Recipe, paths: Mapping[str, str] | None = None) -> str:
    """mergekit YAML for `recipe`, model names replaced by `paths` where given."""
    why = expressible(recipe)
    if why:
        raise UserError(f"cannot export as mergekit YAML: {why}")
    d = recipe.to_dict()
    seed = d.pop("seed", None)
    text = yaml.safe_dump(_with_paths(d, dict(paths or {})), sort_keys=False)
    if seed is not None and recipe.merge_method in ("dare_ties", "dare_linear", "della", "della_linear"):
        text = f"# random masks: run mergekit-yaml with --random-seed {seed} (its masks differ from evomerge's)\n" + text
    return text


def _with_paths(d: Any, paths: dict[str, str]) -> Any:
    if isinstance(d, dict):
        return {k: (paths.get(v, v) if k in ("model", "base_model", "tokenizer_source") and isinstance(v, str) else _with_paths(v, paths))
                for k, v in d.items()}
    if isinstance(d, list):
        return [_with_paths(v, paths) for v in d]
    return d
