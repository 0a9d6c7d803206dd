"""evomerge's deterministic merge methods against mergekit 0.1.5 on the same tiny random Llamas.

Every method with scalar, per-layer-gradient and filtered parameters; results must agree within 1e-6
relative (max |difference| / max |reference| per tensor).
"""
from __future__ import annotations

import pytest

from evomerge.merge import Materializer
from tests.merge_fixtures import assert_matches_mergekit

pytest.importorskip("mergekit")

FILTERED_W = [{"filter": "self_attn", "value": [0.1, 0.9]}, {"filter": "mlp", "value": 0.3}, {"value": 0.7}]
FILTERED_D = [{"filter": "mlp", "value": [0.2, 0.8]}, {"value": 0.55}]


def _gta(method: str, style: str, **extra) -> dict:
    if style == "scalar":
        pa, pb = {"weight": 0.6, "density": 0.5}, {"weight": 0.4, "density": 0.7}
    elif style == "gradient":
        pa, pb = {"weight": [0.2, 0.9, 0.5], "density": [0.3, 0.9]}, {"weight": [1.0, 0.1], "density": [0.8, 0.4, 0.6]}
    else:
        pa, pb = {"weight": FILTERED_W, "density": FILTERED_D}, {"weight": 0.5, "density": FILTERED_D}
    if method == "task_arithmetic":
        pa.pop("density"), pb.pop("density")
    return {"merge_method": method, "base_model": "base", "models": [{"model": "a", "parameters": pa}, {"model": "b", "parameters": pb}], **extra}


CASES = {
    **{f"{m}-{s}": _gta(m, s) for m in ("task_arithmetic", "ties", "breadcrumbs", "breadcrumbs_ties") for s in ("scalar", "gradient", "filtered")},
    "task_arithmetic-lambda-normalize": _gta("task_arithmetic", "gradient", parameters={"lambda": 1.7, "normalize": True}),
    "ties-rescale-unnormalized": _gta("ties", "filtered", parameters={"rescale": True, "normalize": False, "lambda": [0.5, 1.5]}),
    "breadcrumbs-gamma": _gta("breadcrumbs", "scalar", parameters={"gamma": [{"filter": "mlp", "value": 0.1}, {"value": 0.02}]}),
    "linear-scalar": {"merge_method": "linear", "models": [{"model": "a", "parameters": {"weight": 1.0}}, {"model": "b", "parameters": {"weight": 3.0}}]},
    "linear-gradient": {"merge_method": "linear", "models": [{"model": "base", "parameters": {"weight": [1, 0]}}, {"model": "a", "parameters": {"weight": [0, 2, 1]}}], "parameters": {"normalize": False}},
    "linear-filtered": {"merge_method": "linear", "models": [{"model": "a", "parameters": {"weight": FILTERED_W}}, {"model": "b", "parameters": {"weight": 0.5}}]},
    "slerp-scalar": {"merge_method": "slerp", "base_model": "a", "models": [{"model": "a"}, {"model": "b"}], "parameters": {"t": 0.3}},
    "slerp-gradient": {"merge_method": "slerp", "base_model": "base", "models": [{"model": "base"}, {"model": "b"}], "parameters": {"t": [0, 0.5, 0.3, 1]}},
    "slerp-filtered": {"merge_method": "slerp", "base_model": "a", "models": [{"model": "a"}, {"model": "b"}], "parameters": {"t": [{"filter": "self_attn", "value": [0, 0.5, 1]}, {"filter": "mlp", "value": [1, 0.5, 0]}, {"value": 0.5}]}},
    "model_stock": {"merge_method": "model_stock", "base_model": "base", "models": [{"model": "a"}, {"model": "b"}]},
    "model_stock-filter_wise": {"merge_method": "model_stock", "base_model": "base", "models": [{"model": "a"}, {"model": "b"}], "parameters": {"filter_wise": [{"filter": "mlp", "value": True}, {"value": False}]}},
    "passthrough-scalar": {"merge_method": "passthrough", "slices": [{"sources": [{"model": "a", "layer_range": [0, 3]}]}, {"sources": [{"model": "b", "layer_range": [1, 4], "parameters": {"scale": 0.5}}]}]},
    "passthrough-gradient": {"merge_method": "passthrough", "slices": [{"sources": [{"model": "a", "layer_range": [0, 4], "parameters": {"scale": [1.0, 0.0]}}]}]},
    "passthrough-filtered": {"merge_method": "passthrough", "slices": [{"sources": [{"model": "b", "layer_range": [0, 2]}]}, {"sources": [{"model": "a", "layer_range": [2, 4], "parameters": {"scale": [{"filter": "o_proj", "value": 0.0}, {"value": [1.0, 2.0]}]}}]}]},
    "slerp-slices": {"merge_method": "slerp", "base_model": "a", "slices": [{"sources": [{"model": "a", "layer_range": [0, 4]}, {"model": "b", "layer_range": [0, 4]}]}], "parameters": {"t": [0.1, 0.9]}},
}


