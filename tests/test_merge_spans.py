"""A tensor-parallel rank's merge of only its shard (Materializer.tensors(spans=...)): every method's shard equals
that shard of the whole merge, and the task-arithmetic family and localize_stitch read and merge only the shard's
bytes; ranks that rescale sum the norms of their own share of each tensor with each other (evomerge.merge.peers)."""
from __future__ import annotations

import json
import threading

import pytest
import torch

from evomerge.merge import Materializer
from evomerge.merge import methods as registry
from evomerge.merge.peers import Peers
from evomerge.recipe import Recipe

SPANNED = {"task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties", "della", "della_linear",
           "localize_stitch"}
RESCALED = ["dare_ties", "dare_linear", "della", "della_linear", "ties", "breadcrumbs"]  # (the last two: rescale asked)


def _recipe(method: str, calibration: str | None = None) -> dict:
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
    if any(p.name == "calibration" for p in spec.params):
        shared["calibration"] = calibration
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


def _shards(shapes: dict[str, tuple[int, ...]], rank: int, ranks: int) -> dict:
    """Every other matrix cut by rows, the rest by columns (both kinds of tensor-parallel layer)."""
    return {n: _shard(shape, rank, ranks, i % 2 == 1) for i, (n, shape) in enumerate(shapes.items())}


@pytest.fixture(autouse=True)
def small_della_pieces(monkeypatch):
    """DELLA merges pieces of whole rows: small ones here, so shards cross their edges."""
    monkeypatch.setattr(registry, "DELLA_PIECE", 1000)


@pytest.fixture(scope="module")
def materializer(tiny_models):
    return Materializer(tiny_models, base="base", threads=1)


@pytest.fixture(scope="module")
def calibration(tmp_path_factory):
    """A small calibration set for the data-aware methods (statistics cached beside it by EVOMERGE_CACHE)."""
    root = tmp_path_factory.mktemp("calibration")
    path = root / "calib.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in ("Two plus two is four.", "Le chat dort.")))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EVOMERGE_CACHE", str(root / "cache"))
        yield str(path)


@pytest.mark.parametrize("method", registry.names())
def test_each_rank_merges_its_shard_as_the_whole_merge_does(method, materializer, calibration):
    recipe = Recipe.from_dict(_recipe(method, calibration))
    whole = materializer.materialize(recipe)
    counted = materializer.merged_bytes.read
    materializer.materialize(recipe)
    whole_bytes = materializer.merged_bytes.read - counted  # a second candidate: trims' summaries kept
    for rank in range(2):
        spans = _shards({n: tuple(t.shape) for n, t in whole.items()}, rank, 2)
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


def _ranks_merge(tiny_models, recipe: Recipe, folder, ranks: int = 2, candidates: int = 2) -> list[list[dict]]:
    """`ranks` materializers, each on its own thread as tensor-parallel ranks are in their own processes, merging
    `candidates` times their shards of `recipe`; per rank, per candidate, its shard's tensors."""
    got: list[list[dict]] = [[] for _ in range(ranks)]
    errors: list[BaseException] = []

    def rank(r: int) -> None:
        try:
            m = Materializer(tiny_models, base="base", threads=2, peers=Peers(folder, r, ranks))
            spans = _shards({n: m.sources["base"].shape(n) for n in m.names}, r, ranks)
            for _ in range(candidates):
                got[r].append({n: (t, spans[n]) for n, t in m.tensors(recipe, spans=spans)})
        except BaseException as e:  # noqa: BLE001  (re-raised on the test's thread)
            errors.append(e)

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(ranks)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    return got


@pytest.mark.parametrize("method", RESCALED)
def test_ranks_share_a_rescales_norms_and_merge_what_the_whole_merge_does(method, tiny_models, materializer, tmp_path):
    """Each rank sums a rescale's L1 norms over its own half of each tensor, the ranks add their sums (files in a
    shared folder), and each rank's shard equals the whole merge's (up to the order the norms were added in)."""
    spec = _recipe(method)
    spec["parameters"]["rescale"] = True
    recipe = Recipe.from_dict(spec)
    whole = materializer.materialize(recipe)
    for rank, candidates in enumerate(_ranks_merge(tiny_models, recipe, tmp_path, ranks=2, candidates=2)):
        for shard in candidates:
            for name, (got, spans) in shard.items():
                flat, want = got.reshape(-1), whole[name].reshape(-1)
                for s, e in spans or ((0, want.numel()),):
                    assert torch.allclose(flat[s:e], want[s:e], rtol=1e-6, atol=0), (method, rank, name, s)
    # two ranks, two candidates: each rank keeps only the last candidate's files and the one before's
    assert {p.name.split(".")[0] for p in tmp_path.iterdir()} == {"1", "2"}
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize("method", ["ties", "dare_ties", "della", "breadcrumbs_ties"])
def test_stacked_experts_shards_equal_the_whole_merge(method, family_models):
    """Mixtral's experts, which mergekit trims as one stacked tensor (its cut, draws and DELLA's ranks over the
    whole stack): each member's shard equals the whole merge's, and is all that member's merge reads."""
    m = Materializer(family_models("mixtral"), base="base", threads=2)
    recipe = Recipe.from_dict(_recipe(method))
    whole = m.materialize(recipe)
    counted = m.merged_bytes.read
    m.materialize(recipe)
    whole_bytes = m.merged_bytes.read - counted
    shapes = {n: tuple(t.shape) for n, t in whole.items()}
    stacked = [n for n in shapes if ".experts." in n]
    assert stacked
    for rank in range(2):
        spans = _shards(shapes, rank, 2)
        counted = m.merged_bytes.read
        got = dict(m.tensors(recipe, spans=spans))
        for name in stacked:
            flat, want = got[name].reshape(-1), whole[name].reshape(-1)
            for s, e in spans[name]:
                assert torch.equal(flat[s:e], want[s:e]), (method, rank, name, s)
        assert m.merged_bytes.read - counted < 0.55 * whole_bytes  # (norms and the router are kept whole)


def test_a_rank_that_never_posts_is_named_after_the_wait(tmp_path, monkeypatch):
    """A rank that stopped (its process died mid-merge): the others give up after peers.WAIT, naming it."""
    from evomerge.merge import peers

    monkeypatch.setattr(peers, "WAIT", 0.2)
    alone = Peers(tmp_path, 0, 2)
    alone.next()
    with pytest.raises(RuntimeError, match="tensor-parallel rank 1 posted nothing for w a in 0.2 s"):
        alone.total("w a", (1.0, 2.0))
