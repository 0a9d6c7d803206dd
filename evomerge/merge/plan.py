"""A recipe's merge plan: for every output tensor, its inputs (model, source tensor), base and layer position.

`models` recipes merge every tensor of the reference model across the listed models (plus the base when
it is not listed, as mergekit does). `slices` recipes stack output layers from layer ranges of the
sources; tensors outside the layers come from the first slice (embeddings) or the last (norm, head).
Parameter scopes follow mergekit: a source's own parameters, then its slice's, then the recipe's.
`path` recipes (data-flow) stack the listed layers with their scales folded into the weights.
Which tensors are layers, embeddings or head, where a scale folds, and which tensors are one stacked tensor
in memory (merged as one where a method reads a whole tensor), comes from the architecture table
(evomerge/arch.py) through `Layout`. A parameter `filter` that matches no tensor is ignored, as mergekit 0.1.5
ignores one (so generic templates' `filter: self_attn` run on GPT-2), with a warning once per filter and family;
`strict` refuses it. Filters match the stored names; mergekit on transformers 5 matches some families' in-memory
names (Mixtral's `mlp.experts`, where the checkpoint says `block_sparse_moe`).
"""
from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from evomerge.arch import LayerName, Layout, StackedTensor, layout_for, stacks
from evomerge.recipe import Recipe
from evomerge.records import UserError

Scope = Mapping[str, Any] | None
LOG = logging.getLogger(__name__)
_warned: set[tuple[str, str]] = set()


@dataclass(frozen=True)
class Input:
    model: str
    tensor: str  # the source's tensor name
    scopes: tuple[Scope, ...]  # parameter settings, most specific first


@dataclass(frozen=True)
class Planned:
    name: str  # output tensor name
    inputs: tuple[Input, ...]
    base: int | None  # index of the base in inputs
    t: float  # layer position for gradients
    shared_scopes: tuple[Scope, ...]
    stack: StackedTensor | None = None  # the in-memory tensor this one is part of (MoE experts), as mergekit merges it


def entry_name(ref: Any) -> str:
    """How the rest of a recipe refers to a model entry: its `name`, else its model name."""
    key = ref.label
    if key is None:
        raise UserError(f"a nested recipe among the models needs a 'name' (got an entry for {ref.model.merge_method})")
    return key


def model_name(m: Any, what: str) -> str:
    if isinstance(m, Recipe):
        raise UserError(f"{what}: nested recipes must be materialized into a source first")
    if not isinstance(m, str) or not m:
        raise UserError(f"{what}: expected a model name, got {m!r}")
    return m


def layer_position(index: int, count: int) -> float:
    """mergekit's gradient position of layer `index` among `count` layers."""
    return index / (count - 1) if count > 1 else 1.0


def plan(recipe: Recipe, names: list[str], config: Mapping[str, Any] | None = None, *,
         strict: bool = False) -> tuple[list[Planned], int]:
    """The plan over the reference's tensor `names` (its `config` names the architecture; without it the
    names do), and the number of output layers. `strict`: a filter that matches no tensor is an error."""
    layout = layout_for(config, names)
    if recipe.path is not None:
        out, layers = _plan_path(recipe, names, layout)
    elif bool(recipe.models) == bool(recipe.slices):
        raise UserError("a recipe needs exactly one of 'models' or 'slices'")
    elif recipe.models:
        out, layers = _plan_models(recipe, names, layout), layout.num_layers(names)
    else:
        out, layers = _plan_slices(recipe, names, layout)
    _check_filters(recipe, out, layout, strict)
    stacked = stacks(layout.family, [p.name for p in out])
    return [replace(p, stack=stacked[p.name]) if p.name in stacked else p for p in out], layers


def _check_filters(recipe: Recipe, planned: list[Planned], layout: Layout, strict: bool) -> None:
    """A `filter` of the recipe's parameters that names no tensor it merges: an error when `strict`, else a warning."""
    names = {p.name for p in planned} | {i.tensor for p in planned for i in p.inputs}
    for f in sorted(set(_filters([recipe.parameters, *(r.parameters for r in recipe.models), recipe.slices]))):
        if f == "*" or any(f in n for n in names):
            continue
        what = (f"filter {f!r} matches no tensor of this {layout.family.name} model "
                f"(its groups: {', '.join(f'{g}={v[0]!r}' for g, v in layout.family.groups.items())})")
        if strict:
            raise UserError(what)
        if (f, layout.family.name) not in _warned:
            _warned.add((f, layout.family.name))
            LOG.warning("evomerge: warning: %s: ignored (--strict refuses it)", what)


def _filters(x: Any) -> Iterable[str]:
    if isinstance(x, Mapping):
        if isinstance(x.get("filter"), str) and "value" in x:
            yield x["filter"]
        for v in x.values():
            yield from _filters(v)
    elif isinstance(x, (list, tuple)):
        for v in x:
            yield from _filters(v)


def _plan_models(recipe: Recipe, names: list[str], layout: Layout) -> list[Planned]:
    base = model_name(recipe.base_model, "base_model") if recipe.base_model is not None else None
    refs = [(model_name(r.model, "models"), r.parameters) for r in recipe.models]
    if base is not None and base not in [m for m, _ in refs]:
        refs.append((base, {}))
    models = [m for m, _ in refs]
    if len(set(models)) != len(models):
        raise UserError(f"model {next(m for m in models if models.count(m) > 1)!r} is listed twice")
    base_idx = models.index(base) if base is not None else None
    count = layout.num_layers(names)
    out = []
    for n in names:
        ln = layout.layer_of(n)
        t = layer_position(ln.index, count) if ln else 0.0
        inputs = tuple(Input(m, n, (p, recipe.parameters)) for m, p in refs)
        out.append(Planned(n, inputs, base_idx, t, (recipe.parameters,)))
    return out


