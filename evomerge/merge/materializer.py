"""The materializer: sources held resident, recipes turned into weights without touching a file.

It keeps one reference model's tensors (the base, by default the first source) and every other
source's task vector (its difference from the reference) in memory, in the compute dtype, on the
chosen device. Statistics that do not change between candidates, such as each task vector's sorted
magnitudes for TIES-style trims, are computed on first use and kept. Each output tensor is merged into
its own freshly allocated buffer (or straight into a module's parameter) by the method's fused kernel,
so beyond the resident sources a merge holds at most one output model plus one tensor's intermediate
buffers (none for DARE's fused two-model loop). Nested recipes are merged first into transient sources.
"""
from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from evomerge.merge import methods as registry
from evomerge.merge.checks import check_compatible
from evomerge.merge.methods import Entry, Group, Method
from evomerge.merge.params import resolve, unknown_parameters
from evomerge.merge.plan import Planned, entry_name, plan
from evomerge.merge.sources import Source, open_sources
from evomerge.merge.vectors import TaskVector
from evomerge.recipe import Recipe
from evomerge.records import UserError

SourceLike = str | Path | Mapping[str, torch.Tensor] | Source

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


def parse_dtype(name: str | None) -> torch.dtype | None:
    if name is None:
        return None
    if name not in DTYPES:
        raise UserError(f"dtype {name!r} is not supported; use one of {', '.join(DTYPES)}")
    return DTYPES[name]


