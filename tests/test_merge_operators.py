"""Operators beyond mergekit 0.1.5 (issue 28), each against fusion-bench 0.2.33's own functions driven with
our tensors. fusion-bench's package imports a training stack; its algorithm modules need only torch, so the
wheel (pip download --no-deps, cached per user) is unpacked and those modules are loaded from its files
(tall_mask/utils.py, fisher_merging.py and regmean.py import the package for what their merging functions do not
use: those functions alone). It has no PCB-Merging, Localize-and-Stitch nor LiNeS: PCB is checked against the paper's
steps, Localize-and-Stitch against its authors' code re-implemented."""
from __future__ import annotations

import ast
import json
import math
import importlib.util
import subprocess
import sys
import zipfile
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

import pytest
import numpy as np
import torch
import transformers
import yaml

from evomerge.merge import calibration
from evomerge.merge.materializer import Materializer
from evomerge.recipe import Recipe
from evomerge.records import UserError
from evomerge.search_spaces.layer_weights import LayerWeights
from tests.test_merge_cli import assert_failed_cleanly, run_cli, workdir, write_config  # noqa: F401
from tests.merge_fixtures import load_checkpoint, worst_relative_error

FB = "fusion_bench-0.2.33-py3-none-any.whl"


def _load(root: Path, module: str):
    spec = importlib.util.spec_from_file_location(module, root / (module.replace(".", "/") + ".py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[module] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="session")
def fusion_bench():
    cache = Path.home() / ".cache" / "evomerge" / "fusion-bench"
    if not (cache / FB).exists():
        subprocess.run([sys.executable, "-m", "pip", "download", "fusion-bench==0.2.33", "--no-deps", "-q", "-d", str(cache)], check=True)
    src = cache / "src"
    if not src.exists():
        zipfile.ZipFile(cache / FB).extractall(src)
    _load(src, "fusion_bench.utils.type")
    tall = ast.parse((src / "fusion_bench/method/tall_mask/utils.py").read_text())
    space: dict = {"torch": torch, "Optional": Optional}
    exec(compile(ast.Module([f for f in tall.body if getattr(f, "name", "") == "generate_task_masks"], []), "tall_mask/utils.py", "exec"), space)
    for module, names in (("fisher_merging/fisher_merging.py", ("get_param_squared_gradients", "get_models_fisher_norm", "merging_with_fisher_weights")),
                          ("regmean/regmean.py", ("reduce_non_diagonal_elements", "merging_with_regmean_weights"))):
        tree = ast.parse((src / "fusion_bench/method" / module).read_text())
        space.update(Dict=dict, List=list, Tensor=torch.Tensor, nn=torch.nn)
        exec(compile(ast.Module([f for f in tree.body if getattr(f, "name", "") in names], []), module, "exec"), space)
    plus = ast.parse((src / "fusion_bench/method/regmean_plusplus/regmean_plusplus.py").read_text())
    space_plus = {"torch": torch, "Tensor": torch.Tensor, "List": list}
    exec(compile(ast.Module([f for f in plus.body if isinstance(f, ast.FunctionDef)], []), "regmean_plusplus.py", "exec"), space_plus)
    return SimpleNamespace(tsvm=_load(src, "fusion_bench.method.task_singular_vector.utils.TSVM_utils"),
                           plus=SimpleNamespace(**space_plus), **space)


def _task_vectors(paths: dict, weights: tuple[float, ...]) -> tuple[dict, list[dict]]:
    base = load_checkpoint(paths["base"])
    experts = [load_checkpoint(paths[m]) for m in ("a", "b")]
    return base, [{k: (e[k].float() - v.float()) * w for k, v in base.items()} for e, w in zip(experts, weights)]


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_tsv_m_equals_fusion_bench(family, family_models, fusion_bench):
    """Merged weights equal base + lambda * fusion-bench's TSV-M of the weighted task vectors (matrices by
    SVD, the rest by their mean), and the matrices' merged deltas agree on their own scale too."""
    paths, weights, lam = family_models(family), (0.7, 1.3), 0.8
    cfg = {"merge_method": "tsv_m", "base_model": "base", "parameters": {"lambda": lam}, "dtype": "float32",
           "models": [{"model": m, "parameters": {"weight": w}} for m, w in zip(("a", "b"), weights)]}
    ours = Materializer(paths, base="base").materialize(Recipe.from_dict(cfg))
    base, tvs = _task_vectors(paths, weights)
    ref = fusion_bench.tsvm.compute_and_sum_svd_mem_reduction(tvs, accelerator="cpu")
    err, where = worst_relative_error(ours, {k: base[k].float() + lam * ref[k] for k in base})
    assert err < 1e-5, (err, where)
    matrices = [k for k in base if base[k].dim() == 2]
    err, where = worst_relative_error({k: ours[k].float() - base[k].float() for k in matrices}, {k: lam * ref[k] for k in matrices})
    assert err < 1e-5, (err, where)
    assert len(matrices) < len(base)


def test_tsv_m_in_evomerge_merge_and_its_errors(workdir, monkeypatch, capsys):  # noqa: F811
    """The YAML reads evomerge's own method; a bad parameter or a missing base fails in one line, before any merge."""
    cfg = {"merge_method": "tsv_m", "base_model": "base", "dtype": "float32",
           "models": [{"model": "a", "parameters": {"weight": 1.0}}, {"model": "b", "parameters": {"weight": 0.5}}]}
    code, _, err = run_cli(monkeypatch, capsys, "merge", str(write_config(workdir, cfg)), "-o", str(workdir / "m"))
    assert code == 0, err
    ours = Materializer({m: workdir / m for m in ("base", "a", "b")}, base="base").materialize(Recipe.from_dict(cfg))
    written = load_checkpoint(workdir / "m")
    assert all(torch.equal(written[k], ours[k]) for k in ours)
    for bad, needle in (({**cfg, "parameters": {"lambda": "lots"}}, "lambda"), ({**cfg, "base_model": None}, "tsv_m needs a base_model"),
                        ({**cfg, "merge_method": "tall_consensus", "parameters": {"tall_mask_lambda": -0.1}}, "parameter 'tall_mask_lambda' for the recipe must be >= 0, got -0.1")):
        code, _, err = run_cli(monkeypatch, capsys, "merge", str(write_config(workdir, bad)), "-o", str(workdir / "bad"))
        assert_failed_cleanly(code, err, workdir / "bad", needle)


@pytest.mark.parametrize("method", ["tsv_m", "tall_consensus", "pcb", "localize_stitch"])
def test_searched_in_the_layer_weights_space(method, tiny_models):
    space = LayerWeights(sources=["a", "b"], base="base", num_layers=4, method=method, granularity=2)
    recipe = space.decode(space.initial())
    sparse = method in ("pcb", "localize_stitch")
    assert recipe.merge_method == method and set(recipe.models[0].parameters) == ({"weight", "density"} if sparse else {"weight"})
    merged = Materializer(tiny_models, base="base").materialize(recipe)
    assert np.allclose(space.encode(recipe), space.initial())
    assert all(torch.isfinite(v).all() for v in merged.values())


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_tall_consensus_equals_fusion_bench_masks(family, family_models, fusion_bench):
    """Consensus merging from fusion-bench's TALL masks (generate_task_masks on the flat weights, counted >= k
    as its construct_consensus_mask counts them) equals ours, each tensor."""
    paths, weights, lam, tall_lambda = family_models(family), (1.0, 0.8), 0.9, 0.4
    cfg = {"merge_method": "tall_consensus", "base_model": "base", "dtype": "float32",
           "parameters": {"lambda": lam, "tall_mask_lambda": tall_lambda, "k": 2},
           "models": [{"model": m, "parameters": {"weight": w}} for m, w in zip(("a", "b"), weights)]}
    ours = Materializer(paths, base="base").materialize(Recipe.from_dict(cfg))
    base, tvs = _task_vectors(paths, weights)
    kept = 0
    for k, v in base.items():
        ptm = v.float().reshape(-1)
        tv = torch.stack([t[k].reshape(-1) for t in tvs])
        masks = fusion_bench.generate_task_masks(tv, ptm + tv, ptm, tall_mask_lambda=tall_lambda)
        consensus = masks.float().sum(0) >= 2
        ref = ptm + lam * (ptm + tv.sum(0) - ptm) * consensus
        assert torch.equal(ours[k].reshape(-1), ref), k
        kept += consensus.float().mean().item() / len(base)
    assert 0.05 < kept < 0.95, kept  # the masks keep some and drop some


def _merge_real(models: dict[str, Path], method: str, out: Path) -> dict[str, torch.Tensor]:
    """`evomerge merge` of the real experts (bfloat16) with an operator, in a subprocess like a user's."""
    cfg = {"merge_method": method, "base_model": str(models["base"]), "dtype": "bfloat16",
           "models": [{"model": str(models[m]), "parameters": {"weight": w}} for m, w in (("math", 0.6), ("fr", 0.4))]}
    out.mkdir(parents=True, exist_ok=True)
    (out / "merge.yaml").write_text(yaml.safe_dump(cfg))
    done = subprocess.run([sys.executable, "-m", "evomerge.cli", "merge", str(out / "merge.yaml"), "-o", str(out / "m")],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    return load_checkpoint(out / "m")


@pytest.mark.parametrize("method", ["tsv_m", "tall_consensus", "pcb", "localize_stitch"])
def test_operators_merge_the_real_test_bed(method, real_zoo, tmp_path):
    out, built = real_zoo
    assert built.returncode == 0, built.stderr[-2000:]
    models = {m: out / "models" / m for m in ("base", "math", "fr")}
    merged, base = _merge_real(models, method, tmp_path), load_checkpoint(models["base"])
    assert set(merged) == set(base) and all(merged[k].dtype == torch.bfloat16 and torch.isfinite(merged[k]).all() for k in merged)
    assert sum(not torch.equal(merged[k], base[k]) for k in merged) > 100  # a real merge, not the base copied


# --- data-aware merges: fisher, regmean (evomerge/merge/calibration.py) ------------------------------

CALIBRATION = ["The cat sat on the mat while the dog slept by the fire, and nobody minded the rain outside.",
               "Two plus two is four; four times three is twelve, and twelve less five leaves seven apples.",
               "Le chat est noir et le chien est blanc; ils dorment ensemble au soleil du matin.",
               "def f(x):\n    return [y * 2 for y in range(x) if y % 3 == 0]  # multiples of three, doubled"]


@pytest.fixture
def calibration_set(tmp_path, monkeypatch):
    monkeypatch.setenv("EVOMERGE_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "calib.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in CALIBRATION))
    return path


def _fisher_by_fusion_bench(path: Path, fb) -> dict[str, torch.Tensor]:
    """fusion-bench's squared gradients of each example's LM loss (get_param_squared_gradients), averaged."""
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    names = [n for n, _ in model.named_parameters()]
    total: dict[str, torch.Tensor] = {}
    for text in CALIBRATION:
        ids = tok(text, return_tensors="pt").input_ids
        model.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids).loss.backward()
        for k, v in fb.get_param_squared_gradients(model, names).items():
            total[k] = total.get(k, 0) + v
    return {k: v / len(CALIBRATION) for k, v in total.items()}


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_fisher_equals_fusion_bench(family, family_models, fusion_bench, calibration_set):
    """Fisher-weighted averaging equals fusion-bench's merging_with_fisher_weights (normalize_fisher_weight off,
    the weights as its scaling coefficients, epsilon as its minimal_fisher_weight) fed the Fishers its own
    get_param_squared_gradients gives per calibration example."""
    paths, weights, eps = family_models(family), (0.7, 1.3), 1e-8
    cfg = {"merge_method": "fisher", "dtype": "float32", "parameters": {"calibration": str(calibration_set), "epsilon": eps},
           "models": [{"model": m, "parameters": {"weight": w}} for m, w in zip(("a", "b"), weights)]}
    ours = Materializer(paths).materialize(Recipe.from_dict(cfg))
    fishers = [_fisher_by_fusion_bench(paths[m], fusion_bench) for m in ("a", "b")]
    params = {k: [load_checkpoint(paths[m])[k].float() for m in ("a", "b")] for k in ours}
    ref = fusion_bench.merging_with_fisher_weights(params, fishers, torch.tensor(weights), normalize_fisher_weight=False,
                                                   minimal_fisher_weight=eps)
    err, where = worst_relative_error(ours, ref)
    assert err < 1e-5, (err, where)
    moved = [k for k in ours if not torch.allclose(ours[k], (weights[0] * params[k][0] + weights[1] * params[k][1]) / sum(weights))]
    assert len(moved) > len(ours) // 2  # the Fisher weighs, not the plain average


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_regmean_equals_fusion_bench(family, family_models, fusion_bench, calibration_set):
    """RegMean equals fusion-bench's merging_with_regmean_weights fed our Gram matrices (linear weights solved,
    the rest averaged), both solving in float64 from the same float32 weights and statistics (its torch.inverse
    in float32 alone drifts 1.5e-5 from the float64 answer on these Grams); the head's Gram matrix is the final
    hidden states' h^T h / tokens, computed apart."""
    paths, alpha = family_models(family), 0.6
    cfg = {"merge_method": "regmean", "dtype": "float32", "parameters": {"calibration": str(calibration_set), "alpha": alpha},
           "models": [{"model": m} for m in ("a", "b")]}
    ours = Materializer(paths).materialize(Recipe.from_dict(cfg))
    stats = [calibration.statistics(str(paths[m]), str(calibration_set)) for m in ("a", "b")]
    grams = [{k.removeprefix(calibration.GRAM): s.get_tensor(k) for k in s.keys() if k.startswith(calibration.GRAM)} for s in stats]
    params = {k: [load_checkpoint(paths[m])[k].double() for m in ("a", "b")] for k in ours}
    ref = fusion_bench.merging_with_regmean_weights(params, [{k: v.double() for k, v in g.items()} for g in grams],
                                                    reduce_non_diagonal_ratio=alpha)
    err, where = worst_relative_error(ours, ref)
    assert err < 1e-5, (err, where)
    solved = [k for k in ours if k.removesuffix(".weight") in grams[0]]
    assert len(solved) >= 7 and len(solved) < len(ours)
    model = transformers.AutoModelForCausalLM.from_pretrained(paths["a"], dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(paths["a"])
    with torch.no_grad():
        h = torch.cat([model(input_ids=tok(t, return_tensors="pt").input_ids, output_hidden_states=True).hidden_states[-1][0]
                       for t in CALIBRATION])
    assert torch.allclose(grams[0]["lm_head"], h.T @ h / len(h), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_weighted_regmean_equals_fusion_bench_on_weighted_grams(family, family_models, fusion_bench, calibration_set):
    """RegMean with per-model weights (a search's genome) is the least-squares merge with model i's objective
    scaled by w_i: fusion-bench's merging_with_regmean_weights fed the Gram matrices times w_i gives every
    solved linear weight; the other tensors are the weighted mean. Weights that differ per layer apply per tensor."""
    paths, alpha, w = family_models(family), 0.9, {"a": [{"filter": "mlp", "value": 3.0}, {"value": 0.5}], "b": 1.0}
    cfg = {"merge_method": "regmean", "dtype": "float32", "parameters": {"calibration": str(calibration_set), "alpha": alpha},
           "models": [{"model": m, "parameters": {"weight": w[m]}} for m in ("a", "b")]}
    ours = Materializer(paths).materialize(Recipe.from_dict(cfg))
    stats = [calibration.statistics(str(paths[m]), str(calibration_set)) for m in ("a", "b")]
    grams = [{k.removeprefix(calibration.GRAM): s.get_tensor(k).double() for k in s.keys() if k.startswith(calibration.GRAM)} for s in stats]
    weight_a = lambda k: 3.0 if "mlp" in k else 0.5  # noqa: E731
    params = {k: [load_checkpoint(paths[m])[k].double() for m in ("a", "b")] for k in ours}
    solved = [k for k in ours if k.removesuffix(".weight") in grams[0]]
    for k in solved:
        module = k.removesuffix(".weight")
        ref = fusion_bench.merging_with_regmean_weights({k: params[k]}, [{module: grams[0][module] * weight_a(k)}, {module: grams[1][module]}],
                                                        reduce_non_diagonal_ratio=alpha)[k]
        assert (ours[k].double() - ref).abs().max() / ref.abs().max() < 1e-5, k
    for k in set(ours) - set(solved):
        ref = (weight_a(k) * params[k][0] + params[k][1]) / (weight_a(k) + 1.0)
        assert torch.allclose(ours[k].double(), ref, rtol=1e-5, atol=1e-7), k
    plain = Materializer(paths).materialize(Recipe.from_dict({**cfg, "models": [{"model": m} for m in ("a", "b")]}))
    assert any((ours[k] - plain[k]).abs().max() > 1e-3 for k in solved if "mlp" in k)  # the weights move the merge


def test_data_aware_errors_in_evomerge_merge(workdir, monkeypatch, capsys, tmp_path):  # noqa: F811
    """A bad alpha, a missing or malformed calibration set: one line naming it, nothing written."""
    monkeypatch.setenv("EVOMERGE_CACHE", str(tmp_path / "cache"))
    bad_rows = tmp_path / "bad.jsonl"
    bad_rows.write_text('{"text": "fine"}\n{"txt": 1}\n')
    cfg = {"merge_method": "regmean", "dtype": "float32", "models": [{"model": "a"}, {"model": "b"}]}
    for bad, needle in (({**cfg, "parameters": {"calibration": str(bad_rows), "alpha": 1.5}}, "parameter 'alpha' for the recipe must be in [0, 1], got 1.5"),
                        (cfg, "missing required parameter 'calibration'"),
                        ({**cfg, "parameters": {"calibration": str(tmp_path / "none.jsonl")}}, "none.jsonl: no such file"),
                        ({**cfg, "parameters": {"calibration": str(bad_rows)}}, "bad.jsonl line 2: expected"),
                        ({**cfg, "merge_method": "fisher", "parameters": {"calibration": str(bad_rows), "epsilon": 0}}, "parameter 'epsilon'")):
        code, _, err = run_cli(monkeypatch, capsys, "merge", str(write_config(workdir, bad)), "-o", str(workdir / "bad"))
        assert_failed_cleanly(code, err, workdir / "bad", needle)


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_regmean_plus_equals_fusion_bench(family, weighted, family_models, fusion_bench, calibration_set):
    """RegMean++: fusion-bench's RegMeanAlgorithmPlusPlus needs its model pool and CLIP wrappers, so its math is
    checked in two parts on the Gram matrices of the same merge run apart. (1) Layer l's Gram matrices for model a
    are those of our merged model with layer l replaced by a's own: its inputs come from the merged layers < l
    (hooks on that model); (2) the solved weights equal fusion-bench's regmean_plusplus
    merging_with_regmean_weights fed those Grams, times w_i where the weights differ by module (float64, as in the
    RegMean test); the other tensors are the weighted mean. And they differ from plain RegMean's, and weights move them."""
    paths, alpha = family_models(family), 0.8
    weight_a = (lambda k: 3.0 if "mlp" in k else 0.5) if weighted else (lambda k: 1.0)  # noqa: E731
    models = [{"model": "a", "parameters": {"weight": [{"filter": "mlp", "value": 3.0}, {"value": 0.5}]}}, {"model": "b"}]
    cfg = {"merge_method": "regmean_plus", "dtype": "float32", "parameters": {"calibration": str(calibration_set), "alpha": alpha},
           "models": models if weighted else [{"model": m} for m in ("a", "b")]}
    ours = Materializer(paths).materialize(Recipe.from_dict(cfg))
    own = {m: load_checkpoint(paths[m]) for m in ("a", "b")}
    found: dict = {}
    again = calibration.regmean_plus(paths["a"], CALIBRATION, 2, lambda n: [own[m][n] for m in ("a", "b")],
                                     lambda n: [weight_a(n), 1.0], lambda n: alpha, found)
    assert all(torch.equal(ours[k], again[k]) for k in ours)
    grams = [{m: g.double() * (weight_a(m) if i == 0 else 1.0) for (i, m), g in found.items() if i == j} for j in (0, 1)]
    params = {k: [own[m][k].double() for m in ("a", "b")] for k in ours}
    solved = [k for k in ours if k.removesuffix(".weight") in grams[0]]
    ref = fusion_bench.plus.merging_with_regmean_weights({k: params[k] for k in solved}, grams, reduce_non_diagonal_ratio=alpha)
    err, where = worst_relative_error({k: ours[k] for k in solved}, ref)
    assert err < 1e-5 and len(solved) >= 7, (err, where)
    for k in set(ours) - set(solved):
        assert torch.allclose(ours[k].double(), (weight_a(k) * params[k][0] + params[k][1]) / (weight_a(k) + 1.0), rtol=1e-5, atol=1e-7), k
    model = transformers.AutoModelForCausalLM.from_pretrained(paths["a"], dtype=torch.float32).eval()
    model.load_state_dict({k: v for k, v in ours.items()}, strict=False)
    tok = transformers.AutoTokenizer.from_pretrained(paths["a"])
    layer = 1
    with torch.no_grad():
        for k, v in own["a"].items():
            if k.startswith(f"model.layers.{layer}."):
                model.get_parameter(k).copy_(v.float())
        seen = []
        hook = model.model.layers[layer].mlp.down_proj.register_forward_hook(lambda _m, i, _o: seen.append(i[0][0]))
        for t in CALIBRATION:
            model(input_ids=tok(t, return_tensors="pt").input_ids)
        hook.remove()
    x = torch.cat(seen).double()
    assert torch.allclose(found[0, f"model.layers.{layer}.mlp.down_proj"].double(), x.T @ x / len(x), rtol=1e-4, atol=1e-7)
    other = Materializer(paths).materialize(Recipe.from_dict({**cfg, "merge_method": "regmean"}))
    assert not torch.allclose(other[f"model.layers.{layer}.mlp.down_proj.weight"], ours[f"model.layers.{layer}.mlp.down_proj.weight"])
    if weighted:
        plain = Materializer(paths).materialize(Recipe.from_dict({**cfg, "models": [{"model": m} for m in ("a", "b")]}))
        assert any((ours[k] - plain[k]).abs().max() > 1e-3 for k in solved if "mlp" in k)


@pytest.mark.parametrize("method", ["fisher", "regmean", "regmean_plus"])
def test_data_aware_methods_searched_in_the_layer_weights_space(method, tiny_models, calibration_set):
    """fisher's and regmean's weights per layer and expert are a layer-weights genome (no base needed); the
    calibration set is an option of the space, required with them and refused without them."""
    space = LayerWeights(sources=["a", "b"], num_layers=4, method=method, granularity=2, calibration=str(calibration_set))
    recipe = space.decode(space.initial())
    assert recipe.merge_method == method and recipe.parameters == {"calibration": str(calibration_set)}
    merged = Materializer(tiny_models).materialize(recipe)
    assert np.allclose(space.encode(recipe), space.initial())
    assert all(torch.isfinite(v).all() for v in merged.values())
    for kwargs in ({"method": method}, {"method": "ties", "base": "base", "calibration": str(calibration_set)}):
        with pytest.raises(UserError, match="`calibration` .* goes with the methods fisher, regmean, regmean_plus"):
            LayerWeights(sources=["a", "b"], num_layers=4, **kwargs)


def test_fisher_statistics_under_no_grad(tiny_models, calibration_set):
    """A run's worker loads a recipe's weights under torch.no_grad(): the Fisher computed there (the first merge
    that needs it) equals the one computed outside, not an error."""
    texts = calibration.read_examples(calibration_set)
    plain = calibration.compute(str(tiny_models["a"]), texts)
    with torch.no_grad():
        inside = calibration.compute(str(tiny_models["a"]), texts)
    fisher = [k for k in plain if k.startswith(calibration.FISHER)]
    assert fisher and all(torch.equal(plain[k], inside[k]) for k in plain)
    assert any(plain[k].abs().sum() > 0 for k in fisher)


def test_readme_states_the_statistics_cost():
    """README's data-aware cost figures are the arithmetic from Llama-2-7B/70B's shapes (layers, hidden, MLP, parameters)."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    for name, layers, hidden, mlp, params in (("7B", 32, 4096, 11008, 6.738e9), ("70B", 80, 8192, 28672, 68.977e9)):
        grams = 4 * (layers * (6 * hidden ** 2 + mlp ** 2) + hidden ** 2)
        assert f"{name}: {params * 4 / 1e9:.1f} GB" in readme
        assert f"{name}: {grams / 1e9:.1f} GB" in readme
        assert f"{grams / params:.2f}" in readme


def test_statistics_keyed_by_source_identity_and_calibration(tiny_models, calibration_set, tmp_path):
    """The statistics file is named by the source's content and the calibration file's: a copy of the checkpoint
    elsewhere shares it, an edited set or another checkpoint at the same path does not."""
    import shutil

    path = calibration.statistics_path(tiny_models["a"], calibration_set)
    calibration.statistics(str(tiny_models["a"]), str(calibration_set))
    assert path.is_file() and path.parent == tmp_path / "cache" / "calibration"
    copy = shutil.copytree(tiny_models["a"], tmp_path / "copy")
    assert calibration.statistics_path(copy, calibration_set) == path
    shutil.copy(tiny_models["b"] / "model.safetensors", copy / "model.safetensors")
    assert calibration.statistics_path(copy, calibration_set) != path
    edited = tmp_path / "edited.jsonl"
    edited.write_text(calibration_set.read_text() + json.dumps({"text": "one more"}) + "\n")
    assert calibration.statistics_path(tiny_models["a"], edited) != path


def _pcb_by_the_paper(tvs: torch.Tensor, ratio: float, clamp: float = 0.0001) -> torch.Tensor:
    """PCB-Merging written from the paper's steps with full sorts (Du et al. 2024, its published PCB_merge is
    not packaged: this is the independent oracle, the authors' file having been compared once by hand)."""
    n, d = tvs.shape
    srt = tvs.abs().sort(dim=1).values
    mag = tvs.abs().clamp(srt[:, int(d * clamp)][:, None], srt[:, int(d * (1 - clamp) - 1)][:, None])
    unit = lambda x: (x - x.min(1, keepdim=True).values) / (x.max(1, keepdim=True).values - x.min(1, keepdim=True).values)  # noqa: E731
    balance = torch.exp(n * unit(mag) ** 2) * torch.tanh(tvs * tvs.sum(0))
    floor = balance.sort(dim=1).values[:, int(d * (1 - ratio))][:, None]
    scale = unit(torch.maximum(balance, floor))
    return (torch.sign(tvs) * mag * scale).sum(0) / scale.sum(0).clamp(min=1e-12)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_pcb_equals_the_paper(family, family_models):
    """Each tensor is base + lambda x PCB of the weighted task vectors, flattened (the paper flattens the
    whole model; evomerge merges tensor by tensor, as it does TIES)."""
    paths, weights, lam, ratio = family_models(family), (0.7, 1.3), 0.9, 0.2
    cfg = {"merge_method": "pcb", "base_model": "base", "dtype": "float32", "parameters": {"lambda": lam},
           "models": [{"model": m, "parameters": {"weight": w, "density": ratio}} for m, w in zip(("a", "b"), weights)]}
    ours = Materializer(paths, base="base").materialize(Recipe.from_dict(cfg))
    base, tvs = _task_vectors(paths, weights)
    ref = {k: v.float() + lam * _pcb_by_the_paper(torch.stack([t[k].reshape(-1) for t in tvs]), ratio).reshape(v.shape)
           for k, v in base.items() if v.numel() > 1}
    err, where = worst_relative_error({k: ours[k] for k in ref}, ref)
    assert err < 1e-5, (err, where)
    assert sum(not torch.equal(ours[k], base[k].float()) for k in ref) == len(ref)


def test_pcb_parameters_checked_before_any_merge(workdir, monkeypatch, capsys):  # noqa: F811
    cfg = {"merge_method": "pcb", "base_model": "base", "dtype": "float32",
           "models": [{"model": "a", "parameters": {"weight": 1.0, "density": 0.3}}, {"model": "b", "parameters": {"weight": 0.5}}]}
    code, _, err = run_cli(monkeypatch, capsys, "merge", str(write_config(workdir, cfg)), "-o", str(workdir / "m"))
    assert code == 0, err
    assert all(torch.isfinite(v).all() for v in load_checkpoint(workdir / "m").values())
    for bad, needle in (({**cfg, "parameters": {"clamp_ratio": 0.4}}, "parameter 'clamp_ratio' for the recipe must be in [0, 0.25], got 0.4"),
                        ({**cfg, "models": [{"model": "a", "parameters": {"density": 0}}, {"model": "b"}]}, "parameter 'density'"),
                        ({**cfg, "base_model": None}, "pcb needs a base_model")):
        code, _, err = run_cli(monkeypatch, capsys, "merge", str(write_config(workdir, bad)), "-o", str(workdir / "bad"))
        assert_failed_cleanly(code, err, workdir / "bad", needle)


def _localize_stitch_by_the_authors(tvs: list[torch.Tensor], sparsity: list[float]) -> torch.Tensor:
    """Dataless Localize-and-Stitch as the authors' code computes it (uiuctml/Localize-and-Stitch, localize_utils.py:
    Localizer.create_basepatch, interpolate_model(round_=True), Stitcher.get_average_masks and interpolate_models),
    re-written here on one flat tensor as the independent oracle: k = int(sparsity x n), the threshold the least of
    torch.topk's k largest |tau|, the basepatch +-sigmoid_bias by |tau| > threshold, the mask its rounded sigmoid;
    each mask's count of the masks it meets (itself included), its reciprocal (0 where 0) times tau, summed. Where
    k is 0 their topk has no minimum: no entry is localized."""
    bias, masks = 5.0, []
    for tv, s in zip(tvs, sparsity):
        k = int(s * tv.numel())
        threshold = torch.topk(tv.abs(), k).values.min() if k else math.inf
        masks.append(torch.round(torch.sigmoid(torch.where(tv.abs() > threshold, bias, -bias))))
    merged = torch.zeros_like(tvs[0])
    for i, (tv, m) in enumerate(zip(tvs, masks)):
        count = m + sum(torch.logical_and(m, o) for j, o in enumerate(masks) if j != i)
        merged += torch.where(count == 0, 0.0, 1 / count) * tv
    return merged


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_localize_stitch_equals_the_authors_code(family, family_models, monkeypatch):
    """Each tensor is base + the authors' stitch of the weighted task vectors, localized at each model's own
    density (the paper's sparsity), flattened tensor by tensor (their code flattens the whole model, as PCB's
    does). Their code is not packaged: the oracle re-implements its arithmetic (_localize_stitch_by_the_authors).
    Pieces of 1000 entries: the stitch of a tensor in pieces equals it whole."""
    from evomerge.merge import methods

    monkeypatch.setattr(methods, "STITCH_PIECE", 1000)
    paths, weights, density = family_models(family), (0.7, 1.3), (0.2, 0.35)
    cfg = {"merge_method": "localize_stitch", "base_model": "base", "dtype": "float32",
           "models": [{"model": m, "parameters": {"weight": w, "density": d}} for m, w, d in zip(("a", "b"), weights, density)]}
    ours = Materializer(paths, base="base").materialize(Recipe.from_dict(cfg))
    base, tvs = _task_vectors(paths, weights)
    ref = {k: v.float() + _localize_stitch_by_the_authors([t[k].reshape(-1) for t in tvs], list(density)).reshape(v.shape)
           for k, v in base.items()}
    err, where = worst_relative_error(ours, ref)
    assert err < 1e-5, (err, where)
    changed = sum((ours[k] != base[k].float()).sum().item() for k in base) / sum(v.numel() for v in base.values())
    assert 0.4 < changed < 0.5, changed  # about 1 - 0.8 x 0.65 of the entries: the overlaps averaged, the rest kept


def test_localize_stitch_parameters_checked_before_any_merge(workdir, monkeypatch, capsys):  # noqa: F811
    """A weight of 0 leaves a model out (no entry localized, so none of the other's is halved); a density out of
    (0, 1] or a missing base fails in one line before anything is written."""
    cfg = {"merge_method": "localize_stitch", "base_model": "base", "dtype": "float32",
           "models": [{"model": "a", "parameters": {"weight": 1.0, "density": 0.3}}, {"model": "b", "parameters": {"weight": 0.0}}]}
    code, _, err = run_cli(monkeypatch, capsys, "merge", str(write_config(workdir, cfg)), "-o", str(workdir / "m"))
    assert code == 0, err
    alone = {**cfg, "models": cfg["models"][:1]}
    written, ref = load_checkpoint(workdir / "m"), Materializer({m: workdir / m for m in ("base", "a")}, base="base").materialize(Recipe.from_dict(alone))
    assert all(torch.equal(written[k], ref[k]) for k in ref)
    for bad, needle in (({**cfg, "models": [{"model": "a", "parameters": {"density": 0}}, {"model": "b"}]},
                         "parameter 'density' for model 'a' must be in (0, 1], got 0"),
                        ({**cfg, "models": [{"model": "a", "parameters": {"density": 1.5}}, {"model": "b"}]}, "must be in (0, 1], got 1.5"),
                        ({**cfg, "base_model": None}, "localize_stitch needs a base_model")):
        code, _, err = run_cli(monkeypatch, capsys, "merge", str(write_config(workdir, bad)), "-o", str(workdir / "bad"))
        assert_failed_cleanly(code, err, workdir / "bad", needle)


def test_footprint_counts_the_operators_own_buffers():
    """tsv_m and pcb hold more float32 copies of a tensor than a linear merge: the plan says so (per
    thread, the largest tensor, 2 experts: 64 B per entry for tsv_m, 48 for pcb; task arithmetic merges in blocks)."""
    from evomerge.run.footprint import Checkpoint, _merge_buffers

    base = Checkpoint(bytes=8_000_000, sizes=[1_000_000, 1_000])
    sizes = {m: _merge_buffers(LayerWeights(sources=["a", "b"], base="base", num_layers=2, method=m), 2, base, {}, False, threads=1).private
             for m in ("task_arithmetic", "tsv_m", "pcb")}
    assert sizes["tsv_m"] == 64_000_000 and sizes["pcb"] == 48_000_000 and sizes["task_arithmetic"] < 2_000_000, sizes


def test_lines_scales_each_layers_task_vector_by_start_plus_slope_over_depth(tiny_models):
    """LiNeS (not in fusion-bench 0.2.33; the paper's lambda_l = alpha + beta * l / (L - 1)): task arithmetic of
    one expert through the space puts base + lambda_l * tau in layer l, tensor for tensor; two values per expert
    and parameter, and decode(encode(r)) == r."""
    import json

    layers = json.loads((tiny_models["base"] / "config.json").read_text())["num_hidden_layers"]
    space = LayerWeights(sources=["a"], base="base", num_layers=layers, method="task_arithmetic", lines=True)
    assert space.names() == ["lines_start.default.a.weight", "lines_slope.default.a.weight"] and space.bounds.tolist() == [[0, 1], [-1, 1]]
    alpha, beta = 0.2, 0.5
    recipe = space.decode([alpha, beta])
    assert space.decode(space.encode(recipe)) == recipe and np.allclose(space.encode(recipe), [alpha, beta])
    merged = Materializer(tiny_models, base="base").materialize(recipe)
    base, expert = load_checkpoint(tiny_models["base"]), load_checkpoint(tiny_models["a"])
    for layer in range(layers):
        scale = alpha + beta * layer / (layers - 1)
        names = [k for k in base if f"layers.{layer}." in k]
        assert names and all(torch.allclose(merged[k].float(), base[k].float() + scale * (expert[k].float() - base[k].float()), atol=1e-6) for k in names)
    with pytest.raises(Exception, match="lines takes the place of knots"):
        LayerWeights(sources=["a"], base="base", num_layers=4, lines=True, knots=2)
    ties = LayerWeights(sources=["a", "b"], base="base", num_layers=4, lines=True)
    assert ties.dim == 8 and ties.decode(ties.encode(ties.decode(ties.initial()))) == ties.decode(ties.initial())


def test_lines_round_trips_any_point():
    space = LayerWeights(sources=["a", "b"], base="base", num_layers=9, lines=True, modules=["mlp"])
    rng = np.random.default_rng(0)
    for _ in range(200):
        r = space.decode(rng.uniform(space.bounds[:, 0], space.bounds[:, 1]))
        assert space.decode(space.encode(r)) == r
        assert all(0 <= v <= 1 for m in r.models for e in m.parameters["weight"] for v in e["value"])
