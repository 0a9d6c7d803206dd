"""Data-flow `path` recipes: materialized as a stacked checkpoint whose folded scales reproduce the
scaled forward pass (checked against a model that scales the hidden state with hooks), nested recipes
(PS+DFS), and writing such a model as a checkpoint."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoConfig, LlamaForCausalLM

from evomerge.merge import Materializer
from evomerge.merge.writer import write_checkpoint
from evomerge.recipe import Recipe
from tests.merge_fixtures import load_checkpoint

STEPS = [("a", 0, 1.0), ("b", 1, 0.8), ("a", 1, 1.3), ("b", 2, 0.6), ("a", 3, 1.1)]


def path_recipe(models: list, steps=STEPS) -> Recipe:
    return Recipe.from_dict({"merge_method": "passthrough", "models": models,
                             "path": [{"model": m, "layer": l, "scale": s} for m, l, s in steps]})


def hooked_reference(tiny_models, sources: dict[str, dict[str, torch.Tensor]], steps) -> LlamaForCausalLM:
    """The path run literally: unscaled layers stacked, each step's input hidden state scaled by a hook."""
    cfg = AutoConfig.from_pretrained(tiny_models["base"])
    cfg.num_hidden_layers = len(steps)
    model = LlamaForCausalLM(cfg).eval()
    sd = {}
    a = sources[steps[0][0]]
    for n, t in a.items():
        if ".layers." not in n:
            sd[n] = t
    for k, (m, layer, _) in enumerate(steps):
        for n, t in sources[m].items():
            if n.startswith(f"model.layers.{layer}."):
                sd[n.replace(f"model.layers.{layer}.", f"model.layers.{k}.", 1)] = t
    model.load_state_dict(sd)

    def scaler(scale):
        def hook(module, args, kwargs):
            if args:
                return (args[0] * scale, *args[1:]), kwargs
            kwargs["hidden_states"] = kwargs["hidden_states"] * scale
            return args, kwargs

        return hook

    for layer, (_, _, scale) in zip(model.model.layers, steps):
        layer.register_forward_pre_hook(scaler(scale), with_kwargs=True)
    return model


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture(scope="module")
def mat(tiny_models):
    return Materializer(tiny_models, base="base")


def test_path_with_scales_equals_the_scaled_forward_pass(tiny_models, mat):
    merged = mat.materialize(path_recipe([{"model": "a"}, {"model": "b"}]))
    cfg = AutoConfig.from_pretrained(tiny_models["base"])
    cfg.num_hidden_layers = len(STEPS)
    model = LlamaForCausalLM(cfg).eval()
    model.load_state_dict(merged)
    sources = {k: load_checkpoint(v) for k, v in tiny_models.items()}
    ref = hooked_reference(tiny_models, sources, STEPS)
    ids = torch.tensor([[5, 17, 33, 60, 2, 90, 7]])
    ours, theirs = logits(model, ids), logits(ref, ids)
    # equal up to the norms' epsilon (1e-6 against a mean square of ~1e-3 in this tiny random model)
    err = ((ours - theirs).abs().max() / theirs.abs().max()).item()
    assert err < 1e-3, err
    unscaled = hooked_reference(tiny_models, sources, [(m, l, 1.0) for m, l, _ in STEPS])
    err_unscaled = ((logits(unscaled, ids) - theirs).abs().max() / theirs.abs().max()).item()
    assert err_unscaled > 20 * err, (err_unscaled, err)  # the scales matter, and the folding reproduces them


def test_nested_parameter_merge_as_model_a(tiny_models, mat):
    ties = {"merge_method": "ties", "base_model": "base", "models": [
        {"model": "a", "parameters": {"weight": 0.7, "density": 0.5}}, {"model": "b", "parameters": {"weight": 0.4, "density": 0.6}}]}
    steps = [("ps", 0, 1.0), ("b", 2, 0.9), ("ps", 3, 1.2)]
    nested = mat.materialize(path_recipe([{"name": "ps", "model": ties}, {"model": "b"}], steps))
    ps = mat.materialize(Recipe.from_dict(ties))
    two_step = Materializer({"ps": ps, "b": tiny_models["b"]}).materialize(path_recipe([{"model": "ps"}, {"model": "b"}], steps))
    assert set(nested) == set(two_step)
    # equal up to rounding: a non-reference source is held as reference + delta
    assert all(torch.allclose(nested[n], two_step[n], rtol=0, atol=1e-6) for n in nested)
    assert not mat._transient  # the nested result does not outlive the merge


def test_path_checkpoint_loads_with_its_depth(tiny_models, tmp_path):
    out = write_checkpoint(path_recipe([{"model": "a"}, {"model": "b"}]), tiny_models, tmp_path / "dfs")
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == len(STEPS)
    assert not (out / "mergekit_config.yml").exists()  # mergekit cannot express a path
    model = LlamaForCausalLM.from_pretrained(out)
    assert torch.isfinite(logits(model, torch.tensor([[3, 4, 5]]))).all()


def test_path_mistakes(mat):
    from evomerge.records import UserError

    with pytest.raises(UserError, match="scale -0.5 must be > 0"):
        mat.materialize(path_recipe([{"model": "a"}], [("a", 0, 1.0), ("a", 1, -0.5)]))
    with pytest.raises(UserError, match="model 'c' is not among"):
        mat.materialize(path_recipe([{"model": "a"}], [("a", 0, 1.0), ("c", 1, 1.0)]))
    with pytest.raises(UserError, match="layer 9 is not a layer of the model"):
        mat.materialize(path_recipe([{"model": "a"}], [("a", 0, 1.0), ("a", 9, 1.0)]))


def test_load_into_refuses_a_module_of_another_depth(tiny_models, mat):
    from evomerge.records import UserError

    model = LlamaForCausalLM.from_pretrained(tiny_models["base"])  # 4 layers; the path has 5 and then 2
    with pytest.raises(UserError, match="no parameter 'model.layers.4"):
        mat.load_into(path_recipe([{"model": "a"}, {"model": "b"}]), model)
    with pytest.raises(UserError, match="does not produce the module's parameter 'model.layers.2"):
        mat.load_into(path_recipe([{"model": "a"}], [("a", 0, 1.0), ("a", 3, 1.0)]), model)
