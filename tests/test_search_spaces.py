"""Search spaces: round trips, the meaning of each dimension, bad input, and recipes the merge engine takes."""
from __future__ import annotations

import numpy as np
import pytest

from evomerge import search_spaces
from evomerge.recipe import PathStep, Recipe
from evomerge.records import UserError

PS = {"sources": ["a", "b"], "base": "base", "num_layers": 4}
CASES = {
    "lw-ties-per-layer": ("layer_weights", PS),
    "lw-dare-groups-modules": ("layer_weights", {**PS, "method": "dare_ties", "granularity": 3, "modules": ["attention", "mlp", "embeddings"]}),
    "lw-linear-whole-negative": ("layer_weights", {"sources": ["a", "b"], "num_layers": 4, "method": "linear", "granularity": 0, "negative_weights": True, "normalize": True}),
    "lw-della": ("layer_weights", {**PS, "method": "della", "granularity": 2}),
    "lw-knots-modules": ("layer_weights", {**PS, "num_layers": 7, "knots": 3, "modules": ["mlp"]}),
    "swap": ("layer_swap", {"sources": ["a", "b", "c"], "num_layers": 6}),
    "swap-transition": ("layer_swap", {"sources": ["a", "b"], "num_layers": 8, "transition": 2}),
    "dfs": ("data_flow", {"sources": ["a", "b"], "num_layers": 3, "repeats": 3}),
    "dfs-uneven-unpinned": ("data_flow", {"sources": ["a", "b"], "num_layers": [2, 4], "repeats": 2, "pin_ends": False}),
    "evo-merging": ("sparsity_scaling", {"sources": ["a", "b", "c"], "base": "base"}),
    "evo-merging-beta-stage": ("sparsity_scaling", {"sources": ["a", "b"], "base": "base", "search": "beta", "alpha0": [0.3, 0.6]}),
    "ps+dfs": ("hybrid", {"parts": [
        {"name": "ps", "space": "layer_weights", "options": PS},
        {"name": "dfs", "space": "data_flow", "options": {"sources": ["ps", "b"], "num_layers": 4, "repeats": 2}},
    ]}),
}


def random_points(space, n=40, seed=0):
    rng = np.random.default_rng(seed)
    return [space.initial()] + [rng.uniform(space.bounds[:, 0], space.bounds[:, 1]) for _ in range(n)]


def test_every_space_is_covered():
    assert {name for name, _ in CASES.values()} == set(search_spaces.names())


@pytest.mark.parametrize("case", list(CASES))
def test_shape_names_bounds_initial(case):
    name, options = CASES[case]
    s = search_spaces.make(name, **options)
    assert s.dim == len(s.names()) == len(set(s.names())) == s.bounds.shape[0] > 0
    assert np.all(s.bounds[:, 0] < s.bounds[:, 1])
    x0 = s.initial()
    assert np.all((x0 >= s.bounds[:, 0]) & (x0 <= s.bounds[:, 1]))


@pytest.mark.parametrize("case", list(CASES))
def test_decode_encode_round_trip_and_yaml(case):
    name, options = CASES[case]
    s = search_spaces.make(name, **options)
    for x in random_points(s):
        r = s.decode(x)
        assert s.decode(s.encode(r)) == r
        assert Recipe.from_yaml(r.to_yaml()) == r  # plain, serialisable, replayable


@pytest.mark.parametrize("case", list(CASES))
def test_decode_clips_out_of_bounds_genomes(case):
    name, options = CASES[case]
    s = search_spaces.make(name, **options)
    wild = s.bounds[:, 1] + 10.0
    assert s.decode(wild) == s.decode(s.bounds[:, 1])


def test_layer_weights_groups_become_exact_per_layer_gradients():
    s = search_spaces.make("layer_weights", sources=["a", "b"], base="base", num_layers=5, granularity=2)
    assert s.names()[:2] == ["layers_0-1.default.a.weight", "layers_0-1.default.a.density"]
    x = np.arange(s.dim) / 100 + 0.1
    r = s.decode(x)
    a = r.models[0].parameters
    assert r.merge_method == "ties" and r.base_model == "base"
    # groups {0,1}, {2,3}, {4}: genome order group > source > weight/density
    assert a["weight"] == pytest.approx([0.10, 0.10, 0.14, 0.14, 0.18])
    assert a["density"] == pytest.approx([0.11, 0.11, 0.15, 0.15, 0.19])


