"""Property tests of the merge formulas (hypothesis): sign ties, zero deltas, density 0 and 1,
weights summing to zero, SLERP of parallel vectors. Deterministic cases are also checked against
mergekit's in-memory `merge_state_dicts`."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from evomerge.merge import Materializer
from evomerge.merge.methods import slerp
from evomerge.recipe import Recipe

NAME = "model.layers.0.mlp.up_proj.weight"
SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# small vectors with exact repeats, zeros and sign changes: the cases that break naive kernels
values = st.lists(st.sampled_from([-2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0, 0.25, -0.25, 3.0]), min_size=4, max_size=24)


def merge(method: str, base: torch.Tensor, deltas: list[torch.Tensor], weights: list[float], density: float | None = None,
          seed: int = 0, **shared) -> torch.Tensor:
    sources = {"base": {NAME: base}} | {f"m{i}": {NAME: base + d} for i, d in enumerate(deltas)}
    models = []
    for i, w in enumerate(weights):
        p = {"weight": w} | ({"density": density} if density is not None else {})
        models.append({"model": f"m{i}", "parameters": p})
    recipe = Recipe.from_dict({"merge_method": method, "base_model": "base", "models": models, "parameters": shared, "seed": seed})
    return Materializer(sources, base="base", tie_order="mergekit").materialize(recipe)[NAME]  # exact, as the oracle


def mergekit_reference(method: str, base: torch.Tensor, deltas: list[torch.Tensor], weights: list[float], **params) -> torch.Tensor:
    from mergekit.merge_methods.api import merge_state_dicts

    models = {"base": {NAME: base}} | {f"m{i}": {NAME: base + d} for i, d in enumerate(deltas)}
    per_input = {"weight": {f"m{i}": w for i, w in enumerate(weights)}}
    return merge_state_dicts(models, method, parameters=per_input | params, base="base")[NAME]


@SETTINGS
@given(values, st.floats(0.1, 2.0))
def test_ties_sign_tie_keeps_the_positive_side(a, w):
    """tau_b = -tau_a with equal weights: the sum is 0, which elects +, so only positive entries survive."""
    ta = torch.tensor(a)
    base = torch.arange(ta.numel()) / 4 - 1  # dyadic, so base + delta - base is exact and the tie stays a tie
    out = merge("ties", base, [ta, -ta], [w, w], density=1.0)
    assert torch.allclose(out - base, ta.abs(), atol=1e-6)
    assert torch.equal(out, mergekit_reference("ties", base, [ta, -ta], [w, w], density=1.0))


@SETTINGS
@given(values, values, st.floats(-1.5, 1.5), st.floats(-1.5, 1.5), st.sampled_from([0.0, 0.3, 0.5, 1.0]))
def test_ties_matches_mergekit_on_adversarial_inputs(a, b, wa, wb, density):
    n = min(len(a), len(b))
    ta, tb = torch.tensor(a[:n]), torch.tensor(b[:n])
    base = torch.linspace(0.5, -0.5, n)
    ours = merge("ties", base, [ta, tb], [wa, wb], density=density)
    ref = mergekit_reference("ties", base, [ta, tb], [wa, wb], density=density)
    assert torch.isfinite(ours).all()
    assert torch.allclose(ours, ref, rtol=1e-6, atol=1e-6), (ours, ref)


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties", "della"])
def test_all_zero_deltas_give_the_base(method):
    base = torch.randn(32, 16, generator=torch.Generator().manual_seed(0))
    zero = torch.zeros_like(base)
    density = None if method == "task_arithmetic" else 0.5
    out = merge(method, base, [zero, zero], [0.7, 0.6], density=density)
    assert torch.equal(out, base)


@SETTINGS
@given(st.integers(0, 2**31 - 1))
def test_density_one_is_task_arithmetic_and_zero_is_the_base(seed):
    gen = torch.Generator().manual_seed(seed)
    base, ta, tb = (torch.randn(8, 8, generator=gen) for _ in range(3))
    plain = merge("task_arithmetic", base, [ta, tb], [0.6, 0.9])
    assert torch.allclose(merge("dare_linear", base, [ta, tb], [0.6, 0.9], density=1.0, seed=seed), plain, atol=1e-6)
    assert torch.allclose(merge("breadcrumbs", base, [ta, tb], [0.6, 0.9], density=1.0), plain, atol=1e-6)
    for method in ("ties", "dare_ties", "dare_linear", "breadcrumbs", "della"):
        assert torch.equal(merge(method, base, [ta, tb], [0.6, 0.9], density=0.0, seed=seed), base), method


@SETTINGS
@given(values, st.floats(0.1, 2.0))
def test_weights_summing_to_zero_stay_finite(a, w):
    """normalize divides by the weight sum; a zero sum must not blow up (mergekit: divide by 1 instead)."""
    ta = torch.tensor(a)
    tb = ta.flip(0)
    base = torch.ones_like(ta)
    for method in ("task_arithmetic", "ties", "dare_linear"):
        density = None if method == "task_arithmetic" else 1.0
        out = merge(method, base, [ta, tb], [w, -w], density=density, normalize=True)
        assert torch.isfinite(out).all(), method
        ref = mergekit_reference(method, base, [ta, tb], [w, -w], normalize=True, **({"density": 1.0} if density else {}))
        assert torch.allclose(out, ref, rtol=1e-6, atol=1e-6), method


@SETTINGS
@given(values, st.floats(0.01, 10.0), st.floats(0.0, 1.0), st.booleans())
def test_slerp_of_parallel_vectors_is_linear(a, c, t, flip):
    v0 = torch.tensor(a) + 0.1  # never all zero
    v1 = v0 * (-c if flip else c)
    out = torch.empty_like(v0)
    slerp(t, v0, v1, out)
    assert torch.allclose(out, (1 - t) * v0 + t * v1, rtol=1e-5, atol=1e-6)


@SETTINGS
@given(st.floats(0.0, 1.0), st.integers(2, 64))
def test_slerp_of_orthogonal_unit_vectors_stays_on_the_circle(t, n):
    v0, v1 = torch.zeros(n), torch.zeros(n)
    v0[0], v1[1] = 1.0, 1.0
    out = torch.empty(n)
    slerp(t, v0, v1, out)
    assert math.isclose(out.norm().item(), 1.0, rel_tol=1e-5)
    assert math.isclose(out[0].item(), math.cos(t * math.pi / 2), abs_tol=1e-5)
