"""Checks run before any merge, each failing with one line that names the culprit.

Cheap by design: they read configs, safetensors headers and tokenizer files, never tensor data.
"""
from __future__ import annotations

from collections.abc import Mapping

from evomerge.merge.sources import Source
from evomerge.records import UserError

SUPPORTED_DTYPES = ("float16", "bfloat16", "float32", "float64")


def check_compatible(sources: Mapping[str, Source], reference: str) -> None:
    """Every source against `reference`: architecture, tensor names and shapes, dtypes, vocabulary."""
    ref = sources[reference]
    _check_dtypes(ref)
    ref_vocab = ref.vocabulary()
    for name, src in sources.items():
        if name == reference:
            continue
        if ref.architectures and src.architectures and ref.architectures != src.architectures:
            raise UserError(
                f"architectures differ: {reference!r} is {'/'.join(ref.architectures)}, "
                f"{name!r} is {'/'.join(src.architectures)}"
            )
        _check_tensors(ref, src)
        _check_dtypes(src)
        vocab = src.vocabulary()
        if ref_vocab is not None and vocab is not None:
            diff = vocabulary_difference(ref_vocab, vocab)
            if diff:
                raise UserError(f"tokenizers differ between {reference!r} and {name!r}: {diff}")


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