def test_layer_weights_knots_are_a_piecewise_linear_curve_over_depth():
    s = search_spaces.make("layer_weights", sources=["a"], base="base", num_layers=7, knots=3)
    assert s.dim == 6 and s.names()[:2] == ["knot_layer_0.default.a.weight", "knot_layer_0.default.a.density"]
    r = s.decode([0.1, 0.2, 0.4, 0.5, 1.0, 0.5])  # knots at layers 0, 3, 6
    assert r.models[0].parameters["weight"] == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.6, 0.8, 1.0])
    assert r.models[0].parameters["density"] == pytest.approx([0.2, 0.3, 0.4, 0.5, 0.5, 0.5, 0.5])


def test_layer_weights_modules_become_filters_and_linear_has_no_density():
    s = search_spaces.make("layer_weights", sources=["a"], base="base", num_layers=2, granularity=0, modules=["mlp", "embeddings"], method="task_arithmetic")
    assert s.names() == ["non_layer.embeddings.a.weight", "all_layers.mlp.a.weight", "all_layers.default.a.weight"]
    w = s.decode([0.1, 0.2, 0.3]).models[0].parameters["weight"]
    assert w == [{"filter": "model.embed_tokens.weight", "value": 0.1}, {"filter": "lm_head.weight", "value": 0.1}, {"filter": "mlp", "value": 0.2}, {"value": 0.3}]
    neg = search_spaces.make("layer_weights", sources=["a"], base="base", num_layers=2, negative_weights=True, weight_max=2.0)
    assert neg.bounds[0].tolist() == [-2.0, 2.0]


def test_layer_swap_takes_each_layer_from_its_source():
    s = search_spaces.make("layer_swap", sources=["a", "b"], num_layers=4)
    r = s.decode([0.2, 1.7, 1.0, 0.99])
    assert r.merge_method == "linear"
    assert [m.parameters["weight"][-1]["value"] for m in r.models] == [[1.0, 0.0, 0.0, 1.0], [0.0, 1.0, 1.0, 0.0]]
    # embeddings, head and final norm from the first source
    assert [e["value"] for e in r.models[0].parameters["weight"][:-1]] == [1.0, 1.0, 1.0]
    assert [e["value"] for e in r.models[1].parameters["weight"][:-1]] == [0.0, 0.0, 0.0]


def test_layer_swap_transition_blends_near_the_swap_and_keeps_the_choice():
    s = search_spaces.make("layer_swap", sources=["a", "b"], num_layers=8, transition=2)
    choices = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    w = s.layer_weights(choices)
    assert np.allclose(w.sum(axis=1), 1.0)
    assert np.all(w[np.arange(8), choices] > 0.5)
    assert w[1, 1] == 0 < w[2, 1] < w[3, 1] and w[4, 0] > w[5, 0] > 0 == w[6, 0]  # w = 2 layers each side
    assert np.array_equal(s.choices(s.encode(s.decode(choices + 0.5))), choices)


def test_data_flow_initial_is_model_a_and_indicators_and_scales_shape_the_path():
    s = search_spaces.make("data_flow", sources=["a", "b"], num_layers=3, repeats=2)
    m = 6
    assert s.dim == m * 2 + m * m
    assert [(p.model, p.layer, p.scale) for p in s.decode(s.initial()).path] == [("a", 0, 1.0), ("a", 1, 1.0), ("a", 2, 1.0)]
    x = s.initial()
    x[1] = -0.5  # drop a.1 from the first repetition
    x[4] = 0.5  # b.1 in the first repetition
    W = np.ones((m, m))
    W[0, 4] = 0.7  # a.0 -> b.1
    W[4, 2] = 1.3  # b.1 -> a.2 (second repetition)
    x[2] = -0.5
    x[m + 2] = 0.5
    x[2 * m :] = W.ravel()
    r = s.decode(x)
    assert r.path == [PathStep("a", 0, 1.0), PathStep("b", 1, 0.7), PathStep("a", 2, 1.3)]
    assert r.merge_method == "passthrough" and [ref.model for ref in r.models] == ["a", "b"]


