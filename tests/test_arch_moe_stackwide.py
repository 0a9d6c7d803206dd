"""Whole-tensor merge methods of mixture-of-experts checkpoints against mergekit 0.1.5, which merges each
layer's stacked experts (transformers 5's `mlp.experts.gate_up_proj` [E, 2I, H], `down_proj` [E, H, I])
as one tensor: slerp's angle, karcher's and multislerp's means, model_stock's and nuslerp's cosines (the
whole stack, or row-wise each position's vector across the experts) and sce's variance cut and energies
are the stack's. evomerge merges each stored expert tensor, reading those statistics as sums over the
stack's members (evomerge.merge.stackwide). The reference on Qwen2-MoE is mergekit's methods applied to
the in-memory tensors (tests/test_arch_moe_trims.py says why).
"""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from evomerge.merge import Materializer
from evomerge.merge.writer import write_checkpoint
from evomerge.recipe import Recipe
from tests.merge_fixtures import load_checkpoint, mergekit_merge, worst_relative_error

pytest.importorskip("mergekit")

W = {"a": {"weight": 0.7}, "b": {"weight": 0.4}}

CASES = {
    "slerp": ({"merge_method": "slerp", "base_model": "base", "models": [{"model": "base"}, {"model": "a"}]}, {"t": 0.35}),
    "karcher": ({"merge_method": "karcher", "models": [{"model": m} for m in ("base", "a", "b")]}, {}),
    "multislerp": ({"merge_method": "multislerp", "base_model": "base", "models": []}, {}),
    "multislerp-no-base": ({"merge_method": "multislerp", "models": [
        {"model": m, "parameters": {"weight": w}} for m, w in (("base", 0.2), ("a", 0.5), ("b", 0.3))]}, {}),
    "model_stock": ({"merge_method": "model_stock", "base_model": "base", "models": []}, {}),
    "model_stock-filter_wise": ({"merge_method": "model_stock", "base_model": "base", "models": []}, {"filter_wise": True}),
    "nuslerp": ({"merge_method": "nuslerp", "base_model": "base", "models": []}, {}),
    "nuslerp-row_wise": ({"merge_method": "nuslerp", "base_model": "base", "models": []}, {"nuslerp_flatten": False, "nuslerp_row_wise": True}),
    "nuslerp-row_wise-no-base": ({"merge_method": "nuslerp", "models": [{"model": m, "parameters": W[m]} for m in ("a", "b")]},
                                 {"nuslerp_flatten": False, "nuslerp_row_wise": True}),
    "nuslerp-rows": ({"merge_method": "nuslerp", "base_model": "base", "models": []}, {"nuslerp_flatten": False}),
    "sce": ({"merge_method": "sce", "base_model": "base", "models": []}, {}),
    "sce-topk": ({"merge_method": "sce", "base_model": "base", "models": []}, {"select_topk": 0.3}),
}


def _recipe(case: str) -> dict:
    cfg, shared = CASES[case]
    cfg = {**cfg, "parameters": shared} if shared else dict(cfg)
    if not cfg["models"]:
        weighted = cfg["merge_method"] in ("multislerp", "nuslerp")
        cfg["models"] = [{"model": m, **({"parameters": W[m]} if weighted else {})} for m in ("a", "b")]
    return cfg


def _loaded(path) -> dict[str, torch.Tensor]:
    return AutoModelForCausalLM.from_pretrained(path).state_dict()


@pytest.mark.parametrize("case", list(CASES))
def test_mixtral_equals_mergekit(case, family_models, tmp_path):
    paths = family_models("mixtral")
    cfg = _recipe(case)
    ours = write_checkpoint(Recipe.from_dict(cfg), {k: str(v) for k, v in paths.items()}, tmp_path / "ours")
    mergekit_merge(cfg, paths, tmp_path / "mk")
    err, where = worst_relative_error(_loaded(ours), _loaded(tmp_path / "mk"))
    assert err < 1e-6, (err, where)


