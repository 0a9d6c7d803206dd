"""Trims of mixture-of-experts checkpoints against mergekit 0.1.5, which merges transformers 5's in-memory
layout: all experts of a layer are one stacked tensor (`mlp.experts.gate_up_proj`, `mlp.experts.down_proj`),
so a trim ranks, and a rescale sums, the whole stack. evomerge reads the stacks from the architecture
table (evomerge.arch.stacks) and trims each stored expert tensor as its part of the stack.

Deterministic trims (TIES, breadcrumbs) equal mergekit's run_merge within 1e-6 on Mixtral; random ones
(DARE-TIES, DELLA) in distribution over seeds, as tests/test_merge_random.py compares them, and the
stack-wide rescale exactly. mergekit 0.1.5 does not run on Qwen2-MoE checkpoints (its inferred
architecture drops the experts); its merge methods applied to the in-memory tensors are the reference
there, as its Qwen3-MoE definition (stacked experts too) would merge them.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from evomerge import arch
from evomerge.merge import Materializer
from evomerge.merge.writer import write_checkpoint
from evomerge.recipe import Recipe
from tests.merge_fixtures import load_checkpoint, mergekit_merge, worst_relative_error

pytest.importorskip("mergekit")

SEEDS = 60


def _recipe(method: str, seed: int | None = None, **shared) -> dict:
    extra = {"breadcrumbs": {"gamma": 0.05}, "breadcrumbs_ties": {"gamma": 0.02}, "della": {"epsilon": 0.25}}.get(method, {})
    cfg = {"merge_method": method, "base_model": "base", "models": [
        {"model": "a", "parameters": {"weight": 0.6, "density": 0.6, **extra}},
        {"model": "b", "parameters": {"weight": 0.4, "density": [0.3, 0.7], **extra}}]}
    if shared:
        cfg["parameters"] = shared
    if seed is not None:
        cfg["seed"] = seed
    return cfg


def _loaded(path) -> dict[str, torch.Tensor]:
    return AutoModelForCausalLM.from_pretrained(path).state_dict()


def test_the_table_stacks_each_layers_experts(family_models):
    """Mixtral: per layer, w1/w3 of every expert (expert by expert, gate then up) and w2 of every expert;
    Qwen2-MoE likewise, its shared expert and its dense layer unstacked."""
    names = list(load_checkpoint(family_models("mixtral")["base"]))
    stacks = arch.stacks(arch.family("mixtral"), names)
    s = stacks["model.layers.1.block_sparse_moe.experts.2.w3.weight"]
    assert s.name == "model.layers.1.mlp.experts.gate_up_proj" and s.parts == 2
    assert s.members == tuple(f"model.layers.1.block_sparse_moe.experts.{e}.{w}.weight" for e in range(3) for w in ("w1", "w3"))
    assert stacks["model.layers.1.block_sparse_moe.experts.0.w2.weight"].parts == 1
    assert len({x.name for x in stacks.values()}) == 2 * 4 and not any("attn" in n or "gate.weight" in n for n in stacks)
    qwen = arch.stacks(arch.family("qwen2_moe"), list(load_checkpoint(family_models("qwen2_moe")["base"])))
    assert len({x.name for x in qwen.values()}) == 2 * 3  # layer 2 is dense
    assert not any("shared_expert" in n or ".layers.2." in n for n in qwen)


@pytest.mark.parametrize("method,shared", [("ties", {}), ("ties", {"rescale": True, "normalize": False}),
                                           ("breadcrumbs", {}), ("breadcrumbs_ties", {})])
def test_mixtral_trims_equal_mergekit(method, shared, family_models, tmp_path):
    paths = family_models("mixtral")
    cfg = _recipe(method, **shared)
    ours = write_checkpoint(Recipe.from_dict(cfg), {k: str(v) for k, v in paths.items()}, tmp_path / "ours")
    mergekit_merge(cfg, paths, tmp_path / "mk")
    err, where = worst_relative_error(_loaded(ours), _loaded(tmp_path / "mk"))
    assert err < 1e-6, (err, where)


@pytest.mark.parametrize("method", ["ties", "breadcrumbs_ties"])
def test_qwen2_moe_trims_equal_mergekit_on_the_in_memory_tensors(method, family_models, tmp_path):
    from mergekit.merge_methods.api import merge_state_dicts

    paths = family_models("qwen2_moe")
    cfg = _recipe(method)
    cfg["models"][1]["parameters"]["density"] = 0.45  # (merge_state_dicts takes no per-layer gradients)
    ours = _loaded(write_checkpoint(Recipe.from_dict(cfg), {k: str(v) for k, v in paths.items()}, tmp_path / "ours"))
    models = {k: _loaded(paths[k]) for k in ("base", "a", "b")}
    params = {k: {m["model"]: m["parameters"][k] for m in cfg["models"] if k in m["parameters"]} for k in ("weight", "density", "gamma")}
    theirs = merge_state_dicts(models, method, parameters={k: v for k, v in params.items() if v}, base="base")
    err, where = worst_relative_error(ours, theirs)
    assert err < 1e-6, (err, where)


def _quantized(paths: dict[str, Path], root: Path) -> dict[str, Path]:
    """The checkpoints with integer base weights and deltas in {±1/8, ..., ±4/8}: every magnitude is tied
    with a quarter of its tensor, and base + delta is exact in float32."""
    gen = torch.Generator().manual_seed(5)
    base = {n: torch.randint(-8, 9, t.shape, generator=gen).float() for n, t in load_checkpoint(paths["base"]).items()}
    out = {}
    for name in ("base", "a", "b"):
        out[name] = root / name
        shutil.copytree(paths[name], out[name])
        sd = base if name == "base" else {
            n: t + torch.randint(1, 5, t.shape, generator=gen) / 8 * (torch.randint(0, 2, t.shape, generator=gen) * 2 - 1)
            for n, t in base.items()}
        save_file(sd, out[name] / "model.safetensors", metadata={"format": "pt"})
    return out


def test_ties_among_equal_magnitudes_across_experts(family_models, tmp_path):
    """Equal magnitudes straddling a stack's threshold: tie_order="mergekit" keeps the same entries as
    mergekit's sort of the stacked tensor; "index" keeps as many, the lowest positions in the stack."""
    paths = _quantized(family_models("mixtral"), tmp_path / "q")
    sources = {k: str(v) for k, v in paths.items()}
    cfg = _recipe("ties")
    ours = Materializer(sources, base="base", tie_order="mergekit").materialize(Recipe.from_dict(cfg))
    theirs = mergekit_merge(cfg, paths, tmp_path / "mk")
    stack = arch.stacks(arch.family("mixtral"), list(ours))["model.layers.0.block_sparse_moe.experts.0.w1.weight"]
    assert torch.equal(torch.cat([ours[n].reshape(-1) for n in stack.members]), theirs[stack.name].reshape(-1))

    one = {"merge_method": "ties", "base_model": "base", "models": [{"model": "a", "parameters": {"weight": 1.0, "density": 0.3}}]}
    kept = Materializer(sources, base="base").materialize(Recipe.from_dict(one))
    base, a = load_checkpoint(paths["base"]), load_checkpoint(paths["a"])
    delta = torch.cat([(a[n] - base[n]).reshape(-1) for n in stack.members])
    order = torch.sort(-delta.abs(), stable=True).indices  # largest first, lower position first among equals
    expected = torch.zeros_like(delta, dtype=torch.bool)
    expected[order[: int(0.3 * delta.numel())]] = True
    got = torch.cat([(kept[n] != base[n]).reshape(-1) for n in stack.members])
    assert torch.equal(got, expected)


