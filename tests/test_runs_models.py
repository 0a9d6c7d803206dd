"""A whole run over real tiny models: layer-weights space, CMA-ES, a task scored by the HF handle whose
sources stay resident; then export and report read it back."""
from __future__ import annotations

import json
import re

import pytest
import torch
import yaml
from safetensors.torch import load_file

from evomerge import open_run
from evomerge.run.assemble import open_engine
from evomerge.config import load_config, parse_config
from evomerge.results.export import export_run
from evomerge.merge import Materializer
from evomerge.results.report import render
from runs_fixtures import execute_explorer
from tests.merge_fixtures import mergekit_merge


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
    # mergekit-yaml replays the export (dtype float32, out_dtype the sources') bit for bit to evomerge's merge in
    # mergekit's tie order; the run's (index) order differs only where tied magnitudes straddle a TIES threshold,
    # as the export's comment says (here one norm vector of 39 tensors, by 7.7e-6)
    assert (mk_cfg["dtype"], mk_cfg["out_dtype"]) == ("float32", "float32") and "# equal magnitudes" in mk.read_text()
    replayed = mergekit_merge(mk_cfg, {}, tmp_path / "mk")
    as_mergekit = Materializer({k: str(v) for k, v in tiny_models.items()}, base="base", tie_order="mergekit").materialize(run.recipe(cid))
    assert set(replayed) == set(exported) and all(torch.equal(replayed[k], as_mergekit[k]) for k in exported)
    assert len([k for k in exported if not torch.equal(replayed[k], exported[k])]) <= 1


def test_report_shows_the_recipe_per_layer(model_run):
    page = render(model_run / "run")
    assert "its recipe per layer" in page
    heat = re.search(r'"x":\["layer 0","layer 1","layer 2","layer 3"\],"xgap":1,"y":(\[[^\]]*\])', page)
    assert heat and {"a.weight", "a.density", "b.weight"} <= set(json.loads(heat.group(1)))


def test_pareto_explorer_notebook_clicks_picks_shows_and_exports(model_run, tmp_path):
    """notebooks/pareto_explorer.ipynb, executed with nbclient on this run, its widgets driven as code."""
    pytest.importorskip("nbclient")
    nb, text = execute_explorer(model_run / "run", tmp_path / "exported", tmp_path)
    run = open_run(model_run / "run")
    front = set(int(i) for i in run.pareto().id)
    clicked, selected = map(int, re.search(r"clicked (\d+) selected (\d+)", text).groups())
    assert clicked == selected and clicked in front  # the click picked the point under it
    assert {"a.weight", "a.density", "b.weight"} <= set(eval(re.search(r"heatmap rows (\[.*\])", text).group(1)))
    assert "merge_method: ties" in text and f"candidate {clicked} (on the Pareto front)" in text
    picked, selected = map(int, re.search(r"picked (\d+) selected (\d+)", text).groups())
    assert picked == selected  # the dropdown picked it
    exported = tmp_path / "exported" / f"candidate_{picked}.yaml"
    assert f"wrote {exported}" in text and yaml.safe_load(exported.read_text()) == run.recipe(picked).to_dict()
    plots = [o for c in nb.cells for o in c.get("outputs", []) if "application/vnd.plotly.v1+json" in o.get("data", {})]
    assert len(plots) == 5  # history, front, hypervolume, parallel coordinates, heatmap


