"""mergekit 0.1.5's other methods (nuslerp, multislerp, karcher, sce, ram, ramplus_tl, nearswap,
arcee_fusion) against mergekit on the same tiny random Llamas, within 1e-6 relative as
tests/test_merge_mergekit.py; `evomerge merge` reading each from a mergekit YAML; della_linear end to
end; out-of-range parameters as one-line errors.

None of these eight draws random numbers in mergekit on tensors of up to 1,000,000 entries, so all are
compared exactly. (arcee_fusion's quartiles are sampled by mergekit, unseeded, on larger tensors; see
test_arcee_fusion_quartiles_are_exact_where_mergekit_samples.)
"""
from __future__ import annotations

import pytest
import torch

from evomerge.merge import Materializer
from evomerge.recipe import Recipe
from tests.merge_fixtures import assert_matches_mergekit, load_checkpoint, mergekit_merge, worst_relative_error
from tests.test_merge_cli import assert_failed_cleanly, run_cli, workdir, write_config  # noqa: F401

pytest.importorskip("mergekit")

FILTERED = [{"filter": "self_attn", "value": [0.2, 0.9]}, {"filter": "mlp", "value": 0.35}, {"value": 0.6}]


def _two(method: str, pa: dict | None = None, pb: dict | None = None, base: str | None = "base", **top) -> dict:
    cfg = {"merge_method": method, "models": [{"model": "a", "parameters": pa or {}}, {"model": "b", "parameters": pb or {}}], **top}
    if base:
        cfg["base_model"] = base
    return cfg


def _pair(method: str, **top) -> dict:
    """base and one other model (nearswap, arcee_fusion)."""
    return {"merge_method": method, "base_model": "base", "models": [{"model": "base"}, {"model": "a"}], **top}


W = ({"weight": 0.3}, {"weight": 0.7})
CASES = {
    "nuslerp-base": _two("nuslerp", *W),
    "nuslerp-no-base": _two("nuslerp", *W, base=None),
    "nuslerp-row_wise": _two("nuslerp", {"weight": [0.1, 0.9]}, {"weight": 0.5}, parameters={"nuslerp_flatten": False, "nuslerp_row_wise": True}),
    "nuslerp-per-row-no-base": _two("nuslerp", {"weight": FILTERED}, {"weight": 0.4}, base=None, parameters={"nuslerp_flatten": False}),
    "nuslerp-weights-cancel": _two("nuslerp", {"weight": 1.0}, {"weight": -1.0}),
    "multislerp-base": _two("multislerp", {"weight": [0.2, 0.8]}, {"weight": FILTERED}),
    "multislerp-no-base-3": {"merge_method": "multislerp", "models": [{"model": m, "parameters": {"weight": w}} for m, w in (("base", 1.0), ("a", 2.0), ("b", [0.5, 3.0]))]},
    "multislerp-unnormalized": _two("multislerp", *W, parameters={"normalize_weights": False}),
    "multislerp-one": {"merge_method": "multislerp", "base_model": "base", "models": [{"model": "a", "parameters": {"weight": 0.5}}]},
    "karcher": _two("karcher"),
    "karcher-no-base": _two("karcher", base=None),
    "karcher-iterations": _two("karcher", parameters={"max_iter": [{"filter": "mlp", "value": 0}, {"value": 3}], "tol": 1e-7}),
    "sce": _two("sce"),
    "sce-topk": _two("sce", parameters={"select_topk": 0.4}),
    "sce-topk-gradient": _two("sce", parameters={"select_topk": [{"filter": "mlp", "value": [0.1, 0.9]}, {"value": 0.0}], "int8_mask": True}),
    "ram": _two("ram"),
    "ram-epsilon": _two("ram", parameters={"epsilon": [1e-4, 5e-4]}),
    "ramplus_tl": _two("ramplus_tl"),
    "ramplus_tl-tuned": _two("ramplus_tl", parameters={"r": 0.8, "alpha": [0.1, 2.0], "epsilon": 3e-4}),
    "nearswap": _pair("nearswap", parameters={"t": 3e-4}),
    "nearswap-gradient": _pair("nearswap", parameters={"t": [{"filter": "self_attn", "value": [0.0, 1e-3]}, {"value": 1e-4}]}),
    "arcee_fusion": _pair("arcee_fusion"),
    "arcee_fusion-unlisted-base": {"merge_method": "arcee_fusion", "base_model": "base", "models": [{"model": "b"}]},
    "karcher-slices": {"merge_method": "karcher", "slices": [{"sources": [{"model": m, "layer_range": r} for m, r in (("base", [0, 2]), ("a", [2, 4]), ("b", [1, 3]))]}]},
    "multislerp-slices": {"merge_method": "multislerp", "parameters": {"weight": [0.2, 0.7]}, "slices": [{"sources": [{"model": m, "layer_range": r} for m, r in (("base", [0, 2]), ("a", [2, 4]), ("b", [1, 3]))]}]},
    "sce-slices": {"merge_method": "sce", "base_model": "base", "parameters": {"select_topk": 0.5}, "slices": [
        {"sources": [{"model": "base", "layer_range": [0, 2]}, {"model": "a", "layer_range": [2, 4]}, {"model": "b", "layer_range": [1, 3]}]}]},
}


