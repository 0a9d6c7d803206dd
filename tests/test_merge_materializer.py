"""The resident materializer: load_into a live module, statistics computed once, in-memory sources."""
from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

from evomerge.merge import Materializer
from evomerge.recipe import Recipe


def _ties(wa: float, da: float, seed: int = 0, method: str = "ties") -> Recipe:
    return Recipe.from_dict({"merge_method": method, "base_model": "base", "seed": seed, "models": [
        {"model": "a", "parameters": {"weight": [wa, 1 - wa], "density": da}},
        {"model": "b", "parameters": {"weight": 0.5, "density": [0.9, 0.2]}}]})


def test_load_into_writes_the_merged_weights_in_place(tiny_models):
    mat = Materializer(tiny_models, base="base")
    model = AutoModelForCausalLM.from_pretrained(tiny_models["base"])
    params_before = {n: p.data_ptr() for n, p in model.named_parameters()}
    for recipe in (_ties(0.3, 0.4), _ties(0.8, 0.7, method="dare_ties", seed=3)):
        mat.load_into(recipe, model)
        expected = mat.materialize(recipe)
        state = model.state_dict()
        assert all(torch.equal(state[n], t) for n, t in expected.items())
    assert {n: p.data_ptr() for n, p in model.named_parameters()} == params_before  # same storage, no new module
    with torch.no_grad():
        logits = model(torch.tensor([[5, 6, 7]])).logits
    assert torch.isfinite(logits).all()


def test_magnitudes_are_sorted_once_across_candidates(tiny_models):
    mat = Materializer(tiny_models, base="base")
    vec = mat.vectors["a"]["model.layers.1.mlp.up_proj.weight"]
    first = mat.materialize(_ties(0.3, 0.4))
    sorted_once = vec.sorted_magnitudes()
    second = mat.materialize(_ties(0.3, 0.9))
    assert vec.sorted_magnitudes() is sorted_once
    assert not torch.equal(first["model.layers.1.mlp.up_proj.weight"], second["model.layers.1.mlp.up_proj.weight"])


def test_state_dict_sources_and_other_reference(tiny_models):
    """Sources may be in-memory state dicts, and the resident reference need not be the recipe's base."""
    from tests.merge_fixtures import load_checkpoint

    sds = {k: load_checkpoint(v) for k, v in tiny_models.items()}
    by_path = Materializer(tiny_models, base="base").materialize(_ties(0.6, 0.5))
    from_a = Materializer(sds, base="a").materialize(_ties(0.6, 0.5))
    assert all(torch.allclose(by_path[n], from_a[n], rtol=0, atol=1e-6) for n in by_path)


def test_fused_kernel_and_torch_path_agree(tiny_models):
    """The numba kernel (CPU) and the torch path (GPU and other dtypes) apply the same trims and draws."""
    import pytest

    from evomerge.merge import gta

    mat = Materializer(tiny_models, base="base")
    try:
        for method in ("task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs_ties", "della", "della_linear"):
            r = _ties(0.4, 0.35, seed=9, method=method)
            if method.startswith("della"):
                r.parameters["epsilon"] = 0.05
            gta.use_fused = True
            fused = mat.materialize(r)
            gta.use_fused = False
            plain = mat.materialize(r)
            for n, t in fused.items():
                if not torch.allclose(t, plain[n], rtol=1e-5, atol=1e-7):
                    pytest.fail(f"{method}: {n} differs by {(t - plain[n]).abs().max():.3g}")
    finally:
        gta.use_fused = True
