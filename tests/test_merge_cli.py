"""`evomerge merge`: the checkpoint it writes, and one test per bad input (a one-line error, exit 2,
nothing written at OUT)."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from evomerge.cli import main
from evomerge.config import load_config
from evomerge.merge import read_config
from evomerge.recipe import Recipe
from evomerge.records import UserError
from tests.merge_fixtures import load_checkpoint, mergekit_merge, worst_relative_error

TIES = {
    "merge_method": "ties",
    "base_model": "base",
    "models": [{"model": "a", "parameters": {"weight": [0.3, 0.9], "density": 0.5}},
               {"model": "b", "parameters": {"weight": 0.6, "density": [{"filter": "mlp", "value": 0.3}, {"value": 0.8}]}}],
}


def run_cli(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """The real console entry point, in process (a subprocess per case would spend seconds importing torch)."""
    monkeypatch.setattr(sys, "argv", ["evomerge", *args])
    code = 0
    try:
        main()
    except SystemExit as e:
        code = int(e.code or 0)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture()
def workdir(tiny_models, tmp_path):
    """A directory holding links to the tiny models by name (configs say `base`, `a`, `b`)."""
    for name, path in tiny_models.items():
        (tmp_path / name).symlink_to(path)
    return tmp_path


def write_config(workdir: Path, cfg: dict, name: str = "merge.yaml") -> Path:
    p = workdir / name
    p.write_text(yaml.safe_dump(cfg))
    return p


def variant(workdir: Path, src: str, name: str) -> Path:
    """A copy of model `src` to alter."""
    dst = workdir / name
    shutil.copytree(workdir / src, dst)
    return dst


def assert_failed_cleanly(code: int, err: str, out: Path, *needles: str) -> None:
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("evomerge: error: "), err
    for n in needles:
        assert n in lines[0], (n, lines[0])
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")], "temporary files left behind"


def test_merge_writes_a_loadable_checkpoint_equal_to_mergekit(workdir, tiny_models, monkeypatch, capsys, tmp_path):
    cfg = write_config(workdir, TIES)
    out = workdir / "merged"
    code, stdout, err = run_cli(monkeypatch, capsys, "merge", str(cfg), "-o", str(out))
    assert code == 0, err
    for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json", "README.md", "mergekit_config.yml"):
        assert (out / f).is_file(), f
    card = (out / "README.md").read_text()
    assert "merge_method: ties" in card and str(Path(tiny_models["a"]).resolve()) in card
    ours = load_checkpoint(out)
    err_rel, where = worst_relative_error(ours, mergekit_merge(TIES, tiny_models, tmp_path / "mk"))
    assert err_rel <= 1e-6, (err_rel, where)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert torch.equal(model.state_dict()["model.layers.2.mlp.up_proj.weight"], ours["model.layers.2.mlp.up_proj.weight"])
    assert len(tok("abc")["input_ids"]) >= 3
    # the emitted mergekit config replays in mergekit to the same weights
    replay = mergekit_merge(yaml.safe_load((out / "mergekit_config.yml").read_text()), {}, tmp_path / "replay")
    assert worst_relative_error(ours, replay)[0] <= 1e-6


def test_sharded_bf16_output_and_passthrough_depth(workdir, tiny_models):
    from evomerge.merge.writer import write_checkpoint

    recipe = Recipe.from_dict({"merge_method": "passthrough", "dtype": "bfloat16", "slices": [
        {"sources": [{"model": "a", "layer_range": [0, 4]}]}, {"sources": [{"model": "b", "layer_range": [2, 4]}]}]})
    out = write_checkpoint(recipe, tiny_models, workdir / "deep", max_shard_bytes=60_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and all((out / s).is_file() for s in shards)
    sd = load_checkpoint(out)
    assert all(t.dtype == torch.bfloat16 for t in sd.values())
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 6
    b = load_file(Path(tiny_models["b"]) / "model.safetensors")
    assert torch.equal(sd["model.layers.5.self_attn.q_proj.weight"], b["model.layers.3.self_attn.q_proj.weight"].bfloat16())
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 6


def test_existing_out_needs_force(workdir, monkeypatch, capsys):
    cfg = write_config(workdir, TIES)
    out = workdir / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, err = run_cli(monkeypatch, capsys, "merge", str(cfg), "-o", str(out))
    assert code == 2 and err.count("\n") == 1 and "--force" in err
    assert (out / "keep.txt").read_text() == "mine"
    code, _, err = run_cli(monkeypatch, capsys, "merge", str(cfg), "-o", str(out), "--force")
    assert code == 0, err
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()


def test_architectures_differ(workdir, monkeypatch, capsys):
    other = variant(workdir, "b", "other")
    cfg = json.loads((other / "config.json").read_text())
    cfg["architectures"] = ["MistralForCausalLM"]
    (other / "config.json").write_text(json.dumps(cfg))
    code, _, err = run_cli(monkeypatch, capsys, "merge", str(write_config(workdir, _with(TIES, b="other"))), "-o", str(workdir / "o"))
    assert_failed_cleanly(code, err, workdir / "o", "architectures differ", "'other'", "MistralForCausalLM", "LlamaForCausalLM")


def test_missing_tensor(workdir, monkeypatch, capsys):
    other = variant(workdir, "b", "other")
    sd = load_file(other / "model.safetensors")
    del sd["model.layers.1.mlp.gate_proj.weight"]
    save_file(sd, other / "model.safetensors")
    code, _, err = run_cli(monkeypatch, capsys, "merge", str(write_config(workdir, _with(TIES, b="other"))), "-o", str(workdir / "o"))
    assert_failed_cleanly(code, err, workdir / "o", "model.layers.1.mlp.gate_proj.weight", "missing from 'other'")


def test_tensor_shape_differs(workdir, monkeypatch, capsys):
    other = variant(workdir, "b", "other")
    sd = load_file(other / "model.safetensors")
    sd["model.layers.0.self_attn.o_proj.weight"] = torch.zeros(64, 32)
    save_file(sd, other / "model.safetensors")
    code, _, err = run_cli(monkeypatch, capsys, "merge", str(write_config(workdir, _with(TIES, b="other"))), "-o", str(workdir / "o"))
    assert_failed_cleanly(code, err, workdir / "o", "model.layers.0.self_attn.o_proj.weight", "[64, 64]", "[64, 32]")


def test_tokenizer_vocabularies_differ(workdir, monkeypatch, capsys):
    other = variant(workdir, "b", "other")
    tok = json.loads((other / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    vocab["a"], vocab["b"] = vocab["b"], vocab["a"]
    (other / "tokenizer.json").write_text(json.dumps(tok))
    code, _, err = run_cli(monkeypatch, capsys, "merge", str(write_config(workdir, _with(TIES, b="other"))), "-o", str(workdir / "o"))
    assert_failed_cleanly(code, err, workdir / "o", "tokenizers differ", "'other'", "token 'a' has id")


def test_unsupported_dtype(workdir, monkeypatch, capsys):
    other = variant(workdir, "b", "other")
    sd = load_file(other / "model.safetensors")
    sd["model.norm.weight"] = sd["model.norm.weight"].to(torch.int8)
    save_file(sd, other / "model.safetensors")
    code, _, err = run_cli(monkeypatch, capsys, "merge", str(write_config(workdir, _with(TIES, b="other"))), "-o", str(workdir / "o"))
    assert_failed_cleanly(code, err, workdir / "o", "model.norm.weight", "int8", "not supported")


def test_pickle_refused_unless_allowed_then_weights_only(workdir, monkeypatch, capsys):
    other = variant(workdir, "b", "other")
    sd = load_file(other / "model.safetensors")
    (other / "model.safetensors").unlink()
    torch.save(sd, other / "pytorch_model.bin")
    cfg = write_config(workdir, _with(TIES, b="other"))
    code, _, err = run_cli(monkeypatch, capsys, "merge", str(cfg), "-o", str(workdir / "o"))
    assert_failed_cleanly(code, err, workdir / "o", "pickle", "--allow-pickle", "'other'")
    code, _, err = run_cli(monkeypatch, capsys, "merge", str(cfg), "-o", str(workdir / "o"), "--allow-pickle")
    assert code == 0, err
    # weights_only: a pickle that smuggles an object other than tensors is refused even with the flag
    torch.save({"x": Path("/")}, other / "pytorch_model.bin")
    code, _, err = run_cli(monkeypatch, capsys, "merge", str(cfg), "-o", str(workdir / "o2"), "--allow-pickle")
    assert_failed_cleanly(code, err, workdir / "o2", "'other'", "weights-only")


def test_failure_during_the_merge_leaves_nothing(workdir, monkeypatch, capsys):
    """DELLA's epsilon is checked per tensor while merging: the failure comes after writing began."""
    cfg = _with(TIES, method="della")
    cfg["parameters"] = {"epsilon": [{"filter": "lm_head", "value": 0.6}, {"value": 0.1}]}
    code, _, err = run_cli(monkeypatch, capsys, "merge", str(write_config(workdir, cfg)), "-o", str(workdir / "o"))
    assert_failed_cleanly(code, err, workdir / "o", "della", "epsilon")


