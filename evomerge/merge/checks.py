"""Checks run before any merge, each failing with one line that names the culprit.

Cheap by design: they read recipes, configs, safetensors headers and tokenizer files, never tensor data.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from evomerge.merge import methods
from evomerge.merge.params import values
from evomerge.merge.sources import Source
from evomerge.recipe import Recipe
from evomerge.records import UserError

SUPPORTED_DTYPES = ("float16", "bfloat16", "float32", "float64")


def check_parameters(recipe: Recipe) -> None:
    """Every parameter the recipe sets, wherever it sets it (the recipe, a model, a slice, a slice's
    source; nested recipes with their own method), is one its method takes, and each value it holds is
    of the right type and range. Needs no sources, so a config's recipes are checked when it is read."""
    method = methods.get(recipe.merge_method)
    specs = {p.name: p for p in method.params}
    scopes: list[tuple[str, Any]] = [("the recipe", recipe.parameters)]
    for r in recipe.models:
        if isinstance(r.model, Recipe):
            check_parameters(r.model)
        scopes.append((f"model {r.label or r.model.merge_method!r}", r.parameters))
    if isinstance(recipe.base_model, Recipe):
        check_parameters(recipe.base_model)
    for i, s in enumerate(recipe.slices or []):
        if isinstance(s, Mapping):  # malformed slices are named by the planner
            scopes.append((f"slices[{i}]", s.get("parameters")))
            scopes += [(f"model {src.get('model')!r} in slices[{i}]", src.get("parameters"))
                       for src in s.get("sources") or [] if isinstance(src, Mapping)]
    for where, scope in scopes:
        if not isinstance(scope, Mapping):
            continue
        for key, setting in scope.items():
            if key not in specs:
                raise UserError(f"unknown parameter {key!r} for {method.name} ({where}); it takes "
                                f"{', '.join(specs) or 'none'}")
            for v in values(setting):
                specs[key].validate(v, where)


def check_compatible(sources: Mapping[str, Source], reference: str, *, tokens: bool = True) -> None:
    """Every source against `reference`: architecture, tensor names and shapes, dtypes, vocabulary (unless not
    `tokens`: aligned by a tokenizer_source, evomerge.merge.vocab)."""
    ref = sources[reference]
    _check_dtypes(ref)
    ref_vocab = ref.vocabulary() if tokens else None
    for name, src in sources.items():
        if name == reference:
            continue
        if ref.architectures and src.architectures and ref.architectures != src.architectures:
            raise UserError(
                f"architectures differ: {reference!r} is {'/'.join(ref.architectures)}, "
                f"{name!r} is {'/'.join(src.architectures)}"
            )
        vocab = src.vocabulary() if ref_vocab is not None else None
        if ref_vocab is not None and vocab is not None:  # first: it explains embeddings of other shapes
            diff = vocabulary_difference(ref_vocab, vocab)
            if diff:
                raise UserError(f"tokenizers differ between {reference!r} and {name!r}: {diff} "
                                "(tokenizer_source: base, union or a model aligns their embeddings by token)")
        _check_tensors(ref, src)
        _check_dtypes(src)


def _check_tensors(ref: Source, src: Source) -> None:
    ref_names, names = set(ref.names()), set(src.names())
    for missing in sorted(ref_names - names):
        raise UserError(f"tensor {missing} is in {ref.name!r} but missing from {src.name!r}")
    for extra in sorted(names - ref_names):
        raise UserError(f"tensor {extra} is in {src.name!r} but missing from {ref.name!r}")
    for t in ref.names():
        a, b = ref.shape(t), src.shape(t)
        if a != b:
            raise UserError(f"tensor {t} has shape {list(a)} in {ref.name!r} but {list(b)} in {src.name!r}")


def _check_dtypes(src: Source) -> None:
    for t in src.names():
        d = src.dtype_name(t)
        if d not in SUPPORTED_DTYPES:
            raise UserError(
                f"tensor {t} of {src.name!r} has dtype {d}, which is not supported (use {', '.join(SUPPORTED_DTYPES)})"
            )


def vocabulary_difference(a: dict[str, int], b: dict[str, int]) -> str | None:
    """How two token -> id maps differ, in a few words; None when they are the same."""
    if a == b:
        return None
    if len(a) != len(b):
        return f"{len(a)} vs {len(b)} tokens"
    only_a = sorted(set(a) - set(b), key=a.get)
    if only_a:
        tok = only_a[0]
        return f"token {tok!r} (id {a[tok]}) is only in the first ({len(only_a)} such tokens)"
    tok = min((t for t in a if a[t] != b[t]), key=a.get)
    return f"token {tok!r} has id {a[tok]} vs {b[tok]}"
