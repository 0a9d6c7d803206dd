"""A whole run over real tiny models: layer-weights space, CMA-ES, a task scored by the HF handle whose
sources stay resident; then export and report read it back."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import nbformat
import pytest
import torch
import yaml
from safetensors.torch import load_file

from evomerge import open_run
from evomerge.assemble import open_engine
from evomerge.config import load_config
from evomerge.export import export_run
from evomerge.merge import Materializer
from evomerge.report import render


@pytest.fixture(scope="module")
def model_run(tiny_models, tmp_path_factory):
    d = tmp_path_factory.mktemp("modelrun")
    (d / "task.jsonl").write_text("".join(json.dumps({"prompt": f"{i}+{i}=", "reference": str(2 * i)}) + "\n"
                                          for i in range(3)))
    cfg = {
        "sources": {k: str(v) for k, v in tiny_models.items()},
        "base": "base",
        "space": {"name": "layer_weights", "options": {"method": "ties"}},
        "optimizer": {"name": "cmaes", "options": {"popsize": 4}},
        "fitness": {"tasks": [{"name": "t", "path": "task.jsonl", "metrics": ["loss", "token_accuracy"]}], "handle": {"batch_size": 4}},
        "budget": {"evaluations": 4},
        "seed": 0,
    }
    (d / "run.yaml").write_text(yaml.safe_dump(cfg))
    engine = open_engine(load_config(d / "run.yaml"), d / "run", resume=False)
    assert engine.run() == "budget: evaluations"
    engine.store.close()
    return d


def test_run_over_models_records_recipes_and_scores(model_run):
    run = open_run(model_run / "run")
    df = run.frame()
    assert list(df.status) == ["ok"] * 4 and df["loss/t"].between(0, 20).all() and df["tok_acc/t"].between(0, 1).all()
    assert df["loss/t"].nunique() == 4  # four different merges, four different losses
    # one resident worker: the model was loaded once, so materializing a candidate is cheap
    timings = [e.timings for e in run.store.evaluations()]
    assert all(t["materialize"] < 30 for t in timings)
    best = run.best()
    recipe = run.recipe(int(best["id"]))
    assert recipe.merge_method == "ties" and [m.model for m in recipe.models] == ["a", "b"]
    assert len(recipe.models[0].parameters["weight"]) == 4  # a value per layer of the 4-layer model


def test_export_writes_the_chosen_candidates_merge(model_run, tiny_models, tmp_path):
    run = open_run(model_run / "run")
    cid = int(run.best()["id"])
    (out,) = export_run(model_run / "run", tmp_path / "best", fmt="hf", best="loss/t")
    exported = load_file(out / "model.safetensors")
    expected = Materializer({k: str(v) for k, v in tiny_models.items()}, base="base").materialize(run.recipe(cid))
    assert set(exported) == set(expected)
    for name, t in expected.items():
        torch.testing.assert_close(exported[name].float(), t.float())
    (mk,) = export_run(model_run / "run", tmp_path / "c.yml", fmt="mergekit", candidate=cid)
    mk_cfg = yaml.safe_load(mk.read_text())
    assert mk_cfg["base_model"] == str(tiny_models["base"]) and mk_cfg["models"][0]["model"] == str(tiny_models["a"])


def test_report_shows_the_recipe_per_layer(model_run):
    page = render(model_run / "run")
    assert "its recipe per layer" in page
    heat = re.search(r'"x":\["layer 0","layer 1","layer 2","layer 3"\],"xgap":1,"y":(\[[^\]]*\])', page)
    assert heat and {"a.weight", "a.density", "b.weight"} <= set(json.loads(heat.group(1)))


def test_pareto_explorer_notebook_picks_shows_and_exports(model_run, tmp_path, monkeypatch):
    """notebooks/pareto_explorer.ipynb, executed with nbclient on this run."""
    nbclient = pytest.importorskip("nbclient")
    here = Path(__file__).resolve().parent
    monkeypatch.setenv("EVOMERGE_RUN", str(model_run / "run"))
    monkeypatch.setenv("EVOMERGE_EXPORT", str(tmp_path / "exported"))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(here), str(here.parent)]))
    nb = nbformat.read(here.parent / "notebooks" / "pareto_explorer.ipynb", as_version=4)
    nbclient.NotebookClient(nb, timeout=180, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    text = "".join(o.get("text", "") for o in outputs)
    assert "4 evaluations, 0 failed; objectives: loss/t (min), tok_acc/t (max)" in text
    svgs = [o["data"]["image/svg+xml"] for o in outputs if "image/svg+xml" in o.get("data", {})]
    assert len(svgs) == 1 and svgs[0].count("<title>candidate") == 4
    picked = int(re.search(r"candidate (\d+):", text).group(1))
    run = open_run(model_run / "run")
    assert picked in set(run.pareto().id)
    assert "merge_method: ties" in text  # its recipe was shown
    exported = tmp_path / "exported" / f"candidate_{picked}.yaml"
    assert yaml.safe_load(exported.read_text()) == run.recipe(picked).to_dict()