@pytest.fixture(scope="module")
def materializer(tiny_models):
    return Materializer(tiny_models, base="base")


@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_mergekit(case, tiny_models, materializer, tmp_path):
    assert_matches_mergekit(CASES[case], tiny_models, materializer, tmp_path)


def test_cases_exercise_the_branches(tiny_models, materializer):
    """The cases above are not vacuous: the thresholds they test split each tensor, some entries on
    each side (nearswap: taken whole from the other model or only moved toward it; arcee_fusion: taken
    or kept; ram: changed by neither model, by one, or by both)."""
    name = "model.layers.1.mlp.up_proj.weight"
    base, a = load_checkpoint(tiny_models["base"])[name], load_checkpoint(tiny_models["a"])[name]

    def merged(case: str) -> torch.Tensor:
        return materializer.materialize(Recipe.from_dict(CASES[case]))[name]

    def between(fraction: torch.Tensor) -> bool:
        return 0.02 < fraction.float().mean() < 0.98

    near = merged("nearswap")
    assert between((near - a).abs() <= 1e-8)
    fused = merged("arcee_fusion")
    taken = (fused - a).abs() <= 1e-8
    assert between(taken) and torch.equal(fused[~taken], base[~taken])
    ram = merged("ram-epsilon") - base
    assert between(ram == 0) and between(ram != 0)


CLI_CASES = ["nuslerp-row_wise", "multislerp-no-base-3", "karcher", "sce-topk", "ram", "ramplus_tl-tuned", "nearswap", "arcee_fusion"]


@pytest.mark.parametrize("case", CLI_CASES)
def test_evomerge_merge_reads_the_mergekit_yaml(case, workdir, tiny_models, monkeypatch, capsys, tmp_path):  # noqa: F811
    out = workdir / "merged"
    code, stdout, err = run_cli(monkeypatch, capsys, "merge", str(write_config(workdir, CASES[case])), "-o", str(out))
    assert code == 0, err
    err_rel, where = worst_relative_error(load_checkpoint(out), mergekit_merge(CASES[case], tiny_models, tmp_path / "mk"))
    assert err_rel <= 1e-6, (case, err_rel, where)
    assert f"merge_method: {CASES[case]['merge_method']}" in (out / "mergekit_config.yml").read_text()


def test_della_linear_end_to_end(workdir, materializer, monkeypatch, capsys):  # noqa: F811
    """della_linear reads from mergekit YAML and merges reproducibly per seed. Its random masks are not
    mergekit's (mergekit draws from torch's global generator); tests/test_merge_random.py compares the
    two in distribution."""
    cfg = _two("della_linear", {"weight": 0.6, "density": 0.5}, {"weight": 0.4, "density": 0.7, "epsilon": 0.1}, seed=7)
    outs = []
    for name in ("o1", "o2"):
        code, _, err = run_cli(monkeypatch, capsys, "merge", str(write_config(workdir, cfg)), "-o", str(workdir / name))
        assert code == 0, err
        outs.append(load_checkpoint(workdir / name))
    ours = materializer.materialize(Recipe.from_dict(cfg))
    other_seed = materializer.materialize(Recipe.from_dict({**cfg, "seed": 8}))
    name = "model.layers.2.mlp.down_proj.weight"
    assert all(torch.equal(o[name], ours[name]) for o in outs)
    assert not torch.equal(ours[name], other_seed[name])


