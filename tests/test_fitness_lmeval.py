"""lm-eval tasks as fitness (fitness.lmeval), scored in place on the zoo, against lm-eval itself.

The oracle is `lm_eval.simple_evaluate` with lm-eval's own HF model (`HFLM`) freshly loaded from the merged
checkpoint written to disk; evomerge scores the same recipe in place on its resident HF handle, after the
fitness has already scored another candidate (so requests built once are shown to be reusable). Three
request kinds: a loglikelihood task (the zoo's shipped J-math task), a generate_until task with a regex
filter, a multiple_choice task. Everything offline, over the zoo's JSONL.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
pytest.importorskip("lm_eval")

from evomerge.records import UserError  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
ZOO = ROOT / "evomerge" / "zoo"
SOURCES = {k: str(ZOO / "models" / k) for k in ("base", "math", "lang")}
LIMIT = 16
pytestmark = pytest.mark.skipif(not (ZOO / "models" / "base" / "config.json").is_file(), reason="the zoo is not in the tree")

RECIPE = {"merge_method": "task_arithmetic", "base_model": "base",
          "models": [{"model": "math", "parameters": {"weight": 0.7}}, {"model": "lang", "parameters": {"weight": 1.0}}]}
BASE = {"merge_method": "linear", "models": [{"model": "base", "parameters": {"weight": 1.0}}]}

GEN = """task: zoo_math_e_gen
dataset_path: json
dataset_kwargs: {data_files: {validation: %s}}
validation_split: validation
output_type: generate_until
doc_to_text: "{{prompt}}"
doc_to_target: "{{reference}}"
generation_kwargs: {until: ["<eos>", "?"], max_gen_toks: 8, do_sample: false}
filter_list:
  - name: number
    filter:
      - {function: regex, regex_pattern: "(-?[0-9]+)"}
      - {function: take_first}
metric_list:
  - {metric: exact_match, aggregation: mean, higher_is_better: true}
"""
MC = """task: zoo_math_e_mc
dataset_path: json
dataset_kwargs: {data_files: {validation: %s}}
validation_split: validation
output_type: multiple_choice
doc_to_text: "{{prompt.rstrip()}}"
doc_to_choice: "{{choices}}"
doc_to_target: "{{gold}}"
metric_list:
  - {metric: acc, aggregation: mean, higher_is_better: true}
  - {metric: acc_norm, aggregation: mean, higher_is_better: true}
