"""mergekit's dtype semantics, bit for bit: `dtype` is the dtype mergekit 0.1.5 loads and merges in, `out_dtype`
the one it writes. Sources in bfloat16, float16 and float32 whose deltas are as large as the base (signs flip),
on Llama and Qwen2; every tensor torch.equal to mergekit's run of the same config.

mergekit draws DARE's masks from torch's global generator, evomerge from counter-based draws keyed by (seed,
tensor, model): for DARE the oracle runs with torch.bernoulli answering evomerge's draws, the rest (rescale,
sign election, sums, roundings) its own.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from evomerge.merge import rng, sparsify
from evomerge.merge.command import run_merge
from tests.arch_fixtures import build_family
from tests.merge_fixtures import load_checkpoint, mergekit_merge, resolve_names

pytest.importorskip("mergekit")

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def _large_deltas(paths: dict[str, Path], dtype: torch.dtype) -> dict[str, Path]:
    """The family's checkpoints rewritten in `dtype`, each expert = base + noise of the base's own scale."""
    files = {n: next(p.glob("*.safetensors")) for n, p in paths.items()}
    base = load_file(files["base"])
    for i, (name, f) in enumerate(sorted(files.items())):
        gen = torch.Generator().manual_seed(10 + i)
        sd = {k: (v if name == "base" else v + torch.randn(v.shape, generator=gen) * v.float().std().clamp_min(1e-2)).to(dtype)
              for k, v in base.items()}
        save_file(sd, str(f), metadata={"format": "pt"})
    return paths


@pytest.fixture(scope="module", params=[("llama", "bfloat16"), ("llama", "float16"), ("llama", "float32"), ("qwen2", "bfloat16")],
                ids=lambda p: "-".join(p))
def sources(request, tmp_path_factory):
    family, dtype = request.param
    return dtype, _large_deltas(build_family(family, tmp_path_factory.mktemp(f"{family}-{dtype}")), DTYPES[dtype])


def _config(method: str, **extra) -> dict:
    pa, pb = {"weight": 0.7, "density": 0.45}, {"weight": 0.5, "density": 0.6}
    if method in ("linear", "task_arithmetic"):
        pa.pop("density"), pb.pop("density")
    if method == "breadcrumbs_ties":
        pa["gamma"] = 0.05
    models = [{"model": "a", "parameters": pa}, {"model": "b", "parameters": pb}]
    if method == "linear":
        return {"merge_method": "linear", "models": [{"model": "base", "parameters": {"weight": 0.3}}, *models], **extra}
    return {"merge_method": method, "base_model": "base", "models": models, **extra}


def _with_evomerge_draws(monkeypatch, seed: int) -> list[tuple[str, str]]:
    """mergekit's bernoulli trims answered by evomerge's draws for the (tensor, model) being trimmed (a model
    is named by its path, as in the config evomerge merge reads)."""
    from mergekit.merge_methods import generalized_task_arithmetic as gta

    pending: list[tuple[str, str]] = []
    drawn: list[tuple[str, str]] = []
    merge_group, trim = gta.GeneralizedTaskArithmeticMerge.merge_group, gta.sparsify

    def grouped(self, group, /, **parameters):
        pending[:] = [(group.metadata.name, str(e.id.model.path)) for e in group.entries if not e.is_base]
        return merge_group(self, group, **parameters)

    def sparsified(delta, density, method, **kw):
        tensor, model = pending.pop(0)
        drawn.append((tensor, model))
        keep = sparsify.bernoulli(density, rng.key_for(seed, tensor, model))
        with monkeypatch.context() as m:
            m.setattr(torch, "bernoulli", lambda p: keep.mask(p.reshape(-1), 0).reshape(p.shape).to(p.dtype))
            return trim(delta, density, method, **kw)

    monkeypatch.setattr(gta.GeneralizedTaskArithmeticMerge, "merge_group", grouped)
    monkeypatch.setattr(gta, "sparsify", sparsified)
    return drawn


def _assert_bit_exact(cfg: dict, paths: dict[str, Path], tmp: Path, monkeypatch) -> dict[str, torch.Tensor]:
    import yaml

    drawn = None
    if cfg["merge_method"].startswith("dare"):
        cfg = {**cfg, "seed": 7}
        drawn = _with_evomerge_draws(monkeypatch, 7)
    config = tmp / "merge.yml"
    config.write_text(yaml.safe_dump(resolve_names(cfg, paths)))
    ref = mergekit_merge({k: v for k, v in cfg.items() if k != "seed"}, paths, tmp / "mk")
    assert drawn is None or len(drawn) == 2 * len(ref)  # every DARE trim drew evomerge's mask
    run_merge(str(config), str(tmp / "ours"))
    ours = load_checkpoint(tmp / "ours")
    assert set(ours) == set(ref)
    differ = [k for k in ref if not (ours[k].dtype == ref[k].dtype and torch.equal(ours[k], ref[k]))]
    assert not differ, f"{len(differ)} of {len(ref)} tensors differ, e.g. {differ[0]}: {ours[differ[0]].dtype} vs " \
                       f"{ref[differ[0]].dtype}, max {(ours[differ[0]].double() - ref[differ[0]].double()).abs().max():.3g}"
    return ours


METHODS = ["linear", "task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs_ties"]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtypes", [{"dtype": "bfloat16"}, {"dtype": "float16"}, {}, {"dtype": "float32", "out_dtype": "bfloat16"},
                                    {"dtype": "bfloat16", "out_dtype": "float32"}], ids=lambda d: "-".join(d.values()) or "stored")
def test_replays_mergekit_bit_for_bit(method, dtypes, sources, tmp_path, monkeypatch):
    stored, paths = sources
    ours = _assert_bit_exact(_config(method, **dtypes), paths, tmp_path, monkeypatch)
    written = dtypes.get("out_dtype", dtypes.get("dtype", stored))
    assert {t.dtype for t in ours.values()} == {DTYPES[written]}


@pytest.fixture(scope="module")
def bf16_llama(tmp_path_factory):
    return _large_deltas(build_family("llama", tmp_path_factory.mktemp("export")), torch.bfloat16)


@pytest.mark.parametrize("tie_order", ["index", "mergekit"])
@pytest.mark.parametrize("method", ["linear", "task_arithmetic", "ties", "breadcrumbs_ties"])
def test_float32_kernels_and_their_mergekit_export_agree(method, tie_order, bf16_llama, tmp_path):
    """What a search scores (float32 kernels over bfloat16 sources, rounded once) is what `export --format hf`
    writes, and the exported mergekit config (dtype float32, out_dtype bfloat16) replays it in mergekit bit for bit,
    at trims' thresholds too with tie_order mergekit; with a search's tie_order index, but for the entries tied at
    a trim's threshold, which the export's comment states."""
    import yaml

    from evomerge.results.export import mergekit_config
    from evomerge.merge.writer import write_checkpoint
    from evomerge.recipe import Recipe

    recipe = Recipe.from_dict(_config(method))
    sources = {n: str(p) for n, p in bf16_llama.items()}
    write_checkpoint(recipe, sources, tmp_path / "ours", base="base", tie_order=tie_order)
    text = mergekit_config(recipe, sources, "base", sources)
    cfg = yaml.safe_load(text)
    assert (cfg["dtype"], cfg["out_dtype"]) == ("float32", "bfloat16")
    ref, ours = mergekit_merge(cfg, {}, tmp_path / "mk"), load_checkpoint(tmp_path / "ours")
    assert set(ours) == set(ref) and all(ours[k].dtype == torch.bfloat16 for k in ref)
    beside = yaml.safe_load((tmp_path / "ours" / "mergekit_config.yml").read_text())  # the checkpoint's own says so too
    assert (beside["dtype"], beside["out_dtype"]) == ("float32", "bfloat16")
    differ = sum(int((ours[k] != ref[k]).sum()) for k in ref)
    if tie_order == "index" and method in ("ties", "breadcrumbs_ties"):  # the export says so
        assert "# equal magnitudes at a trim's threshold" in text
        print(f"{method}: {differ} of {sum(t.numel() for t in ref.values())} entries differ")
        assert 0 < differ < 1e-2 * sum(t.numel() for t in ref.values())
    else:
        assert differ == 0


OTHERS = {
    "slerp": {"merge_method": "slerp", "base_model": "base", "models": [{"model": "base"}, {"model": "a"}], "parameters": {"t": 0.3}},
    "model_stock": {"merge_method": "model_stock", "base_model": "base", "models": [{"model": "a"}, {"model": "b"}]},
}


@pytest.mark.parametrize("method", sorted(OTHERS))
def test_other_methods_load_in_dtype_and_round_to_it(method, bf16_llama, tmp_path):
    """Methods without mergekit's low-precision ops merge the inputs as loaded in float32 and round once to
    `dtype` then `out_dtype`: within a few bfloat16 steps of mergekit, which computes in bfloat16."""
    import yaml

    cfg = {**OTHERS[method], "dtype": "bfloat16", "out_dtype": "float32"}
    ref = mergekit_merge(cfg, bf16_llama, tmp_path / "mk")
    (tmp_path / "c.yml").write_text(yaml.safe_dump(resolve_names(cfg, bf16_llama)))
    run_merge(str(tmp_path / "c.yml"), str(tmp_path / "ours"))
    ours = load_checkpoint(tmp_path / "ours")
    for k, t in ref.items():
        assert ours[k].dtype == torch.float32 and torch.equal(ours[k], ours[k].bfloat16().float())  # rounded to bf16 first
        err = float((ours[k] - t).abs().max() / t.abs().max())
        assert err < 0.05, (k, err)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_a_live_module_gets_what_the_checkpoint_gets(dtype, bf16_llama):
    """load_into (a search scoring a candidate) writes the same weights as materialize, in a bfloat16 module too."""
    import transformers as T

    from evomerge.merge import Materializer
    from evomerge.recipe import Recipe

    recipe = Recipe.from_dict({**_config("ties"), "dtype": dtype})
    mat = Materializer({n: str(p) for n, p in bf16_llama.items()}, base="base", tie_order="mergekit")
    expected = mat.materialize(recipe, dtype=torch.bfloat16)
    module = T.AutoModelForCausalLM.from_pretrained(bf16_llama["base"], dtype=torch.bfloat16)
    mat.load_into(recipe, module)
    params = dict(module.named_parameters())
    assert all(torch.equal(params[k], t) for k, t in expected.items())