@pytest.mark.parametrize("case", list(CASES))
def test_qwen2_moe_equals_mergekit_on_the_in_memory_tensors(case, family_models, tmp_path):
    from mergekit.merge_methods.api import merge_state_dicts

    paths = family_models("qwen2_moe")
    cfg = _recipe(case)
    ours = _loaded(write_checkpoint(Recipe.from_dict(cfg), {k: str(v) for k, v in paths.items()}, tmp_path / "ours"))
    names = [m["model"] for m in cfg["models"]]
    base = cfg.get("base_model")
    models = {k: _loaded(paths[k]) for k in dict.fromkeys(([base] if base else []) + names)}
    params = dict(cfg.get("parameters", {}))
    weights = {m["model"]: m["parameters"]["weight"] for m in cfg["models"] if "parameters" in m}
    if weights:
        params["weight"] = weights
    theirs = merge_state_dicts(models, cfg["merge_method"], parameters=params, base=base)
    err, where = worst_relative_error(ours, theirs)
    assert err < 1e-6, (err, where)


@pytest.mark.parametrize("case", ["slerp", "karcher", "multislerp", "model_stock", "nuslerp", "nuslerp-row_wise", "sce-topk"])
def test_a_stacks_members_merged_on_threads_equal_one_thread(case, family_models, tmp_path):
    """The members of a stack merged in parallel share its statistics: the same result as one thread, twice
    (quantized deltas: sce's cut straddles equal variances, spread over several members)."""
    from tests.test_arch_moe_trims import _quantized

    paths = {k: str(v) for k, v in _quantized(family_models("mixtral"), tmp_path).items()}
    recipe = Recipe.from_dict(_recipe(case))
    one = Materializer(paths, base="base", threads=1).materialize(recipe)
    threaded = Materializer(paths, base="base", threads=2)
    for _ in range(2):
        many = threaded.materialize(recipe)
        assert all(torch.equal(one[n], many[n]) for n in one), case


def test_a_shared_value_with_readers_is_dropped_after_the_last():
    """A stack's large statistic (nuslerp's row-wise cosines) is freed once its members have read it, not
    kept to the end of the merge; one without readers is kept."""
    from evomerge.merge.vectors import Shared

    shared, calls = Shared(), []
    compute = lambda: calls.append(1) or len(calls)  # noqa: E731
    assert [shared.get("rows", compute, 2) for _ in range(2)] == [1, 1]
    assert shared.get("rows", compute, 2) == 2  # dropped after its two readers: computed anew
    assert [shared.get("kept", compute) for _ in range(3)] == [3, 3, 3]


def test_sce_among_equal_variances_at_the_cut(family_models, tmp_path):
    """Equal variances straddling the stack's cut (quantized deltas, every one non-zero: an entry is changed
    exactly where it is selected): evomerge selects as many entries as mergekit, the same ones above the
    cut, and among those at the cut the first in the stack's order (mergekit's torch.topk of the stacked
    tensor makes an unspecified choice there; the models' energies, and so every merged value, follow)."""
    from evomerge import arch
    from tests.test_arch_moe_trims import _quantized

    paths = _quantized(family_models("mixtral"), tmp_path / "q")
    cfg = {**_recipe("sce"), "parameters": {"select_topk": 0.3}}
    ours = Materializer({k: str(v) for k, v in paths.items()}, base="base").materialize(Recipe.from_dict(cfg))
    theirs = mergekit_merge(cfg, paths, tmp_path / "mk")
    sds = {k: load_checkpoint(paths[k]) for k in ("base", "a", "b")}
    straddled = 0
    for stack in {s.name: s for s in arch.stacks(arch.family("mixtral"), list(ours)).values()}.values():
        flat = lambda sd: torch.cat([sd[n].reshape(-1) for n in stack.members])  # noqa: E731
        base = flat(sds["base"])
        var = torch.var(torch.stack([flat(sds[m]) - base for m in ("a", "b")]), dim=0, unbiased=False)
        k = int(torch.count_nonzero(var) * 0.3)
        cut = torch.sort(var, descending=True).values[k - 1]
        expected = var > cut
        expected[(var == cut).nonzero().reshape(-1)[: k - int(expected.sum())]] = True
        mine, mk = flat(ours) != base, theirs[stack.name].reshape(-1) != base
        assert torch.equal(mine, expected), stack.name
        assert int(mk.sum()) == k and torch.equal(mk & (var != cut), expected & (var != cut)), stack.name
        straddled += int((mine != mk).sum())
    assert straddled > 0  # the fixture does straddle the cut