def _with(cfg: dict, *, b: str | None = None, method: str | None = None) -> dict:
    c = json.loads(json.dumps(cfg))
    if b:
        c["models"][1]["model"] = b
    if method:
        c["merge_method"] = method
    return c


def _model_params(cfg: dict, i: int, **params) -> dict:
    c = json.loads(json.dumps(cfg))
    c["models"][i]["parameters"].update(params)
    return c


PAIR = {"base_model": "base", "models": [{"model": "a"}, {"model": "b"}]}


@pytest.mark.parametrize("cfg,needle", [
    (_model_params(TIES, 0, density=1.7), "parameter 'density' for model 'a' must be in [0, 1], got 1.7"),
    (_model_params(_with(TIES, method="dare_ties"), 1, density=-0.2), "parameter 'density' for model 'b' must be in [0, 1], got -0.2"),
    (_model_params(TIES, 0, density=[0.2, 1.3]), "parameter 'density' for model 'a' must be in [0, 1], got 1.3"),  # a gradient's point
    (_model_params(TIES, 1, density=[{"filter": "mlp", "value": 1.2}, {"value": 0.5}]), "'density' for model 'b' must be in [0, 1], got 1.2"),
    (_model_params(TIES, 0, weight=float("nan")), "parameter 'weight' for model 'a' must be a finite number, got nan"),
    ({**TIES, "parameters": {"lambda": float("inf")}}, "parameter 'lambda' for the recipe must be a finite number, got inf"),
    (_model_params(_with(TIES, method="breadcrumbs"), 0, gamma=1.5), "parameter 'gamma' for model 'a' must be in [0, 1], got 1.5"),
    (_model_params(_with(TIES, method="della"), 1, epsilon=-0.1), "parameter 'epsilon' for model 'b' must be >= 0, got -0.1"),
    ({**PAIR, "merge_method": "slerp", "parameters": {"t": 1.5}}, "parameter 't' for the recipe must be in [0, 1], got 1.5"),
    ({"merge_method": "passthrough", "models": [{"model": "a", "parameters": {"scale": "-inf"}}]},
     "parameter 'scale' for model 'a' must be a finite number, got '-inf'"),
    ({"merge_method": "ties", "base_model": "base", "slices": [{"sources": [
        {"model": "base", "layer_range": [0, 2]},
        {"model": "a", "layer_range": [0, 2], "parameters": {"weight": 1.0, "density": 3}}]}]},
     "parameter 'density' for model 'a' in slices[0] must be in [0, 1], got 3"),
    ({"merge_method": "linear", "models": [{"model": {**TIES, "parameters": {"lambda": "big"}}, "name": "inner",
                                            "parameters": {"weight": 1.0}}]}, "parameter 'lambda' for the recipe must be float, got 'big'"),
])
def test_out_of_range_parameters_are_one_line_naming_model_and_parameter(workdir, monkeypatch, capsys, cfg, needle):
    """Checked before anything is read or written (mergekit would merge most of these silently)."""
    code, _, err = run_cli(monkeypatch, capsys, "merge", str(write_config(workdir, cfg)), "-o", str(workdir / "o"))
    assert_failed_cleanly(code, err, workdir / "o", needle)