def test_two_tasks_default_to_a_front_whose_knee_is_the_best_held_out_and_exported(tiny_models, tmp_path):
    """Two skills: with no optimizer named, the run searches a front (a Gaussian process over both objectives) and
    its best, what the held-out table scores and the export writes, is the front's knee, not the first task's best."""
    for name, n in (("t1", 3), ("t2", 4)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps({"prompt": f"{i}*{n}=", "reference": str(i * n)}) + "\n"
                                                        for i in range(3)))
    tasks = [{"name": t, "path": f"{t}.jsonl", "metrics": ["token_accuracy"]} for t in ("t1", "t2")]
    cfg = {"sources": {k: str(v) for k, v in tiny_models.items()}, "base": "base",
           "space": {"name": "layer_weights", "options": {"method": "task_arithmetic", "granularity": 0}},
           "fitness": {"tasks": tasks, "handle": {"batch_size": 4}},
           "budget": {"evaluations": 8}, "seed": 0, "holdout": {"tasks": tasks, "export": "best_model"}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    loaded = load_config(tmp_path / "run.yaml")
    assert (loaded.optimizer.name, loaded.optimizer.options, loaded.best) == ("optuna", {"sampler": "gp"}, "knee")
    engine = open_engine(loaded, tmp_path / "run", resume=False)
    assert engine.run() == "budget: evaluations"
    engine.store.close()
    from evomerge.results.holdout import finish_run
    from evomerge.results.journal import knee

    result = finish_run(tmp_path / "run", progress=False)
    run = open_run(tmp_path / "run")
    ok = run.frame(genomes=False)
    want = int(ok.iloc[knee(run.signed(ok))].id)
    assert int(run.best()["id"]) == want == result["best"] and result["best_rule"].startswith("the knee of the front")
    assert run.best_rule() == "the knee of the front over tok_acc/t1, tok_acc/t2"
    exported = load_file(tmp_path / "run" / "best_model" / "model.safetensors")
    expected = Materializer({k: str(v) for k, v in tiny_models.items()}, base="base").materialize(run.recipe(want))
    assert all(torch.equal(exported[k], t.to(exported[k].dtype)) for k, t in expected.items())


@pytest.mark.parametrize("tasks,budget,want", [
    (1, {"evaluations": 300}, ("optuna", {"sampler": "gp"})),  # one skill within a budget a user pays for: Bayesian
    (1, {"evaluations": 1001}, ("cmaes", {})),  # a Gaussian process's ask grows with the trials: CMA-ES beyond
    (1, {"wall_time": "1h"}, ("cmaes", {})),  # no known number of trials
    (2, {"evaluations": 300}, ("optuna", {"sampler": "gp"})),  # several skills: a front, Bayesian within the budget
    (2, {"evaluations": 1001}, ("nsga2", {})),
])
def test_the_default_search_follows_the_tasks_and_the_budget(tiny_models, tmp_path, tasks, budget, want):
    task = {"path": "t.jsonl", "metrics": ["token_accuracy"]}
    cfg = parse_config({"sources": {k: str(v) for k, v in tiny_models.items()}, "base": "base",
                        "space": {"name": "layer_weights", "options": {"method": "task_arithmetic"}},
                        "fitness": {"tasks": [{"name": f"t{i}", **task} for i in range(tasks)]}, "budget": budget})
    assert (cfg.optimizer.name, cfg.optimizer.options) == want
    assert cfg.best == ("knee" if tasks > 1 else "first")  # several skills: the front's most balanced member
    # the choice is written down: a resumed run (its stored config) searches as it began, whatever the default becomes
    assert parse_config(cfg.to_dict()).optimizer == cfg.optimizer


def test_a_new_budget_chooses_the_default_search_again_but_a_stored_choice_stays(tiny_models):
    """`run --evaluations 5000` on a config naming no optimizer is not a Gaussian process's search; `resume
    --evaluations` raises a run's budget and keeps the optimizer it began with; a named optimizer is always kept."""
    def config(**extra):
        return parse_config({"sources": {k: str(v) for k, v in tiny_models.items()}, "base": "base",
                             "space": {"name": "layer_weights", "options": {"method": "task_arithmetic"}},
                             "fitness": {"tasks": [{"name": "t", "path": "t.jsonl", "metrics": ["token_accuracy"]}]},
                             "budget": {"evaluations": 300, "wall_time": "1h"}, **extra})

    bigger = config().with_budget(evaluations=5000)
    assert (bigger.optimizer.name, bigger.optimizer.options, bigger.budget.evaluations) == ("cmaes", {}, 5000)
    assert bigger.budget.wall_time == config().budget.wall_time  # the other limits stay
    stored = parse_config(config().to_dict()).with_budget(evaluations=5000)
    assert (stored.optimizer.name, stored.optimizer.options) == ("optuna", {"sampler": "gp"})
    named = config(optimizer={"name": "random"}, best="knee").with_budget(evaluations=5000)
    assert (named.optimizer.name, named.best) == ("random", "knee")