"""


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory) -> Path:
    """The shipped J-math task (its data path made absolute, for lm-eval's own loader), a generation task and
    a multiple-choice task over the zoo's E-math problems."""
    d = tmp_path_factory.mktemp("lmeval_tasks")
    shipped = (ROOT / "runs" / "lmeval_tasks" / "math_j_dev.yaml").read_text()
    (d / "math_j_dev.yaml").write_text(shipped.replace("../../evomerge/zoo/data", str(ZOO / "data")))
    (d / "gen.yaml").write_text(GEN % (ZOO / "data" / "math_e_dev.jsonl"))
    rows = []
    for i, line in enumerate((ZOO / "data" / "math_e_dev.jsonl").read_text().splitlines()[:LIMIT]):
        ex = json.loads(line)
        n = int(ex["reference"])
        choices = [str(n), str(n + 1), str(n + 10)]
        choices = choices[i % 3:] + choices[: i % 3]
        rows.append({"prompt": ex["prompt"], "choices": choices, "gold": choices.index(str(n))})
    (d / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "mc.yaml").write_text(MC % (d / "mc.jsonl"))
    return d


@pytest.fixture(scope="module")
def handle():
    from evomerge.merge import Materializer
    from evomerge.fitness.hf import HFHandle

    return HFHandle(SOURCES["base"], Materializer(SOURCES, base="base"), batch_size=8)


@pytest.fixture(scope="module")
def reference_lm(tmp_path_factory):
    """lm-eval's own HF model, loaded fresh from the merged checkpoint."""
    from lm_eval.models.huggingface import HFLM

    from evomerge.merge.writer import write_checkpoint
    from evomerge.recipe import Recipe

    out = write_checkpoint(Recipe.from_dict(RECIPE), SOURCES, tmp_path_factory.mktemp("merged") / "model")
    return HFLM(pretrained=str(out), device="cpu", batch_size=8)


def simple_evaluate(lm, task: str, tasks_dir: Path) -> dict:
    import lm_eval
    from lm_eval.tasks import TaskManager

    return lm_eval.simple_evaluate(model=lm, tasks=[task], limit=LIMIT, bootstrap_iters=0, log_samples=True,
                                   task_manager=TaskManager(include_path=str(tasks_dir), include_defaults=False))


def by_doc(samples: list[dict], filt: str) -> list[dict]:
    return sorted((s for s in samples if s["filter"] == filt), key=lambda s: s["doc_id"])


@pytest.mark.parametrize("task,metric,other", [
    ("zoo_math_j_dev", "acc", None),
    ("zoo_math_e_gen", "exact_match,number", None),
    ("zoo_math_e_mc", "acc", "acc_norm"),
])
def test_in_place_scores_equal_simple_evaluate_on_the_merged_model(task, metric, other, tasks_dir, handle, reference_lm):
    from evomerge.recipe import Recipe
    from evomerge.fitness.lmeval import LMEvalFitness

    fitness = LMEvalFitness([task], include_path=tasks_dir, limit=LIMIT, metrics={task: metric})
    handle.set_recipe(Recipe.from_dict(BASE))
    fitness.evaluate(handle)  # another candidate first: the requests built for it serve the next one
    handle.set_recipe(Recipe.from_dict(RECIPE))
    got = fitness.run(handle)
    want = simple_evaluate(reference_lm, task, tasks_dir)

    name, _, filt = metric.partition(",")
    filt = filt or "none"
    keys = [f"{m},{filt}" for m in (name, other) if m]
    for key in keys:
        assert got["results"][task][key] == want["results"][task][key], key
    mine, theirs = by_doc(got["samples"][task], filt), by_doc(want["samples"][task], filt)
    assert [s["doc_id"] for s in mine] == [s["doc_id"] for s in theirs] == list(range(LIMIT))
    for a, b in zip(mine, theirs):
        assert a["arguments"] == b["arguments"]
        if task == "zoo_math_e_gen":  # the same completions, the same numbers pulled out of them
            assert a["resps"] == b["resps"] and a["filtered_resps"] == b["filtered_resps"]
        else:
            for (ll_a, greedy_a), (ll_b, greedy_b) in zip(a["filtered_resps"], b["filtered_resps"]):
                assert ll_a == pytest.approx(ll_b, abs=1e-4) and greedy_a == greedy_b
    result = fitness.result_of(got)
    objective = f"lm_eval/{task}/{metric.removesuffix(',none')}"
    assert [o.name for o in fitness.objectives] == [objective]
    assert result.objectives[objective] == want["results"][task][keys[0]]
    assert result.per_example == [float(s[name]) for s in theirs]  # per-example scores: lm-eval's per-sample values
    assert 0 < sum(result.per_example) < LIMIT or task == "zoo_math_j_dev"  # the metric separates examples here


def test_weights_add_the_weighted_sum_as_first_objective(tasks_dir, handle):
    from evomerge.recipe import Recipe
    from evomerge.fitness.lmeval import SCORE, LMEvalFitness

    fitness = LMEvalFitness(["zoo_math_e_mc", "zoo_math_e_gen"], include_path=tasks_dir, limit=LIMIT,
                            weights={"zoo_math_e_mc": 2.0}, metrics={"zoo_math_e_mc": "acc_norm"})
    handle.set_recipe(Recipe.from_dict(RECIPE))
    r = fitness.evaluate(handle)
    names = [o.name for o in fitness.objectives]
    assert names == [SCORE, "lm_eval/zoo_math_e_mc/acc_norm", "lm_eval/zoo_math_e_gen/exact_match,number"]
    assert r.objectives[SCORE] == pytest.approx(2.0 * r.objectives[names[1]] + r.objectives[names[2]])
    assert len(r.per_example) == 2 * LIMIT


def one_line_error(fn, *match: str) -> str:
    with pytest.raises(UserError) as e:
        fn()
    text = str(e.value)
    assert "\n" not in text
    for m in match:
        assert m in text, text
    return text


def test_bad_input_is_one_line_naming_the_culprit(tasks_dir, tmp_path):
    from evomerge.fitness.lmeval import LMEvalFitness

    # a task that does not produce the metric: what it does produce
    one_line_error(lambda: LMEvalFitness(["zoo_math_j_dev"], include_path=tasks_dir, metrics={"zoo_math_j_dev": "exact_match"}),
                   "'zoo_math_j_dev'", "'exact_match'", "acc,none")
    one_line_error(lambda: LMEvalFitness(["zoo_math_e_gen"], include_path=tasks_dir, metrics={"zoo_math_e_gen": "exact_match,loose"}),
                   "exact_match,number")
    # a dataset that is neither local nor in the cache, offline: named, with the way to local files
    (tmp_path / "hub.yaml").write_text("task: needs_hub\ndataset_path: evomerge-nobody/not-a-dataset\n"
                                       "output_type: loglikelihood\ntest_split: test\ndoc_to_text: q\ndoc_to_target: a\n")
    one_line_error(lambda: LMEvalFitness(["needs_hub"], include_path=tmp_path),
                   "evomerge-nobody/not-a-dataset", "not available offline", "data_files")
    # a name lm-eval does not know (its whole registry is read): the close matches
    one_line_error(lambda: LMEvalFitness(["zoo_math_j_dve"], include_path=tasks_dir),
                   "unknown lm-eval task 'zoo_math_j_dve'", "zoo_math_j_dev")
    # a public benchmark's evaluation split as fitness: refused before any download, unless insisted
    one_line_error(lambda: LMEvalFitness(["arc_easy"]), "'arc_easy'", "allow_test_set")
    one_line_error(lambda: LMEvalFitness(["gsm8k"]), "'gsm8k'", "allow_test_set")


def test_config_section_builds_the_fitness_and_resolves_paths_beside_the_config(tmp_path):
    from evomerge.run.assemble import build_fitness
    from evomerge.config import parse_config

    cfg = parse_config({
        "sources": {k: v for k, v in SOURCES.items()}, "base": "base",
        "space": {"name": "layer_weights", "options": {"method": "ties"}},
        "fitness": {"lm_eval": {"tasks": ["zoo_math_j_dev"], "include_path": "lmeval_tasks", "limit": 4}},
        "budget": {"evaluations": 1},
    }, base_dir=ROOT / "runs")
    fitness = build_fitness(cfg)  # the shipped YAML's relative data path resolves beside it
    assert [o.name for o in fitness.objectives] == ["lm_eval/zoo_math_j_dev/acc"]
    with pytest.raises(UserError, match="exactly one of fitness.tasks"):
        parse_config({**cfg.to_dict(), "fitness": {"lm_eval": {"tasks": ["x"]}, "tasks": [{"name": "y"}]}})