def _column_scaled(paths: dict[str, Path], root: Path) -> dict[str, Path]:
    """The checkpoints with the experts' deltas scaled column by column (0.2x to 3x): ranks along a row
    then mostly follow the column, ranks along a column do not."""
    out = dict(paths)
    base = load_checkpoint(paths["base"])
    for name in ("a", "b"):
        out[name] = root / name
        shutil.copytree(paths[name], out[name])
        sd = {n: base[n] + (t - base[n]) * torch.linspace(0.2, 3.0, t.shape[-1]) if "experts" in n else t
              for n, t in load_checkpoint(paths[name]).items()}
        save_file(sd, out[name] / "model.safetensors", metadata={"format": "pt"})
    return out


def _stacked(sd: dict[str, torch.Tensor], layer: int = 0) -> dict[str, torch.Tensor]:
    """Layer `layer`'s expert tensors of a checkpoint state dict, stacked as transformers stacks them."""
    w = lambda e, k: sd[f"model.layers.{layer}.block_sparse_moe.experts.{e}.{k}.weight"]  # noqa: E731
    experts = range(3)
    return {"gate_up_proj": torch.stack([torch.cat([w(e, "w1"), w(e, "w3")]) for e in experts]),
            "down_proj": torch.stack([w(e, "w2") for e in experts])}


