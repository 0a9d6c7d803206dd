"""A tensor-parallel rank's merge of only its shard (Materializer.tensors(spans=...)): every method's shard equals
that shard of the whole merge, and the task-arithmetic family and localize_stitch read and merge only the shard's bytes."""
from __future__ import annotations

import pytest
import torch

from evomerge.merge import Materializer
from evomerge.merge import methods as registry
from evomerge.recipe import Recipe

SPANNED = {"task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties", "localize_stitch"}


def _recipe(method: str) -> dict:
    """Two experts over the base with each parameter the method has (one model where it takes one)."""
    spec = registry.get(method)
    per_model = {p.name for p in spec.params if p.per_model}
    models = ["base", "a"] if spec.max_inputs == 2 else ["a"] if spec.max_inputs == 1 else ["a", "b"]
    entries = []
    for m, w, d in zip(models, (0.6, 0.4), (0.5, 0.7)):
        params = {k: v for k, v in (("weight", w), ("density", d)) if k in per_model}
        entries.append({"model": m, "parameters": params})
    shared = {"t": 3e-4 if method == "nearswap" else 0.3} if method in ("slerp", "nearswap") else {}
    if method == "sce":
        shared["select_topk"] = 0.5
    base = {"base_model": "base"} if spec.needs_base or method == "slerp" else {}
    return {"merge_method": method, "models": entries, "parameters": shared, **base}


def _shard(shape: tuple[int, ...], rank: int, ranks: int, by_columns: bool) -> tuple[tuple[int, int], ...] | None:
    """The flat spans of a rank's shard of a matrix, as vLLM's loaders cut one: rows (column-parallel) or
    columns (row-parallel); vectors are kept whole."""
    if len(shape) != 2:
        return None
    rows, cols = shape
    if not by_columns:
        step = rows // ranks
        return ((rank * step * cols, (rank + 1) * step * cols),)
    step = cols // ranks
    return tuple((r * cols + rank * step, r * cols + (rank + 1) * step) for r in range(rows))


@pytest.fixture(scope="module")
def materializer(tiny_models):
    return Materializer(tiny_models, base="base", threads=1)


# the data-aware methods (a calibration set's statistics) take the unspanned path too; not run here yet
DATA_AWARE = {m for m in registry.names() if any(p.name == "calibration" for p in registry.get(m).params)}


@pytest.mark.parametrize("method", [m for m in registry.names() if m not in DATA_AWARE])
def test_each_rank_merges_its_shard_as_the_whole_merge_does(method, materializer):
    recipe = Recipe.from_dict(_recipe(method))
    whole = materializer.materialize(recipe)
    counted = materializer.merged_bytes.read
    materializer.materialize(recipe)
    whole_bytes = materializer.merged_bytes.read - counted  # a second candidate: trims' summaries kept
    for rank in range(2):
        spans = {n: _shard(tuple(t.shape), rank, 2, i % 2 == 1) for i, (n, t) in enumerate(whole.items())}
        counted = materializer.merged_bytes.read
        for name, got in materializer.tensors(recipe, spans=spans):
            flat, want = got.reshape(-1), whole[name].reshape(-1)
            for s, e in spans[name] or ((0, want.numel()),):
                assert torch.equal(flat[s:e], want[s:e]), (method, rank, name, s)
        rank_bytes = materializer.merged_bytes.read - counted
        if method in SPANNED:
            assert abs(rank_bytes - whole_bytes / 2) <= 0.05 * whole_bytes / 2, (rank_bytes, whole_bytes)
        else:
            assert rank_bytes == whole_bytes