def test_a_nested_recipe_merges_as_the_materializer_merges_it(workdir, tiny_models, monkeypatch, capsys):
    cfg = {"merge_method": "linear", "models": [{"model": TIES, "name": "inner", "parameters": {"weight": 0.5}},
                                                {"model": "a", "parameters": {"weight": 0.5}}]}
    code, _, err = run_cli(monkeypatch, capsys, "merge", str(write_config(workdir, cfg)), "-o", str(workdir / "o"))
    assert code == 0, err
    from evomerge.merge import Materializer

    want = Materializer(dict(tiny_models), base="base", tie_order="mergekit").materialize(Recipe.from_dict(cfg))
    got = load_checkpoint(workdir / "o")
    assert set(got) == set(want) and all(torch.equal(got[n], want[n]) for n in want)


def test_a_source_without_config_json_is_refused(workdir, monkeypatch, capsys):
    other = variant(workdir, "b", "other")
    (other / "config.json").unlink()
    code, _, err = run_cli(monkeypatch, capsys, "merge", str(write_config(workdir, _with(TIES, b="other"))), "-o", str(workdir / "o"))
    assert_failed_cleanly(code, err, workdir / "o", "model 'other': no config.json in", str(other))
    (other / "config.json").write_text("{not json")
    code, _, err = run_cli(monkeypatch, capsys, "merge", str(write_config(workdir, _with(TIES, b="other"))), "-o", str(workdir / "o"))
    assert_failed_cleanly(code, err, workdir / "o", "model 'other':", "config.json is not valid JSON")