class Materializer:
    """Resident base + task vectors; `materialize(recipe)` and `load_into(recipe, module)`."""

    def __init__(
        self,
        sources: Mapping[str, SourceLike],
        *,
        base: str | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        allow_pickle: bool = False,
        progress: bool = False,
        resident: bool = True,
    ):
        if not sources:
            raise UserError("the materializer needs at least one source")
        self.sources = open_sources(sources, allow_pickle=allow_pickle, base=base)
        self.reference = base if base is not None else next(iter(self.sources))
        if self.reference not in self.sources:
            raise UserError(f"base {self.reference!r} is not among the sources ({', '.join(self.sources)})")
        check_compatible(self.sources, self.reference)
        self.device = torch.device(device)
        self.dtype = dtype
        ref = self.sources[self.reference]
        self.names = ref.names()
        self._transient: dict[str, dict[str, torch.Tensor]] = {}  # nested recipes' results during a merge
        others = [m for m in self.sources if m != self.reference]
        if not resident:  # one-shot merges (the CLI): read each tensor from the memory map when it is merged
            self.base: Mapping[str, torch.Tensor] = _OnDemand(self.names, self._load_base)
            self.vectors: Mapping[str, Mapping[str, TaskVector]] = {
                m: _OnDemand(self.names, lambda n, m=m: self._load_vector(m, n)) for m in others
            }
            return
        self.base, self.vectors = {}, {m: {} for m in others}
        from tqdm.auto import tqdm

        for n in tqdm(self.names, desc="loading sources", disable=not progress, unit="tensor"):
            self.base[n] = self._load_base(n)
            for m in others:
                self.vectors[m][n] = self._load_vector(m, n, self.base[n])

    def _load_base(self, name: str) -> torch.Tensor:
        return self.sources[self.reference].get(name).to(self.device, self.dtype, copy=True)

    def _load_vector(self, model: str, name: str, base: torch.Tensor | None = None) -> TaskVector:
        b = self.base[name] if base is None else base
        return TaskVector(self.sources[model].get(name).to(self.device, self.dtype).sub(b))

    # --- public -----------------------------------------------------------------------------------

    def materialize(self, recipe: Recipe, *, dtype: torch.dtype | None = None, progress: bool = False) -> dict[str, torch.Tensor]:
        """The full merged state dict, in `dtype` (default: the recipe's dtype, else the compute dtype)."""
        return dict(self.tensors(recipe, dtype=dtype, progress=progress))

    def tensors(self, recipe: Recipe, *, dtype: torch.dtype | None = None, progress: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
        """Merged tensors one at a time, so a writer holds no more than one of them."""
        out_dtype = dtype or parse_dtype(recipe.dtype) or self.dtype
        from tqdm.auto import tqdm

        with self._nested(recipe) as flat:
            method, planned, _, seed = self._prepare(flat)
            for p in tqdm(planned, desc="merging", disable=not progress, unit="tensor"):
                out = torch.empty(self._shape(p), device=self.device, dtype=self.dtype)
                self._merge(method, p, seed, out)
                yield p.name, out if out.dtype == out_dtype else out.to(out_dtype)

    def load_into(self, recipe: Recipe, module: torch.nn.Module) -> None:
        """Write the merged weights into `module`'s parameters and buffers in place, by name."""
        with self._nested(recipe) as flat:
            self._load_into(flat, module)

    def _load_into(self, recipe: Recipe, module: torch.nn.Module) -> None:
        method, planned, _, seed = self._prepare(recipe)
        targets = dict(module.named_parameters())
        targets.update(dict(module.named_buffers()))
        missing = [p.name for p in planned if p.name not in targets]
        if missing:
            raise UserError(f"the module has no parameter {missing[0]!r} that the recipe produces")
        produced = {p.name for p in planned}
        stale = [n for n, _ in module.named_parameters() if n not in produced]
        if stale:  # e.g. a module deeper than a data-flow path: its extra layers would keep old weights
            raise UserError(f"the recipe does not produce the module's parameter {stale[0]!r} (check the model's depth)")
        with torch.no_grad():
            for p in planned:
                dest = targets[p.name]
                if tuple(dest.shape) != self._shape(p):
                    raise UserError(f"parameter {p.name}: the module's shape {list(dest.shape)} differs from the merged {list(self._shape(p))}")
                direct = dest.dtype == self.dtype and dest.device == self.device and dest.is_contiguous()
                out = dest.data if direct else torch.empty(self._shape(p), device=self.device, dtype=self.dtype)
                self._merge(method, p, seed, out)
                if not direct:
                    dest.data.copy_(out)

    def plan(self, recipe: Recipe) -> tuple[list[Planned], int]:
        """The recipe's plan (output tensors and their inputs) and its number of output layers."""
        with self._nested(recipe, shallow=True) as flat:
            _, planned, layers, _ = self._prepare(flat)
        return planned, layers

    @contextmanager
    def _nested(self, recipe: Recipe, shallow: bool = False) -> Iterator[Recipe]:
        """The recipe with each nested recipe merged into a transient source named as its entry
        (`shallow`: named only, for planning). The transient sources live for the enclosed merge."""
        nested = [r for r in recipe.models if isinstance(r.model, Recipe)]
        if not nested and not isinstance(recipe.base_model, Recipe):
            yield recipe
            return
        flat = copy.copy(recipe)
        flat.models = [copy.copy(r) for r in recipe.models]
        added = []
        try:
            for ref in flat.models:
                if isinstance(ref.model, Recipe):
                    name = entry_name(ref)
                    self._transient[name] = {} if shallow else self.materialize(ref.model)
                    ref.model, ref.name = name, None
                    added.append(name)
            if isinstance(flat.base_model, Recipe):
                self._transient["<nested base>"] = {} if shallow else self.materialize(flat.base_model)
                flat.base_model = "<nested base>"
                added.append("<nested base>")
            yield flat
        finally:
            for name in added:
                self._transient.pop(name, None)

    # --- internals --------------------------------------------------------------------------------

    def _prepare(self, recipe: Recipe) -> tuple[Method, list[Planned], int, int]:
        """The method, the plan, the number of output layers and the seed (0 when the recipe has none)."""
        method = registry.get(recipe.merge_method)
        planned, layers = plan(recipe, self.names)
        self._validate(method, recipe, planned)
        return method, planned, layers, 0 if recipe.seed is None else recipe.seed

    def _validate(self, method: Method, recipe: Recipe, planned: list[Planned]) -> None:
        first = planned[0] if planned else None
        if first is None:
            raise UserError("the recipe produces no tensors")
        for inp in first.inputs:
            if inp.model not in self.sources and inp.model not in self._transient:
                raise UserError(f"model {inp.model!r} is not a source (sources: {', '.join(self.sources)})")
        for scope in (recipe.parameters, *(r.parameters for r in recipe.models)):
            bad = unknown_parameters(scope or {}, method.params)
            if bad:
                raise UserError(f"unknown parameter {bad[0]!r} for {method.name}; it takes {', '.join(p.name for p in method.params) or 'none'}")
        n = len(first.inputs)
        if method.needs_base and first.base is None:
            raise UserError(f"{method.name} needs a base_model among its inputs")
        if n < method.min_inputs or (method.max_inputs is not None and n > method.max_inputs):
            bound = f"{method.min_inputs}" + (f" to {method.max_inputs}" if method.max_inputs != method.min_inputs else "")
            if method.max_inputs is None:
                bound = f"at least {method.min_inputs}"
            raise UserError(f"{method.name} takes {bound} input models (base included), got {n}")
        for p in planned:
            for inp in p.inputs:
                if inp.tensor not in self.base:
                    raise UserError(f"model {inp.model!r} has no tensor {inp.tensor} (check the slices' layer_range)")

    def _shape(self, p: Planned) -> tuple[int, ...]:
        return self.sources[self.reference].shape(p.inputs[0].tensor)

    def _merge(self, method: Method, p: Planned, seed: int, out: torch.Tensor) -> None:
        base_inp = p.inputs[p.base] if p.base is not None else None
        entries = []
        for i, inp in enumerate(p.inputs):
            where = f"{inp.model}.{inp.tensor}"
            params = {s.name: resolve(s, inp.scopes, inp.tensor, p.t, where) for s in method.model_params(i == p.base)}
            entries.append(Entry(inp.model, params, self._full_fn(inp.model, inp.tensor), self._vector_fn(inp.model, inp.tensor, base_inp)))
        shared = {s.name: resolve(s, p.shared_scopes, p.name, p.t, p.name) for s in method.shared_params()}
        base = entries[p.base] if p.base is not None else None
        method.fn(Group(p.name, entries, base, shared, seed, out))

    def _full_fn(self, model: str, tensor: str):
        def full() -> torch.Tensor:
            if model in self._transient:
                return self._transient[model][tensor]
            if model == self.reference:
                return self.base[tensor]
            return self.base[tensor] + self.vectors[model][tensor].delta

        return full

    def _vector_fn(self, model: str, tensor: str, base: Any):
        def vector() -> TaskVector:
            if base is None:
                raise UserError("this merge method needs a base_model")
            if base.model == self.reference and base.tensor == tensor and model != self.reference:
                return self.vectors[model][tensor]  # resident: its statistics persist across candidates
            return TaskVector(self._full_fn(model, tensor)() - self._full_fn(base.model, base.tensor)())

        return vector


class _OnDemand(Mapping):
    """A read-only mapping that computes each value when asked and keeps none."""

    def __init__(self, keys: list[str], load):
        self._keys, self._set, self._load = keys, set(keys), load

    def __getitem__(self, key: str):
        if key not in self._set:
            raise KeyError(key)
        return self._load(key)

    def __contains__(self, key: object) -> bool:
        return key in self._set

    def __iter__(self):
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)
