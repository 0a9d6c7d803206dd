"""Operators beyond mergekit 0.1.5 (issue 28), each against fusion-bench 0.2.33's own functions driven with
our tensors. fusion-bench's package imports a training stack; its algorithm modules need only torch, so the
wheel (pip download --no-deps, cached per user) is unpacked and those modules are loaded from its files
(tall_mask/utils.py imports the package for helpers generate_task_masks does not use: that function alone).
It has no PCB-Merging nor LiNeS: PCB is checked against the paper's steps."""
from __future__ import annotations

import ast
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
import yaml

from evomerge.merge.materializer import Materializer
from evomerge.recipe import Recipe
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
    return SimpleNamespace(tsvm=_load(src, "fusion_bench.method.task_singular_vector.utils.TSVM_utils"),
                           generate_task_masks=space["generate_task_masks"])


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


@pytest.mark.parametrize("method", ["tsv_m", "tall_consensus", "pcb"])
def test_searched_in_the_layer_weights_space(method, tiny_models):
    space = LayerWeights(sources=["a", "b"], base="base", num_layers=4, method=method, granularity=2)
    recipe = space.decode(space.initial())
    assert recipe.merge_method == method and set(recipe.models[0].parameters) == ({"weight", "density"} if method == "pcb" else {"weight"})
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


@pytest.mark.parametrize("method", ["tsv_m", "tall_consensus", "pcb"])
def test_operators_merge_the_real_test_bed(method, real_zoo, tmp_path):
    out, built = real_zoo
    assert built.returncode == 0, built.stderr[-2000:]
    models = {m: out / "models" / m for m in ("base", "math", "fr")}
    merged, base = _merge_real(models, method, tmp_path), load_checkpoint(models["base"])
    assert set(merged) == set(base) and all(merged[k].dtype == torch.bfloat16 and torch.isfinite(merged[k]).all() for k in merged)
    assert sum(not torch.equal(merged[k], base[k]) for k in merged) > 100  # a real merge, not the base copied


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


def test_footprint_counts_the_operators_own_buffers():
    """tsv_m and pcb hold more float32 copies of a tensor than a linear merge: the plan says so (per
    thread, the largest tensor, 2 experts: 64 B per entry for tsv_m, 48 for pcb; task arithmetic merges in blocks)."""
    from evomerge.footprint import Checkpoint, _merge_buffers

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
