"""Composition of spaces: the genome is the parts' genomes side by side (names prefixed `part.`), and a
part's recipe is nested into a later part that names it as a source or base. Sakana's PS+DFS is
    parts=[{"name": "ps", "space": "layer_weights", "options": {"sources": [...], "base": ..., ...}},
           {"name": "dfs", "space": "data_flow", "options": {"sources": ["ps", "b"], "num_layers": 32}}]
where the data-flow part's model A is the parameter-space merge. The last part's recipe is the result;
every earlier part must be used by exactly one later part. Parts are given as such dicts, or as
(name, SearchSpace) pairs. `architecture` and `tied_embeddings` (filled in from the base checkpoint by
`evomerge run`) reach every dict part whose space takes them, unless its options set them.
"""
from __future__ import annotations

import copy
from typing import Any, Mapping, Sequence

import numpy as np

from evomerge.recipe import Recipe
from evomerge.records import UserError
from evomerge.search_spaces.base import SearchSpace


class Hybrid(SearchSpace):
    def __init__(self, parts: Sequence[Mapping[str, Any] | tuple[str, SearchSpace]], architecture: str = "llama",
                 tied_embeddings: bool = False) -> None:
        import inspect

        from evomerge import search_spaces

        facts = {"architecture": architecture, "tied_embeddings": tied_embeddings}

        self.parts: list[tuple[str, SearchSpace]] = []
        for p in parts or []:
            if isinstance(p, tuple):
                name, space = p
            elif isinstance(p, Mapping) and {"name", "space"} <= set(p):
                if p["space"] == "hybrid":
                    raise UserError("a hybrid part cannot itself be hybrid; list its parts instead")
                takes = inspect.signature(search_spaces.space_class(p["space"]).__init__).parameters
                options = {**{k: v for k, v in facts.items() if k in takes}, **dict(p.get("options") or {})}
                name, space = p["name"], search_spaces.make(p["space"], **options)
            else:
                raise UserError(f"a hybrid part is {{name, space, options}} or (name, space), got {p!r}")
            self.parts.append((str(name), space))
        if len(self.parts) < 2:
            raise UserError("a hybrid space needs at least two parts")
        names = [n for n, _ in self.parts]
        if len(set(names)) != len(names):
            raise UserError(f"hybrid part names must be distinct, got {names}")
        # where each part's recipe refers to earlier parts: part index -> [(earlier name, "base" | "model")]
        self.refs: list[list[tuple[str, str]]] = []
        used: dict[str, str] = {}
        for k, (name, space) in enumerate(self.parts):
            r = space.decode(space.initial())
            refs = [(n, "base") for n in names[:k] if r.base_model == n]
            refs += [(n, "model") for n in names[:k] if any(ref.model == n for ref in r.models)]
            for n, _ in refs:
                if n in used:
                    raise UserError(f"hybrid part {n!r} is used by both {used[n]!r} and {name!r}")
                used[n] = name
            self.refs.append(refs)
        unused = [n for n in names[:-1] if n not in used]
        if unused:
            raise UserError(f"hybrid part {unused[0]!r} is not a source or base of any later part")
        self.slices, start = [], 0
        for _, space in self.parts:
            self.slices.append(slice(start, start + space.dim))
            start += space.dim
        self._names = [f"{n}.{d}" for n, space in self.parts for d in space.names()]
        self.bounds = np.vstack([space.bounds for _, space in self.parts])
        self._initial = np.concatenate([space.initial() for _, space in self.parts])

    def decode(self, x: Any) -> Recipe:
        x = self.clip(x)
        done: dict[str, Recipe] = {}
        for (name, space), sl, refs in zip(self.parts, self.slices, self.refs):
            r = space.decode(x[sl])
            for n, where in refs:
                if where == "base":
                    r.base_model = done[n]
                else:
                    for ref in r.models:
                        if ref.model == n:
                            ref.model, ref.name = done[n], n
            done[name] = r
        return done[self.parts[-1][0]]

    def encode(self, recipe: Recipe) -> np.ndarray:
        x = self._initial.copy()
        index = {n: k for k, (n, _) in enumerate(self.parts)}

        def unnest(k: int, r: Recipe) -> None:
            r = copy.deepcopy(r)
            for n, where in self.refs[k]:
                if where == "base":
                    nested, r.base_model = r.base_model, n
                else:
                    ref = next((m for m in r.models if m.name == n), None)
                    if ref is None:
                        raise UserError(f"recipe has no model entry named {n!r} (hybrid part)")
                    nested, ref.model, ref.name = ref.model, n, None
                if not isinstance(nested, Recipe):
                    raise UserError(f"hybrid part {n!r} should be a nested recipe, got {nested!r}")
                unnest(index[n], nested)
            x[self.slices[k]] = self.parts[k][1].encode(r)

        unnest(len(self.parts) - 1, recipe)
        return x
