"""DARE and DELLA: reproducible for a seed, and statistically the same as mergekit 0.1.5.

Both implementations draw different random masks, so they are compared in distribution: over many
seeds, the mean merged delta (its expected value), the kept fraction, and the L1 and L2 norms of the
merged delta must agree within a few standard errors; DELLA must keep large entries more often.
"""
from __future__ import annotations

import pytest
import torch

from evomerge.merge import Materializer, passes, rng
from evomerge.recipe import Recipe

pytest.importorskip("mergekit")

NAME = "model.layers.0.mlp.down_proj.weight"
SEEDS = 60


@pytest.fixture(scope="module")
def tensors():
    g = torch.Generator().manual_seed(11)
    base = torch.randn(48, 64, generator=g)
    return base, torch.randn(48, 64, generator=g) * 0.1, torch.randn(48, 64, generator=g) * 0.1


def _recipe(method: str, density: float, seed: int, n: int) -> Recipe:
    weights = (0.7, 0.5)[:n]
    models = [{"model": f"m{i}", "parameters": {"weight": w, "density": density}} for i, w in enumerate(weights)]
    return Recipe.from_dict({"merge_method": method, "base_model": "base", "models": models, "seed": seed})


def _ours(method, tensors, density, n, seeds):
    base, *deltas = tensors
    mat = Materializer({"base": {NAME: base}} | {f"m{i}": {NAME: base + d} for i, d in enumerate(deltas[:n])}, base="base")
    return torch.stack([mat.materialize(_recipe(method, density, s, n))[NAME] - base for s in seeds])


def _mergekit(method, tensors, density, n, seeds):
    from mergekit.merge_methods.api import merge_state_dicts

    base, *deltas = tensors
    models = {"base": {NAME: base}} | {f"m{i}": {NAME: base + d} for i, d in enumerate(deltas[:n])}
    weights = {f"m{i}": w for i, w in enumerate((0.7, 0.5)[:n])}
    outs = []
    for s in seeds:
        torch.manual_seed(s)
        outs.append(merge_state_dicts(models, method, parameters={"weight": weights, "density": density}, base="base")[NAME] - base)
    return torch.stack(outs)


@pytest.mark.parametrize("method", ["dare_ties", "dare_linear", "della"])
def test_same_seed_same_output_other_seed_other_output(method, tensors):
    a, b = _ours(method, tensors, 0.4, 2, [5, 5])
    assert torch.equal(a, b)
    c = _ours(method, tensors, 0.4, 2, [6])[0]
    assert not torch.equal(a, c)


@pytest.mark.parametrize("method,n", [("dare_linear", 1), ("dare_ties", 2), ("della", 2), ("della_linear", 1)])
def test_distribution_matches_mergekit(method, n, tensors):
    density = 0.3
    ours = _ours(method, tensors, density, n, range(SEEDS))
    ref = _mergekit(method, tensors, density, n, range(1000, 1000 + SEEDS))
    # expected value: the mean delta over seeds agrees elementwise within a few standard errors
    se = torch.sqrt((ours.var(0) + ref.var(0)) / SEEDS).clamp_min(1e-6)
    z = (ours.mean(0) - ref.mean(0)) / se
    assert z.abs().mean() < 1.0 and (z.abs() > 5).float().mean() < 0.002, (z.abs().mean(), z.abs().max())
    # norm behaviour: L1 and L2 of the merged delta, and the kept fraction, agree on average
    for norm in (1, 2):
        mo, mr = ours.flatten(1).norm(p=norm, dim=1), ref.flatten(1).norm(p=norm, dim=1)
        assert abs(mo.mean() / mr.mean() - 1) < 0.02, (norm, mo.mean(), mr.mean())
    ko, kr = (ours != 0).float().mean(), (ref != 0).float().mean()
    assert abs(ko - kr) < 0.01, (ko, kr)


def test_dare_rescale_preserves_l1_and_keeps_density(tensors):
    base, delta, _ = tensors
    out = _ours("dare_linear", (base, delta), 0.25, 1, [3])[0] / 0.7  # remove the weight
    delta = (base + delta) - base  # the delta as the sources hold it, rounding included
    assert torch.isclose(out.abs().sum(), delta.abs().sum(), rtol=1e-5)
    kept = (out != 0).float().mean().item()
    sd = (0.25 * 0.75 / out.numel()) ** 0.5
    assert abs(kept - 0.25) < 5 * sd
    nz = out != 0
    factor = delta.abs().sum() / delta[nz].abs().sum()  # one common factor restores the L1 norm
    assert torch.allclose(out, delta * nz * factor, atol=1e-6)


def test_della_keeps_large_entries_more_often(tensors):
    base, delta, _ = tensors
    outs = _ours("della_linear", (base, delta), 0.4, 1, range(30))
    kept = (outs != 0).float().mean(0)
    rank = delta.abs().argsort(dim=1).argsort(dim=1).float() / (delta.shape[1] - 1)
    top, bottom = kept[rank > 0.75].mean(), kept[rank < 0.25].mean()
    # keep probability (d - eps) + 2 eps r: about 0.25 + 0.3 * 0.875 vs 0.25 + 0.3 * 0.125
    assert abs(top - 0.5125) < 0.03 and abs(bottom - 0.2875) < 0.03, (top, bottom)


def test_draws_are_uniform_and_independent():
    """The counter-based draws: keep fractions, and joint keeps across models and across neighbours."""
    n = 1 << 20
    u = rng.draws(rng.key_for(0, NAME, "m0"), 0, n).double() / 2**32
    v = rng.draws(rng.key_for(0, NAME, "m1"), 0, n).double() / 2**32
    for p in (0.01, 0.3, 0.9):
        a, b = u < p, v < p
        assert abs(a.double().mean() - p) < 5 * (p * (1 - p) / n) ** 0.5, p
        sd = (p * p * (1 - p * p) / n) ** 0.5
        assert abs((a & b).double().mean() - p * p) < 5 * sd, p
        assert abs((a[1:] & a[:-1]).double().mean() - p * p) < 5 * sd, p


@pytest.mark.parametrize("densities", [(0.3, 0.6), (1.0, 0.4), (0.5, 1e-12)])
def test_dare_ties_fused_pair_matches_torch_path(densities, tensors, monkeypatch):
    """The CPU kernel's one-loop DARE-TIES pair (random or whole trims) draws what the torch path draws."""
    base, *deltas = tensors
    mat = Materializer({"base": {NAME: base}} | {f"m{i}": {NAME: base + d} for i, d in enumerate(deltas)}, base="base")
    models = [{"model": f"m{i}", "parameters": {"weight": w, "density": d}} for i, (w, d) in enumerate(zip((0.7, 0.5), densities))]
    recipe = Recipe.from_dict({"merge_method": "dare_ties", "base_model": "base", "models": models, "seed": 4})
    fused = mat.materialize(recipe)[NAME]
    monkeypatch.setenv(passes.KERNELS, "torch")
    plain = mat.materialize(recipe)[NAME]
    assert torch.allclose(fused, plain, rtol=1e-5, atol=1e-7), (fused - plain).abs().max()
    kept = ((fused - base) != 0).float().mean().item()  # an entry survives where either model keeps it
    assert abs(kept - (1 - (1 - densities[0]) * (1 - densities[1]))) < 0.05, kept