@pytest.fixture(scope="module")
def materializer(tiny_models):
    return Materializer(tiny_models, base="base", tie_order="mergekit")


@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_mergekit(case, tiny_models, materializer, tmp_path):
    assert_matches_mergekit(CASES[case], tiny_models, materializer, tmp_path)


def test_trim_reproduces_mergekit_ties_among_equal_magnitudes(tmp_path, monkeypatch):
    """Quantised deltas have many equal magnitudes; tie_order="mergekit" keeps the same ones mergekit keeps,
    tie_order="index" keeps as many, of the same magnitudes, choosing the lowest indices among the tied."""
    from mergekit.sparsify import RescaleNorm, magnitude, magnitude_outliers

    import torch

    from evomerge.merge import gta, passes, sparsify
    from evomerge.merge.vectors import TaskVector

    gen = torch.Generator().manual_seed(3)
    delta = torch.randint(-4, 5, (64, 48), generator=gen).float() / 8
    base = torch.randn(64, 48, generator=gen).mul(8).round()  # integers: base + delta is exact in float32
    vec = TaskVector(base, base + delta)
    flat_b, flat_m = base.reshape(-1), (base + delta).reshape(-1)

    def apply(keep):
        out = torch.empty_like(flat_b)
        gta.merge_task_vectors(flat_b, [flat_m], [keep], [1.0], consensus=False, normalize=False, lam=1.0, out=out)
        return (out - flat_b).reshape(delta.shape)

    for density in (0.1, 0.37, 0.5, 0.93):
        for fused in (True, False):  # the numba kernel and the torch path apply the same rule
            monkeypatch.setenv(passes.KERNELS, "numba" if fused else "torch")
            keep = sparsify.magnitude(vec, density, "mergekit")
            assert keep.kind == "band" and keep.drop.size > 0  # the cut falls inside a group of equal magnitudes
            ref = magnitude(delta, density)
            assert torch.equal(apply(keep), ref), (density, fused)
            by_index = apply(sparsify.magnitude(vec, density, "index"))
            assert (by_index != 0).sum() == (ref != 0).sum()
            assert torch.equal(by_index.abs().reshape(-1).sort().values, ref.abs().reshape(-1).sort().values)
            tied = by_index.abs() == by_index[by_index != 0].abs().min()
            kept_at = torch.nonzero((by_index != 0).reshape(-1) & tied.reshape(-1)).reshape(-1)
            all_at = torch.nonzero(tied.reshape(-1) | (delta.abs() == by_index[by_index != 0].abs().min()).reshape(-1)).reshape(-1)
            assert torch.equal(kept_at, all_at[: kept_at.numel()])  # the lowest indices among the tied
            ref_b = magnitude_outliers(delta, density, RescaleNorm.l1, gamma=0.05)
            for order in ("mergekit", "index"):
                keep_b = sparsify.rescale(sparsify.magnitude_outliers(vec, density, 0.05, order), vec)
                got = apply(keep_b)
                if order == "mergekit":  # compared after adding the base back: what a merge writes
                    assert torch.allclose(got + base, ref_b + base, rtol=1e-6, atol=0), (density, fused)
                else:
                    assert (got != 0).sum() == (ref_b != 0).sum()
                    assert torch.allclose(got.abs().reshape(-1).sort().values, ref_b.abs().reshape(-1).sort().values, rtol=1e-5, atol=1e-6)