@pytest.mark.parametrize("cfg,needle", [
    (_two("nuslerp", *W, parameters={"nuslerp_flatten": "sometimes"}), "nuslerp_flatten"),
    ({"merge_method": "nuslerp", "models": [{"model": m, "parameters": {"weight": 1.0}} for m in ("base", "a", "b")]}, "exactly 2 models besides the base"),
    (_two("nuslerp", {"weight": 0.5}, {}), "missing required parameter 'weight'"),
    (_two("multislerp", {"weight": 1.0}, {"weight": -1.0}), "weights sum to 0"),
    (_two("multislerp", *W, parameters={"eps": 0}), "parameter 'eps' for the recipe must be > 0, got 0"),
    (_two("karcher", parameters={"max_iter": -1}), "parameter 'max_iter' for the recipe must be >= 0, got -1"),
    (_two("sce", parameters={"select_topk": [{"filter": "lm_head", "value": 1.5}, {"value": 0.5}]}), "parameter 'select_topk' for the recipe must be in [0, 1], got 1.5"),
    (_two("sce", base=None), "sce needs a base_model"),
    (_two("ram", parameters={"epsilon": -0.1}), "parameter 'epsilon' for the recipe must be >= 0, got -0.1"),
    (_two("ramplus_tl", parameters={"epsilon": 0}), "parameter 'epsilon' for the recipe must be > 0, got 0"),
    (_two("ramplus_tl", parameters={"alpha": -1}), "parameter 'alpha' for the recipe must be >= 0, got -1"),
    (_pair("nearswap", parameters={"t": -0.5}), "parameter 't' for the recipe must be >= 0, got -0.5"),
    (_pair("nearswap"), "missing required parameter 't'"),
    (_two("nearswap", parameters={"t": 0.1}), "nearswap takes 2 input models"),
    (_two("arcee_fusion"), "arcee_fusion takes 2 input models"),
    (_pair("arcee_fusion", parameters={"t": 0.1}), "unknown parameter 't' for arcee_fusion"),
], ids=lambda x: x if isinstance(x, str) else x["merge_method"])
def test_mistakes_end_in_one_line(cfg, needle, workdir, monkeypatch, capsys):  # noqa: F811
    code, _, err = run_cli(monkeypatch, capsys, "merge", str(write_config(workdir, cfg)), "-o", str(workdir / "o"))
    assert_failed_cleanly(code, err, workdir / "o", needle)


def test_arcee_fusion_quartiles_are_exact_where_mergekit_samples():
    """On a tensor of more than 1,000,000 entries mergekit estimates the quartiles from a random sample
    (torch's unseeded global generator), so its arcee_fusion cannot be matched there; evomerge takes the
    exact order statistics at mergekit's positions, which its estimates scatter around."""
    from mergekit.merge_methods.arcee_fusion import DynamicThresholdFusion

    from evomerge.merge.selective import upper_fence

    x = torch.randn(1_500_001, generator=torch.Generator().manual_seed(0)).abs()
    s = x.sort().values
    n = x.numel() - 1
    exact = s[n // 2] + 1.5 * (s[3 * n // 4] - s[n // 4])
    assert upper_fence(x) == exact
    small = x[:999_999]  # mergekit reads every entry: the same value
    assert upper_fence(small) == DynamicThresholdFusion().calculate_dynamic_threshold(small)
    estimates = torch.stack([DynamicThresholdFusion().calculate_dynamic_threshold(x) for _ in range(3)])
    assert ((estimates - exact).abs() / exact).max() < 5e-3


def test_arcee_fusion_row_divergence_is_the_same_in_blocks():
    """Large tensors' row KL divergences are computed a block of rows at a time: bitwise the same."""
    from evomerge.merge.selective import _row_kl

    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(3, 50, 13, generator=g), torch.randn(3, 50, 13, generator=g)
    whole = _row_kl(x, y)
    assert whole.shape == (3, 50, 1) and torch.equal(_row_kl(x, y, block=40), whole)