@pytest.mark.parametrize("method", ["dare_ties", "della"])
def test_mixtral_random_trims_match_mergekit_in_distribution(method, family_models, tmp_path):
    """Over seeds, the merged delta of a layer's stacked experts has the same mean entry by entry (DELLA's
    keep probability follows each entry's rank along its expert's stacked rows, as mergekit ranks dim 1),
    the same L1/L2 norms and kept fraction as mergekit's."""
    from mergekit.merge_methods.api import merge_state_dicts

    paths = _column_scaled(family_models("mixtral"), tmp_path)
    mat = Materializer({k: str(v) for k, v in paths.items()}, base="base")
    cfg = _recipe(method)
    cfg["models"][1]["parameters"]["density"] = 0.3
    base = _stacked(load_checkpoint(paths["base"]))
    ours = {k: [] for k in base}
    for s in range(SEEDS):
        merged = _stacked(mat.materialize(Recipe.from_dict({**cfg, "seed": s})))
        for k in base:
            ours[k].append(merged[k] - base[k])
    models = {m: {f"model.layers.0.mlp.experts.{k}": v for k, v in _stacked(load_checkpoint(paths[m])).items()} for m in paths}
    params = {k: {m["model"]: m["parameters"][k] for m in cfg["models"] if k in m["parameters"]} for k in ("weight", "density", "epsilon")}
    theirs = {k: [] for k in base}
    for s in range(SEEDS):
        torch.manual_seed(1000 + s)
        merged = merge_state_dicts(models, method, parameters={k: v for k, v in params.items() if v}, base="base")
        for k in base:
            theirs[k].append(merged[f"model.layers.0.mlp.experts.{k}"] - base[k])
    for k in base:
        o, r = torch.stack(ours[k]), torch.stack(theirs[k])
        se = torch.sqrt((o.var(0) + r.var(0)) / SEEDS).clamp_min(1e-6)
        z = (o.mean(0) - r.mean(0)) / se
        assert z.abs().mean() < 1.0 and (z.abs() > 5).float().mean() < 0.002, (k, z.abs().mean(), z.abs().max())
        for norm in (1, 2):
            mo, mr = o.flatten(1).norm(p=norm, dim=1).mean(), r.flatten(1).norm(p=norm, dim=1).mean()
            assert abs(mo / mr - 1) < 0.02, (k, norm, mo, mr)
        assert abs((o != 0).float().mean() - (r != 0).float().mean()) < 0.01, k


@pytest.mark.parametrize("method", ["dare_linear", "della_linear"])
def test_a_stack_is_rescaled_as_one(method, family_models):
    """The rescale restores the L1 norm of the whole stack with one factor (mergekit's rescale of the
    stacked tensor), not of each expert's tensor."""
    paths = family_models("mixtral")
    recipe = Recipe.from_dict({"merge_method": method, "base_model": "base", "seed": 3,
                               "models": [{"model": "a", "parameters": {"weight": 1.0, "density": 0.3}}]})
    out = _stacked(Materializer({k: str(v) for k, v in paths.items()}, base="base").materialize(recipe))
    base, a = _stacked(load_checkpoint(paths["base"])), _stacked(load_checkpoint(paths["a"]))
    for k in base:
        merged, delta = out[k] - base[k], a[k] - base[k]
        kept = merged != 0
        factor = delta.abs().sum() / delta[kept].abs().sum()  # one factor for the stack
        assert torch.allclose(merged, delta * kept * factor, rtol=1e-5, atol=1e-7), k
        assert torch.isclose(merged.abs().sum(), delta.abs().sum(), rtol=1e-5), k
        per_expert = merged.flatten(1).abs().sum(1) / delta.flatten(1).abs().sum(1)
        assert (per_expert - 1).abs().max() > 1e-3, per_expert  # the experts' own norms are not each restored


def test_della_keeps_by_rank_along_each_experts_stacked_rows(family_models, tmp_path):
    """DELLA's keep probability (density - eps) + 2 eps * rank, the rank of |delta| along dim 1 of the
    stacked [experts, rows, cols] tensor (mergekit's della_magprune): over seeds, the entries ranked in the
    top quarter of their expert's column are kept about 0.25 + 0.4 * 0.875 of the time, the bottom quarter
    0.25 + 0.4 * 0.125 (ranks within a row would give both the same frequency)."""
    paths = _column_scaled(family_models("mixtral"), tmp_path)
    mat = Materializer({k: str(v) for k, v in paths.items()}, base="base")
    base, a = _stacked(load_checkpoint(paths["base"])), _stacked(load_checkpoint(paths["a"]))
    kept = {k: torch.zeros_like(v) for k, v in base.items()}
    for s in range(40):
        recipe = Recipe.from_dict({"merge_method": "della_linear", "base_model": "base", "seed": s, "models": [
            {"model": "a", "parameters": {"weight": 1.0, "density": 0.45, "epsilon": 0.2}}]})
        out = _stacked(mat.materialize(recipe))
        for k in base:
            kept[k] += (out[k] != base[k]).float() / 40
    for k in base:
        delta = (a[k] - base[k]).abs()
        rank = delta.argsort(dim=1).argsort(dim=1).float() / (delta.shape[1] - 1)
        top, bottom = kept[k][rank > 0.75].mean(), kept[k][rank < 0.25].mean()
        assert abs(top - 0.6) < 0.03 and abs(bottom - 0.3) < 0.03, (k, top, bottom)


@pytest.mark.parametrize("method", ["ties", "dare_ties", "della", "breadcrumbs"])
def test_merges_of_a_stacks_members_on_threads_equal_one_thread(method, family_models, tmp_path):
    """The members of a stack merged in parallel share its trim and rescale passes: the same result as
    one thread (and summaries kept across candidates give the same again)."""
    paths = {k: str(v) for k, v in _quantized(family_models("mixtral"), tmp_path).items()}  # straddling ties: more shared passes
    recipe = Recipe.from_dict(_recipe(method, seed=7, rescale=True))
    one = Materializer(paths, base="base", threads=1).materialize(recipe)
    threaded = Materializer(paths, base="base", threads=4)
    for _ in range(2):
        many = threaded.materialize(recipe)
        assert all(torch.equal(one[n], many[n]) for n in one)