@pytest.mark.parametrize("cfg,needle", [
    ({**TIES, "merge_method": "tiess"}, "unknown merge method 'tiess'"),
    ({**TIES, "models": [{"model": "nowhere", "parameters": {"weight": 1.0}}]}, "model 'nowhere'"),
    ({**TIES, "tokenizer_source": "nowhere"}, "tokenizer_source 'nowhere' names no model"),
    ({**TIES, "parameters": {"desnity": 0.5}}, "unknown parameter 'desnity'"),
    ({"merge_method": "slerp", "base_model": "base", "models": [{"model": "a"}, {"model": "b"}], "parameters": {"t": 0.5}}, "slerp takes 2"),
    ({**TIES, "models": [{"model": "a", "parameters": {"density": 0.5}}]}, "missing required parameter 'weight'"),
])
def test_recipe_mistakes(workdir, monkeypatch, capsys, cfg, needle):
    code, _, err = run_cli(monkeypatch, capsys, "merge", str(write_config(workdir, cfg)), "-o", str(workdir / "o"))
    assert_failed_cleanly(code, err, workdir / "o", needle)


def test_invalid_yaml_and_missing_config(workdir, monkeypatch, capsys):
    bad = workdir / "bad.yaml"
    bad.write_text("merge_method: [ties\n")
    code, _, err = run_cli(monkeypatch, capsys, "merge", str(bad), "-o", str(workdir / "o"))
    assert_failed_cleanly(code, err, workdir / "o", "not valid YAML", str(bad))
    code, _, err = run_cli(monkeypatch, capsys, "merge", str(workdir / "none.yaml"), "-o", str(workdir / "o"))
    assert_failed_cleanly(code, err, workdir / "o", "config file not found", str(workdir / "none.yaml"))
    bad.write_text("- ties\n")
    code, _, err = run_cli(monkeypatch, capsys, "merge", str(bad), "-o", str(workdir / "o"))
    assert_failed_cleanly(code, err, workdir / "o", "expected a mapping at the top level, got list", str(bad))


@pytest.mark.parametrize("load", [load_config, read_config, Recipe.load])
@pytest.mark.parametrize("text, needle", [
    (None, "file not found"), ("a: [b\n", "is not valid YAML: "), ("just text\n", "expected a mapping at the top level, got str"),
])
def test_yaml_loaders_name_the_file_and_the_problem(tmp_path, load, text, needle):
    """Run configs, merge configs and recipes share one reader, so all three fail the same way."""
    path = tmp_path / "x.yaml"
    if text is not None:
        path.write_text(text)
    with pytest.raises(UserError) as e:
        load(path)
    assert needle in str(e.value) and str(path) in str(e.value) and "\n" not in str(e.value)


def test_emit_mergekit_and_console_script(workdir):
    """The installed console script, as a user runs it."""
    cfg = write_config(workdir, {**TIES, "merge_method": "dare_ties", "seed": 7})
    exe = Path(sys.executable).with_name("evomerge")
    res = subprocess.run([str(exe), "merge", str(cfg), "--emit-mergekit"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    emitted = yaml.safe_load(res.stdout)
    assert emitted["merge_method"] == "dare_ties" and "seed" not in emitted and "--random-seed 7" in res.stdout
    from mergekit.config import MergeConfiguration

    MergeConfiguration.model_validate(emitted)
    res = subprocess.run([str(exe), "merge", str(cfg), "-o", str(workdir / "o"), "--device", "cpu"], capture_output=True, text=True,
                         timeout=120, cwd=workdir)
    assert res.returncode == 0, res.stderr
    assert (workdir / "o" / "model.safetensors").is_file()


def test_emit_mergekit_refuses_what_mergekit_cannot_express(workdir, monkeypatch, capsys):
    path_recipe = write_config(workdir, {"merge_method": "linear", "path": [{"model": "a", "layer": 0}]}, "path.yaml")
    code, out, err = run_cli(monkeypatch, capsys, "merge", str(path_recipe), "--emit-mergekit")
    assert code == 2 and err.count("\n") == 1 and "path" in err and out == ""
