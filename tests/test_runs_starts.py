"""A user's own recipes as the search's first candidates (optimizer.starts): a mergekit config, its models named by
path, scored as written (merged in the search's arithmetic) before the space's start, learned from by the Gaussian
process, left out of the comparison rows; one that the space cannot hold is one line naming the file."""
from __future__ import annotations

import copy
import os
from dataclasses import replace

import numpy as np
import pytest
import yaml

from test_demos_runs import RUNS, ZOO, evomerge, needs_zoo, reduced

# a mergekit TIES config as a user writes it: one number per model, models by path (relative to this file)
START = """merge_method: ties
base_model: {zoo}/base
models:
  - model: {zoo}/math
    parameters: {{weight: 1.25, density: 0.3}}
  - model: {zoo}/lang
    parameters: {{weight: 0.75, density: 0.5}}
parameters: {{normalize: false}}
dtype: float32
"""


def start_file(tmp_path):
    path = tmp_path / "mine.yml"
    path.write_text(START.format(zoo=os.path.relpath(ZOO, tmp_path)))
    return path


@needs_zoo
def test_a_mergekit_config_is_scored_first_as_written_and_the_gp_learns_it(tmp_path):
    start = start_file(tmp_path)
    optimizer = {"name": "optuna", "options": {"sampler": "gp"}, "starts": [str(start)]}
    cfg = reduced("demo", tmp_path, evaluations=3, optimizer=optimizer)
    out = evomerge("run", str(cfg), "--run-dir", str(tmp_path / "run"), "-q", timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "is not kept" not in out.stderr  # a float32 start is merged as written

    from evomerge import open_run
    from evomerge.fitness.hf import HFHandle
    from evomerge.fitness.suite import TaskFitness
    from evomerge.merge import Materializer
    from evomerge.merge.mergekit_yaml import read_config

    run = open_run(tmp_path / "run")
    try:
        evals = {e.candidate_id: e for e in run.evaluations()}
        first, second = run.recipe(0), run.recipe(1)
        genomes = run.genomes([0, 1])
    finally:
        run.close()
    # candidate 0 is the user's recipe: every layer and module of each expert at its one number
    for name, (w, d) in {"math": (1.25, 0.3), "lang": (0.75, 0.5)}.items():
        ref = next(m for m in first.models if m.model == name)
        for param, want in (("weight", w), ("density", d)):
            values = [v for e in ref.parameters[param] for v in e["value"]]
            assert values and all(v == pytest.approx(want) for v in values), (name, param)
    # candidate 1 is the space's start (untuned TIES), as without starts
    assert {v for e in next(m for m in second.models if m.model == "math").parameters["weight"] for v in e["value"]} == {1.0}
    assert not np.allclose(genomes[0], genomes[1])
    # and its score is the user's config merged and scored on its own
    spec = dict(yaml.safe_load(cfg.read_text())["fitness"]["tasks"][0])
    sources = {k: str(ZOO / k) for k in ("base", "math", "lang")}
    handle = HFHandle(sources["base"], Materializer(sources, base="base"), batch_size=64)
    handle.set_recipe(read_config(start).renamed({f"{os.path.relpath(ZOO, tmp_path)}/{k}": k for k in sources}))
    alone = TaskFitness.from_config([spec], base_dir=RUNS).evaluate(handle).objectives
    assert dict(evals[0].objectives) == pytest.approx(dict(alone))
    # the comparison rows search from the space's start only
    for row in ("random_search", "global_TIES"):
        sub = open_run(tmp_path / "run" / "compare" / row)
        try:
            assert sub.config["optimizer"]["starts"] == []
        finally:
            sub.close()


def test_the_gaussian_process_tells_itself_a_start_once():
    from evomerge.optimizers import make
    from evomerge.records import Evaluation, Objective

    opt = make("optuna", bounds=[[0, 1]] * 3, objectives=[Objective("acc")], seed=0, x0=[0.5] * 3,
               starts=[[0.1, 0.2, 0.3]], sampler="gp")
    asked = opt.ask(2)
    assert [c.id for c in asked] == [0, 1] and asked[0].x == [0.1, 0.2, 0.3] and asked[1].x == [0.5] * 3
    done = [Evaluation(candidate_id=c.id, objectives={"acc": v}) for c, v in zip(asked, (0.9, 0.4))]
    opt.tell(done)
    opt.tell(done[:1])  # a resumed run replays it
    again = make("optuna", bounds=[[0, 1]] * 3, objectives=[Objective("acc")], seed=0, x0=[0.5] * 3,
                 starts=[[0.1, 0.2, 0.3]], sampler="gp")
    again.load_state_dict(copy.deepcopy(opt.state_dict()))
    for o in (opt, again):
        trials = o._study.get_trials()
        assert sorted(t.values[0] for t in trials) == [0.4, 0.9]
        assert [t.params for t in trials if t.user_attrs == {"start": 0}] == [{"x0": 0.1, "x1": 0.2, "x2": 0.3}]


@needs_zoo
@pytest.mark.parametrize("change, says", [(("1.25", "2.0"), "outside the space's range [0, 1.5]"),
                                          (("/math", "/elsewhere"), "no model 'math'"),
                                          (("normalize: false", "normalize: true"), "this space's merges: base 'base', "
                                                                                    "parameters {'normalize': False}")])
def test_a_start_the_space_cannot_hold_is_one_line_naming_the_file(tmp_path, change, says):
    start = start_file(tmp_path)
    start.write_text(start.read_text().replace(*change))
    cfg = reduced("demo", tmp_path, evaluations=2, optimizer={"name": "random", "starts": [str(start)]})
    out = evomerge("run", str(cfg), "--run-dir", str(tmp_path / "run"))
    assert out.returncode == 2 and out.stderr.strip().count("\n") == 0, out.stderr[-2000:]
    assert f"optimizer.starts: {start}: " in out.stderr and says in out.stderr
    assert not (tmp_path / "run").exists()


def test_a_bf16_mergekit_config_starts_a_search_of_the_real_model(tmp_path, real_zoo):
    """The same on SmolLM2-135M (the session's truncated real zoo: tied embeddings, bf16 checkpoints) with the config
    a user writes for it, `dtype: bfloat16`: candidate 0 holds its numbers on the space's curve over depth and scores
    what the config merged on its own scores, merged as every candidate of the search is (float32 arithmetic)."""
    zoo, built = real_zoo
    assert built.returncode == 0, built.stderr[-2000:]
    models = zoo / "models"
    sources = {k: str(models / k) for k in ("base", "math", "fr")}
    start = tmp_path / "mine.yml"
    start.write_text(START.replace("{zoo}/lang", "{zoo}/fr").replace("float32", "bfloat16").format(zoo=models))
    cfg = reduced("real", tmp_path, evaluations=2, limit=4, sources=sources,
                  optimizer={"name": "random", "starts": [str(start)]})
    raw = yaml.safe_load(cfg.read_text())
    for task in raw["fitness"]["tasks"]:  # a graded metric: the truncated experts answer no problem exactly
        task["metrics"] = ["gold_prob"]
    raw["holdout"] = {"tasks": raw["holdout"]["tasks"][:1]}
    cfg.write_text(yaml.safe_dump(raw, sort_keys=False))
    out = evomerge("run", str(cfg), "--run-dir", str(tmp_path / "run"), "-q", timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    said = [line for line in out.stderr.splitlines() if "is not kept" in line]
    assert said == [f"evomerge: optimizer.starts: {start}: its dtype bfloat16 is not kept; it is merged as every "
                    "candidate is, in float32 arithmetic"]

    from evomerge import open_run
    from evomerge.fitness.hf import HFHandle
    from evomerge.fitness.suite import TaskFitness
    from evomerge.merge import Materializer
    from evomerge.merge.mergekit_yaml import read_config

    run = open_run(tmp_path / "run")
    try:
        evals = {e.candidate_id: e for e in run.evaluations()}
        first = run.recipe(0)
    finally:
        run.close()
    for name, (w, d) in {"math": (1.25, 0.3), "fr": (0.75, 0.5)}.items():
        ref = next(m for m in first.models if m.model == name)
        assert ref.parameters == {"weight": [pytest.approx(w)] * 30, "density": [pytest.approx(d)] * 30}, name
    handle = HFHandle(sources["base"], Materializer(sources, base="base"), batch_size=50)
    mine = read_config(start).renamed({where: k for k, where in sources.items()})
    assert mine.dtype == "bfloat16"
    handle.set_recipe(replace(mine, dtype=None))
    alone = TaskFitness.from_config(raw["fitness"]["tasks"], base_dir=RUNS).evaluate(handle).objectives
    assert 0 < min(alone.values()) and dict(evals[0].objectives) == pytest.approx(dict(alone))