def test_data_flow_pins_model_a_first_and_last_layer():
    s = search_spaces.make("data_flow", sources=["a", "b"], num_layers=3, repeats=1)
    x = s.initial()
    x[:6] = [-0.5, -0.5, -0.5, 0.5, -0.5, -0.5]  # only b.0
    assert [(p.model, p.layer) for p in s.decode(x).path] == [("a", 0), ("b", 0), ("a", 2)]


def test_data_flow_rejects_paths_it_cannot_represent():
    s = search_spaces.make("data_flow", sources=["a", "b"], num_layers=2, repeats=1)
    with pytest.raises(UserError, match="does not fit"):
        s.encode(Recipe("passthrough", path=[PathStep("a", 0), PathStep("a", 1), PathStep("a", 0), PathStep("b", 1), PathStep("a", 1)]))
    with pytest.raises(UserError, match="not a layer"):
        s.encode(Recipe("passthrough", path=[PathStep("c", 0)]))


def test_sparsity_scaling_is_breadcrumbs_without_outlier_cut_and_stages_fix_the_rest():
    s = search_spaces.make("sparsity_scaling", sources=["a", "b"], base="base")
    assert s.names() == ["a.alpha", "a.beta", "b.alpha", "b.beta"]
    assert s.bounds.tolist() == [[0, 1], [-1.5, 1.5], [0, 1], [-1.5, 1.5]]
    r = s.decode([0.3, -0.8, 0.9, 1.2])
    assert r.merge_method == "breadcrumbs" and r.parameters == {"gamma": 0.0, "normalize": False}
    assert [m.parameters for m in r.models] == [{"weight": -0.8, "density": 0.3}, {"weight": 1.2, "density": 0.9}]
    alpha_stage = search_spaces.make("sparsity_scaling", sources=["a", "b"], base="base", search="alpha")
    assert alpha_stage.dim == 2 and [m.parameters["weight"] for m in alpha_stage.decode([0.2, 0.4]).models] == [0.5, 0.5]


def test_hybrid_nests_the_parameter_merge_as_model_a_of_the_path():
    name, options = CASES["ps+dfs"]
    s = search_spaces.make(name, **options)
    ps = search_spaces.make("layer_weights", **PS)
    assert s.dim == ps.dim + 8 * 2 + 8 * 8
    assert s.names()[0] == "ps." + ps.names()[0] and s.names()[-1].startswith("dfs.scale.")
    r = s.decode(s.initial())
    assert r.models[0].name == "ps" and r.models[0].model == ps.decode(ps.initial())
    assert r.path[0].model == "ps"
    assert r.source_names() == ["base", "a", "b"]


def test_hybrid_rejects_an_unused_part():
    with pytest.raises(UserError, match="not a source or base"):
        search_spaces.make("hybrid", parts=[
            {"name": "ps", "space": "layer_weights", "options": PS},
            {"name": "swap", "space": "layer_swap", "options": {"sources": ["a", "b"], "num_layers": 4}},
        ])


@pytest.mark.parametrize(
    "name,options,needle",
    [
        ("layers", {}, "layer_weights"),
        ("layer_weights", {**PS, "method": "magic"}, "dare_ties"),
        ("layer_weights", {**PS, "modules": ["ffn"]}, "attention"),
        ("layer_weights", {**PS, "colour": 1}, "granularity"),
        ("layer_weights", {**PS, "knots": 5}, "knots"),
        ("layer_weights", {"sources": ["a"]}, "num_layers"),
        ("layer_swap", {"sources": ["a"], "num_layers": 2}, "at least 2"),
        ("sparsity_scaling", {"sources": ["a"], "base": "b", "search": "gamma"}, "alpha"),
    ],
)
def test_bad_input_is_one_line_naming_what_is_valid(name, options, needle):
    with pytest.raises(UserError) as e:
        search_spaces.make(name, **options)
    assert needle in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("case", ["lw-ties-per-layer", "lw-dare-groups-modules", "swap-transition", "evo-merging"])
def test_the_merge_engine_materializes_decoded_recipes(case, tiny_models):
    from evomerge.merge.materializer import Materializer

    name, options = CASES[case]
    s = search_spaces.make(name, **options)
    sources = {"base": tiny_models["base"], "a": tiny_models["a"], "b": tiny_models["b"], "c": tiny_models["b"]}
    mat = Materializer(sources, base="base")
    x = random_points(s, n=1, seed=3)[1]
    merged = mat.materialize(s.decode(x))
    assert merged and all(v.isfinite().all() for v in merged.values())