def _plan_slices(recipe: Recipe, names: list[str], layout: Layout) -> tuple[list[Planned], int]:
    by_layer = layout.layers(names)
    pre, post = [], []
    for n in names:
        if layout.layer_of(n) is None:
            (pre if layout.is_pre(n) else post).append(n)
    slices = recipe.slices or []
    parsed = [_parse_slice(i, s, recipe) for i, s in enumerate(slices)]
    out: list[Planned] = []

    def edge(n: str, sl: tuple) -> Planned:
        sources, base_idx, params = sl
        inputs = tuple(Input(m, n, (p, params, recipe.parameters)) for m, _, p in sources)
        return Planned(n, inputs, base_idx, 0.0, (params, recipe.parameters))

    out.extend(edge(n, parsed[0]) for n in pre)
    layer = 0
    for sources, base_idx, params in parsed:
        length = sources[0][1][1] - sources[0][1][0]
        for off in range(length):
            t = layer_position(off, length)
            for ln in _layer(by_layer, sources[0][1][0] + off, "slices"):  # a layer's own tensors (MoE or dense)
                inputs = tuple(Input(m, ln.at(r[0] + off), (p, params, recipe.parameters)) for m, r, p in sources)
                out.append(Planned(ln.at(layer), inputs, base_idx, t, (params, recipe.parameters)))
            layer += 1
    out.extend(edge(n, parsed[-1]) for n in post)
    return out, layer


def _layer(by_layer: dict[int, list[LayerName]], index: int, where: str) -> list[LayerName]:
    if index not in by_layer:
        raise UserError(f"{where}: layer {index} is not a layer of the model (it has {len(by_layer)})")
    return by_layer[index]


def _parse_slice(i: int, s: Any, recipe: Recipe) -> tuple[list[tuple[str, tuple[int, int], Scope]], int | None, Scope]:
    where = f"slices[{i}]"
    if not isinstance(s, dict) or not s.get("sources"):
        raise UserError(f"{where}: a slice needs a non-empty 'sources' list")
    sources = []
    for j, src in enumerate(s["sources"]):
        if not isinstance(src, dict):
            raise UserError(f"{where}.sources[{j}]: expected a mapping with model and layer_range, got {src!r}")
        m = model_name(src.get("model"), f"{where}.sources[{j}].model")
        r = src.get("layer_range")
        if not (isinstance(r, (list, tuple)) and len(r) == 2 and all(isinstance(x, int) for x in r) and r[0] < r[1]):
            raise UserError(f"{where}.sources[{j}]: layer_range must be [start, end) with start < end, got {r!r}")
        sources.append((m, (r[0], r[1]), src.get("parameters")))
    lengths = {r[1] - r[0] for _, r, _ in sources}
    if len(lengths) > 1:
        raise UserError(f"{where}: all sources of a slice must span the same number of layers, got {sorted(lengths)}")
    base = s.get("base_model", recipe.base_model)
    base_idx = None
    if base is not None:
        base = model_name(base, f"{where}.base_model")
        models = [m for m, _, _ in sources]
        base_idx = models.index(base) if base in models else None
    return sources, base_idx, s.get("parameters")


def _plan_path(recipe: Recipe, names: list[str], layout: Layout) -> tuple[list[Planned], int]:
    """A data-flow path as a stacked model. Step k runs layer `step.layer` of `step.model` on the hidden
    state times `step.scale`. In a pre-norm decoder a layer only sees its input through scale-invariant
    norms, except for the residual itself, so scaling the stream by P_k = s_1 ... s_k before step k equals
    dividing the residual-writing projections (o_proj, down_proj, MoE experts' output) of steps k, k+1, ...
    by P_k: the final norm removes the overall factor. The path thus becomes an ordinary checkpoint any
    runtime can load. Embeddings, final norm and head come from the first model entry ("model A")."""
    if not recipe.models:
        raise UserError("a path recipe needs 'models' (the first supplies embeddings and head)")
    model_a = entry_name(recipe.models[0])
    known = {entry_name(r) for r in recipe.models}
    by_layer = layout.layers(names)
    outside = [n for n in names if layout.layer_of(n) is None]
    out: list[Planned] = [Planned(n, (Input(model_a, n, ()),), None, 0.0, ()) for n in outside if layout.is_pre(n)]
    scale = 1.0
    for k, step in enumerate(recipe.path or []):
        if step.model not in known:
            raise UserError(f"path step {k}: model {step.model!r} is not among the recipe's models ({', '.join(sorted(known))})")
        if not step.scale > 0:
            raise UserError(f"path step {k}: scale {step.scale:g} must be > 0 (a pre-norm model cannot fold it otherwise)")
        scale *= step.scale
        for ln in _layer(by_layer, step.layer, f"path step {k}"):
            out.append(Planned(ln.at(k), (Input(step.model, ln.at(step.layer), (layout.fold_scope(ln.rest, scale),)),), None, 0.0, ()))
    out += [Planned(n, (Input(model_a, n, ()),), None, 0.0, ()) for n in outside if not layout.is_pre(n)]
    return out, len(recipe.path or [])
