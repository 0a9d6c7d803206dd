"""The architecture table (evomerge/arch.py) against transformers and mergekit, family by family: tiny
random checkpoints of Llama, Mistral, Qwen2, Qwen3, Gemma2, Gemma3 (text, and multimodal with its decoder
settings in text_config), Phi3, GPT-2, GPT-NeoX, Mixtral and Qwen2-MoE (tests/arch_fixtures.py)."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from evomerge import arch
from evomerge.fitness import model_surgery
from evomerge.merge import Materializer
from evomerge.merge.writer import write_checkpoint
from evomerge.recipe import Recipe
from evomerge.records import UserError
from tests.arch_fixtures import LAYERS
from tests.merge_fixtures import load_checkpoint, mergekit_merge, worst_relative_error

FAMILIES = list(arch.FAMILIES)
IDS = torch.tensor([[5, 17, 33, 60, 2, 90, 7, 41]])


def logits(path_or_model, ids=IDS) -> torch.Tensor:
    model = path_or_model if isinstance(path_or_model, torch.nn.Module) else AutoModelForCausalLM.from_pretrained(path_or_model).eval()
    with torch.no_grad():
        return model(ids).logits


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("family", FAMILIES)
def test_table_describes_each_checkpoint(family, family_models):
    paths = family_models(family)
    cfg = json.loads((paths["base"] / "config.json").read_text())
    names = list(load_checkpoint(paths["base"]))
    f = arch.lookup(cfg)
    assert f.name == family and arch.depth(f, cfg) == LAYERS
    by_names = arch.lookup({}, names)  # state-dict sources: the same layout, found from the names alone
    assert (by_names.layers, by_names.residual, by_names.post_norms, by_names.fused) == (f.layers, f.residual, f.post_norms, f.fused)
    layout = arch.Layout(f)
    assert layout.num_layers(names) == LAYERS
    outside = [n for n in names if layout.layer_of(n) is None]
    filters = arch.outside_filters(f, cfg["tie_word_embeddings"])
    assert all(any(flt in n for flt in filters) for n in outside) and all(any(flt in n for n in outside) for flt in filters)
    assert (f.head in names) == (not cfg["tie_word_embeddings"])
    for group, filters in f.groups.items():  # every module group names layer tensors (a vision tower's too)
        matched = [n for n in names if any(flt in n for flt in filters)]
        assert matched and all(layout.layer_of(n) or f.text_config for n in matched), group
    writers = [ln.rest for ln in map(layout.layer_of, names) if ln and ln.index == 0 and any(re.match(p, ln.rest) for p in f.residual)]
    assert len(writers) >= 2, writers  # attention and MLP (every expert of an MoE) write the residual
    if f.moe:
        assert sum("experts" in w for w in writers) >= 3


@pytest.mark.parametrize("family", FAMILIES)
def test_module_targets_reproduce_from_pretrained(family, family_models):
    """Writing each checkpoint tensor into its in-memory target (renamed, a slice of a stacked expert
    tensor) gives bit for bit the model from_pretrained loads."""
    paths = family_models(family)
    model = AutoModelForCausalLM.from_pretrained(paths["base"]).eval()
    stored = load_checkpoint(paths["a"])
    targets = model_surgery.module_targets(model, stored)
    assert set(targets) == set(stored)
    with torch.no_grad():
        for name, t in stored.items():
            targets[name].copy_(t)
    expected = AutoModelForCausalLM.from_pretrained(paths["a"]).state_dict()
    got = model.state_dict()
    assert set(got) == set(expected)
    for k, v in expected.items():
        assert torch.equal(got[k], v), k


def test_module_targets_name_what_does_not_fit(family_models):
    paths = family_models("mixtral")
    model = AutoModelForCausalLM.from_pretrained(paths["base"])
    names = list(load_checkpoint(paths["base"]))
    for bad, needle in [([*names, "model.layers.0.block_sparse_moe.experts.7.w1.weight"], "expert 7"),
                        ([n for n in names if ".experts.2.w3." not in n], "experts.gate_up_proj")]:
        with pytest.raises(UserError, match=needle) as e:
            model_surgery.module_targets(model, bad)
        assert "\n" not in str(e.value)


def _merges(family: str) -> dict[str, dict]:
    flt = arch.family(family).groups["attention"][0]  # (mergekit matches filters against in-memory names)
    weight = [{"filter": flt, "value": [0.2, 0.9]}, {"value": 0.6}]
    return {  # (a trim of MoE experts ranks all of a layer's experts together, as mergekit: test_arch_moe_trims.py)
        "merge": {"merge_method": "ties", "parameters": {"density": 0.6}, "base_model": "base",
                  "models": [{"model": "a", "parameters": {"weight": weight}}, {"model": "b", "parameters": {"weight": 0.4}}]},
        "passthrough": {"merge_method": "passthrough", "slices": [
            {"sources": [{"model": "a", "layer_range": [0, 2]}]}, {"sources": [{"model": "b", "layer_range": [1, 4]}]}]},
    }


# where mergekit 0.1.5 gives no model to compare with (on transformers 5 checkpoints)
MERGEKIT_FAILS = {
    **dict.fromkeys([("gpt_neox", m) for m in ("merge", "passthrough")], "it asks for attention.bias, which is not stored"),
    **dict.fromkeys([("qwen2_moe", m) for m in ("merge", "passthrough")], "its inferred architecture drops the experts"),
    **dict.fromkeys([("gemma3", m) for m in ("merge", "passthrough")], "it expects another vision tower layout"),
    **dict.fromkeys([(f, "passthrough") for f in ("qwen2", "qwen3", "gemma2", "gemma3_text")],
                    "it keeps the old layer_types, and transformers refuses the config"),
}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["merge", "passthrough"])
def test_merge_equals_mergekit_and_loads_at_its_depth(family, method, family_models, tmp_path):
    """The written checkpoint loads in transformers with the stack it was merged into (5 layers for the
    slices, whose `layer_types`, dense layers etc. follow their source layers), and equals mergekit 0.1.5's
    merge as loaded by transformers, where mergekit runs."""
    paths = family_models(family)
    cfg = _merges(family)[method]
    out = write_checkpoint(Recipe.from_dict(cfg), {k: str(v) for k, v in paths.items()}, tmp_path / "ours")
    src = [0, 1, 1, 2, 3] if method == "passthrough" else list(range(LAYERS))
    base_cfg = AutoConfig.from_pretrained(paths["base"]).get_text_config()
    new_cfg = AutoConfig.from_pretrained(out).get_text_config()
    assert new_cfg.num_hidden_layers == len(src)
    if getattr(base_cfg, "layer_types", None):
        assert new_cfg.layer_types == [base_cfg.layer_types[s] for s in src]
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert len(model_surgery.layer_list(model)) == len(src)
    if family == "qwen2_moe":  # the dense layer (base layer 2) is output layer 3 of the slices
        dense = [type(layer.mlp).__name__ == "Qwen2MoeMLP" for layer in model.model.layers]
        assert dense == [s == 2 for s in src]
    assert torch.isfinite(logits(model)).all()
    if (family, method) in MERGEKIT_FAILS:
        return
    pytest.importorskip("mergekit")
    mergekit_merge(cfg, paths, tmp_path / "mergekit")
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "mergekit").state_dict()
    err, where = worst_relative_error(model.state_dict(), theirs)
    assert err < 1e-6, (err, where)


STEPS = [("a", 0, 1.0), ("b", 1, 0.8), ("a", 1, 1.3), ("b", 2, 0.6), ("a", 3, 1.1)]


def path_recipe(steps) -> Recipe:
    return Recipe.from_dict({"merge_method": "passthrough", "models": [{"model": "a"}, {"model": "b"}],
                             "path": [{"model": m, "layer": l, "scale": s} for m, l, s in steps]})


def hooked(model: torch.nn.Module, scales) -> torch.nn.Module:
    """The path run literally: each layer's input hidden state multiplied by its step's scale."""
    def scaler(scale):
        def hook(module, args, kwargs):
            if args:
                return (args[0] * scale, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": kwargs["hidden_states"] * scale}
        return hook

    for layer, scale in zip(model_surgery.layer_list(model), scales):
        layer.register_forward_pre_hook(scaler(scale), with_kwargs=True)
    return model


@pytest.mark.parametrize("family", FAMILIES)
def test_data_flow_folding_equals_explicit_scaling(family, family_models, tmp_path):
    """A data-flow path written as a checkpoint (scales folded into the residual writers; for Gemma2/3,
    whose post-norms renormalize each write, into those norms' 1 + w) computes what the unscaled stacked
    layers compute with the hidden state scaled before each step (forward hooks)."""
    paths = family_models(family)
    sources = {k: str(v) for k, v in paths.items() if k != "base"}
    plain = write_checkpoint(path_recipe([(m, l, 1.0) for m, l, _ in STEPS]), sources, tmp_path / "plain")
    assert AutoConfig.from_pretrained(plain).get_text_config().num_hidden_layers == len(STEPS)
    folded = logits(write_checkpoint(path_recipe(STEPS), sources, tmp_path / "folded"))
    reference = logits(hooked(AutoModelForCausalLM.from_pretrained(plain).eval(), [s for *_, s in STEPS]))
    err = rel(folded, reference)
    assert err < 1e-3, err
    assert rel(logits(plain), reference) > 20 * err  # the scales matter, and the folding reproduces them


SPACES = {"layer_weights": {"modules": ["attention", "embeddings"]}, "layer_swap": {}, "data_flow": {"repeats": 2}}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("space", list(SPACES))
def test_run_scores_every_candidate_and_exports_what_it_scored(family, space, family_models, tmp_path):
    """`evomerge run` over each family and space: every evaluation ok (the resident model changes depth
    in place for data-flow paths), and the exported best loads at its depth and scores what was recorded."""
    import yaml

    from evomerge import open_run
    from evomerge.run.assemble import open_engine
    from evomerge.config import load_config
    from evomerge.results.export import export_run
    from evomerge.fitness.hf import HFHandle
    from evomerge.fitness.suite import TaskFitness

    paths = family_models(family)
    task = {"name": "t", "path": "task.jsonl", "metrics": ["loss"]}
    (tmp_path / "task.jsonl").write_text("".join(json.dumps({"prompt": f"{i}+{i}=", "reference": str(2 * i)}) + "\n" for i in range(3)))
    cfg = {"sources": {k: str(v) for k, v in paths.items()}, "base": "base",
           "space": {"name": space, "options": SPACES[space]}, "optimizer": {"name": "random"},
           "fitness": {"tasks": [task], "handle": {"batch_size": 4}}, "budget": {"evaluations": 3}, "seed": 1}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    engine = open_engine(load_config(tmp_path / "run.yaml"), tmp_path / "run", resume=False)
    assert engine.run() == "budget: evaluations"
    engine.store.close()
    run = open_run(tmp_path / "run")
    df = run.frame()
    assert list(df.status) == ["ok"] * 3, [e.error for e in run.store.evaluations()]
    best = run.best("loss/t")
    (out,) = export_run(tmp_path / "run", tmp_path / "best", fmt="hf", best="loss/t")
    recipe = run.recipe(int(best["id"]))
    depth = len(recipe.path) if recipe.path else LAYERS
    handle = HFHandle(out)
    assert len(model_surgery.layer_list(handle.model)) == depth == AutoConfig.from_pretrained(out).get_text_config().num_hidden_layers
    rescored = TaskFitness.from_config([task], base_dir=tmp_path).evaluate(handle).objectives["loss/t"]
    assert rescored == best["loss/t"]


@pytest.mark.parametrize("family", FAMILIES)
def test_resident_model_follows_each_recipe_in_place(family, family_models, tmp_path):
    """The HF handle's model, rewritten in place (depth, per-layer settings, renamed and stacked tensors),
    computes exactly what the written checkpoint of each recipe computes in a fresh transformers model."""
    from evomerge.fitness.handle import Sampling
    from evomerge.fitness.hf import HFHandle

    paths = family_models(family)
    sources = {k: str(v) for k, v in paths.items()}
    handle = HFHandle(paths["base"], Materializer(sources, base="base"))
    recipes = [
        path_recipe(STEPS),  # deeper, reordered layer types
        path_recipe([("b", 3, 1.0), ("a", 2, 1.0), ("a", 0, 1.0)]),  # shallower
        Recipe.from_dict(_merges(family)["passthrough"]),
        Recipe.from_dict(_merges(family)["merge"]),  # back to the base's stack
    ]
    for i, recipe in enumerate(recipes):
        handle.set_recipe(recipe)
        written = write_checkpoint(recipe, sources, tmp_path / str(i), base="base")
        assert torch.equal(logits(handle.model), logits(written)), i
        if i == 0:  # generation's KV cache is sized and typed by the rewritten config
            prompts, sampling = ["12+3=", "a"], Sampling(max_new_tokens=6)
            assert handle.generate(prompts, sampling) == HFHandle(written).generate(prompts, sampling)


def test_readme_lists_the_table():
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    start = readme.index("<!-- architectures: generated by evomerge.arch.markdown_table() -->\n")
    end = readme.index("\n<!-- /architectures -->")
    assert readme[start:end].split("\n", 1)[1] == arch.markdown_table()


@pytest.mark.parametrize("family", ["llama", "gemma2"])  # untied base + a tied expert; tied base + an untied one
def test_experts_with_other_tying_merge_as_mergekit_does(family, family_models, tmp_path):
    """A source that ties its head to its embedding merges its embedding into the head the others store
    (mergekit's rule); transformers loads a stored head that differs from the embedding untied, and so
    does the HF handle's resident model."""
    from evomerge.fitness.hf import HFHandle
    from tests.arch_fixtures import flip_tying

    paths = dict(family_models(family))
    f = arch.family(family)
    paths["a"] = flip_tying(paths["a"], tmp_path / "a_other", family)
    sources = {k: str(v) for k, v in paths.items()}
    recipe = {"merge_method": "task_arithmetic", "base_model": "base",
              "models": [{"model": "a", "parameters": {"weight": 0.7}}, {"model": "b", "parameters": {"weight": 0.4}}]}
    out = write_checkpoint(Recipe.from_dict(recipe), sources, tmp_path / "ours")
    assert f.head in load_checkpoint(out)
    ours = AutoModelForCausalLM.from_pretrained(out).eval()
    pytest.importorskip("mergekit")
    mergekit_merge(recipe, paths, tmp_path / "mergekit")
    err, where = worst_relative_error(ours.state_dict(), AutoModelForCausalLM.from_pretrained(tmp_path / "mergekit").state_dict())
    assert err < 1e-6, (err, where)
    handle = HFHandle(paths["base"], Materializer(sources, base="base"))
    handle.set_recipe(Recipe.from_dict(recipe))
    assert torch.equal(logits(handle.model), logits(ours))


def test_unknown_architecture_is_read_by_name_patterns_with_one_warning(caplog):
    import logging

    cfg = {"architectures": ["NovelForCausalLM"], "n_layer": 3}
    with caplog.at_level(logging.WARNING, logger="evomerge.arch"):
        f = arch.lookup(cfg)
        assert arch.lookup(cfg) is f is arch.GENERIC
    assert [r.getMessage() for r in caplog.records if "NovelForCausalLM" in r.getMessage()].__len__() == 1
    layout = arch.Layout(f)
    assert layout.layer_of("backbone.blocks.2.mixer.out_proj.weight").index == 2 and arch.depth(f, cfg) == 3
    assert layout.fold_scope("mixer.out_proj.weight", 2.0) == {"scale": 0.5} and layout.fold_scope("mixer.in_proj.weight", 2.0) is None
    assert arch.resize_config(f, cfg, [0, 0, 1, 2]) == {"n_layer": 4}


GENERIC_TEMPLATE = {  # as community templates write it: Llama's module names
    "merge_method": "ties", "base_model": "base",
    "models": [{"model": "a", "parameters": {"weight": [{"filter": "self_attn", "value": 0.3}, {"filter": "mlp", "value": 0.9}, {"value": 0.6}],
                                             "density": [{"filter": "self_attn", "value": 0.4}, {"value": 0.7}]}},
               {"model": "b", "parameters": {"weight": 0.5, "density": [{"filter": "mlp", "value": 0.5}, {"value": 0.8}]}}],
}


@pytest.mark.parametrize("family, unmatched", [("gpt2", "self_attn"), ("gpt_neox", "self_attn"), ("mixtral", "mlp")])
def test_a_filter_matching_no_tensor_is_ignored_as_mergekit_ignores_it(family_models, tmp_path, caplog, family, unmatched):
    """A generic template runs unchanged on a family whose names its filters miss: one warning, mergekit's result;
    `strict` refuses it in one line."""
    import logging

    from tests.merge_fixtures import assert_matches_mergekit

    paths = family_models(family)
    mat = Materializer({k: str(v) for k, v in paths.items()}, base="base")
    with caplog.at_level(logging.WARNING, logger="evomerge.merge.plan"):
        ours = mat.materialize(Recipe.from_dict(GENERIC_TEMPLATE))
        if family == "gpt2":  # (mergekit 0.1.5 gives no GPT-NeoX model; its Mixtral names are transformers 5's fused ones)
            assert_matches_mergekit(GENERIC_TEMPLATE, paths, mat, tmp_path)
    dropped = Recipe.from_dict(GENERIC_TEMPLATE)  # the template without the entries whose filter matches nothing
    for ref in dropped.models:
        ref.parameters = {k: [e for e in v if e.get("filter") != unmatched] if isinstance(v, list) else v
                          for k, v in ref.parameters.items()}
    without = mat.materialize(dropped)
    assert ours.keys() == without.keys() and all(torch.equal(ours[k], without[k]) for k in ours)
    warned = [r.getMessage() for r in caplog.records if "matches no tensor" in r.getMessage()]
    assert len(warned) == 1 and f"filter {unmatched!r} matches no tensor of this {family} model" in warned[0], warned
    assert warned[0].endswith("ignored (--strict refuses it)") and "\n" not in warned[0]
    strict = Materializer({k: str(v) for k, v in paths.items()}, base="base", strict=True)
    with pytest.raises(UserError, match=f"filter {unmatched!r} matches no tensor of this {family} model") as e:
        strict.materialize(Recipe.from_dict(GENERIC_TEMPLATE))
    assert "\n" not in str(e.value)


def test_merge_strict_refuses_an_unmatched_filter_and_writes_nothing(family_models, tmp_path, monkeypatch, capsys):
    import yaml

    from tests.test_merge_cli import assert_failed_cleanly, run_cli

    paths = family_models("gpt2")
    cfg = tmp_path / "generic.yaml"
    cfg.write_text(yaml.safe_dump(GENERIC_TEMPLATE))
    for name, p in paths.items():
        (tmp_path / name).symlink_to(p)
    code, _, err = run_cli(monkeypatch, capsys, "merge", str(cfg), "-o", str(tmp_path / "strict"), "--strict")
    assert_failed_cleanly(code, err, tmp_path / "strict", "filter 'self_attn' matches no tensor of this gpt2 model")
    code, _, err = run_cli(monkeypatch, capsys, "merge", str(cfg), "-o", str(tmp_path / "out"))
    assert code == 0 and (tmp_path / "out" / "model.safetensors").is_file(), err


def test_spaces_read_the_family():
    from evomerge import search_spaces

    gpt2 = search_spaces.make("layer_swap", sources=["a", "b"], num_layers=2, architecture="gpt2", tied_embeddings=True)
    assert gpt2.non_layer_filters == ["transformer.wte.weight", "transformer.wpe.weight", "transformer.ln_f.weight", "transformer.ln_f.bias"]
    moe = search_spaces.make("layer_weights", sources=["a"], base="base", num_layers=2, granularity=0, method="task_arithmetic",
                             modules=["mlp", "experts"], architecture="mixtral")
    entries = moe.decode(moe.initial()).models[0].parameters["weight"]
    assert [e.get("filter") for e in entries] == ["block_sparse_moe.experts.", "block_sparse_moe.", None]  # specific first
    with pytest.raises(UserError, match="valid: attention, mlp, norms, embeddings"):
        search_spaces.make("layer_weights", sources=["a"], base="base", num_layers=2, modules=["experts"], architecture="qwen2")
    hybrid = search_spaces.make("hybrid", architecture="gemma2", tied_embeddings=True, parts=[
        {"name": "ps", "space": "layer_weights", "options": {"sources": ["a", "b"], "base": "base", "num_layers": 2, "modules": ["embeddings"]}},
        {"name": "dfs", "space": "data_flow", "options": {"sources": ["ps", "b"], "num_layers": 2}}])
    assert hybrid.parts[0][1].filters["embeddings"] == ("model.embed_tokens.weight",)


def test_index_dependent_layers_refuse_data_flow(family_models, tmp_path):
    """GPT-2 with scale_attn_by_inverse_layer_idx scales attention by 1/(layer index + 1): a layer moved
    along a path would compute something else."""
    import shutil

    paths = dict(family_models("gpt2"))
    flagged = tmp_path / "a"
    shutil.copytree(paths["a"], flagged)
    cfg = json.loads((flagged / "config.json").read_text())
    (flagged / "config.json").write_text(json.dumps({**cfg, "scale_attn_by_inverse_layer_idx": True}))
    with pytest.raises(UserError, match="scale_attn_by_inverse_layer_idx"):
        write_checkpoint(path_recipe([("a", 0, 1.0), ("b", 2, 1.0)]), {"a": str(flagged), "b": str(paths["b"])}, tmp_path / "out")
