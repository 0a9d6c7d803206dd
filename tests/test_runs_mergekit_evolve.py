"""mergekit-evolve configs run by `evomerge run` (evomerge.mergekit_evolve).

The config is mergekit's documented example (docs/evolve.md: `genome` with models, dare_ties, base_model,
layer_granularity, the optional flags; `tasks` with weight and metric) with the zoo's paths and task. The
translation is checked against mergekit 0.1.5 itself: for the same genotype, mergekit-evolve's genome and
evomerge's layer_weights space give the same merged weights (every layer and the embeddings; the final norm
and lm_head follow mergekit's last layer group there and layer_weights' first group here).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

pytest.importorskip("lm_eval")

from evomerge.records import UserError  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
ZOO = ROOT / "evomerge" / "zoo"
pytestmark = pytest.mark.skipif(not (ZOO / "models" / "base" / "config.json").is_file(), reason="the zoo is not in the tree")

DOCUMENTED = """\
genome:
    models:
      - {models}/math
      - {models}/lang
    merge_method: dare_ties
    base_model: {models}/base
    tokenizer_source: null # optional
    layer_granularity: 2

    # optional:
    normalize: false
    allow_negative_weights: false
    smooth: false
    filters: [self_attn, mlp]
tasks:
  - name: zoo_math_j_dev
    weight: 1.0 # optional
    metric: "acc,none" # defaults to acc,none
limit: 8
apply_chat_template: false  # the zoo's tokenizers have no chat template
"""


def test_documented_example_runs_with_evomerge_run_and_prints_its_evomerge_config(tmp_path):
    from evomerge.config import parse_config
    from evomerge.run.store import RunStore

    models = os.path.relpath(ZOO / "models", tmp_path)  # relative paths, resolved from the config's folder
    (tmp_path / "genome.yaml").write_text(DOCUMENTED.format(models=models))
    task = (ROOT / "runs" / "lmeval_tasks" / "math_j_dev.yaml").read_text()  # beside the config, as --task-search-path
    (tmp_path / "math_j_dev.yaml").write_text(task.replace("../../evomerge/zoo/data", str(ZOO / "data")))
    out = subprocess.run([sys.executable, "-m", "evomerge.cli", "run", str(tmp_path / "genome.yaml"), "--run-dir",
                          str(tmp_path / "run"), "--evaluations", "3", "-q"], capture_output=True, text=True, cwd=ROOT,
                         timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1", "HF_DATASETS_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    header, _, rest = out.stdout.partition("\n")
    assert "is a mergekit-evolve config" in header
    printed = yaml.safe_load(rest.split("\nevomerge: ", 1)[0])
    cfg = parse_config(printed, base_dir=tmp_path)  # the printed config is a valid evomerge config ...
    store = RunStore.open(tmp_path / "run")
    try:
        assert {**store.config, "budget": None} == {**cfg.to_dict(), "budget": None}  # ... of this very run
        assert [o.name for o in store.objectives] == ["lm_eval/score", "lm_eval/zoo_math_j_dev/acc"]
    finally:
        store.close()
    assert printed["space"]["options"]["sources"] == ["math", "lang"] and printed["base"] == "base"
    assert printed["optimizer"] == {"name": "cmaes", "options": {"sigma0": pytest.approx(1 / 6, abs=1e-6)}}
    status = subprocess.run([sys.executable, "-m", "evomerge.cli", "status", str(tmp_path / "run"), "--json"],
                            capture_output=True, text=True, cwd=ROOT, timeout=120)
    info = json.loads(status.stdout)
    assert info["evaluations"] == 3 and info["failed"] == 0


def test_same_merge_as_mergekit_evolve_for_the_same_genotype(tmp_path):
    """ties, 3 layer groups, filters: mergekit's genome turned into a merge by mergekit, against evomerge's space
    decoded and merged by evomerge, for one genotype (evomerge's genome is the same numbers, reordered)."""
    from mergekit.evo.config import EvolMergeConfiguration
    from mergekit.evo.genome import ModelGenome
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    from evomerge import search_spaces
    from evomerge.mergekit_evolve import to_evomerge
    from evomerge.merge import Materializer
    from tests.merge_fixtures import load_checkpoint, worst_relative_error

    raw = yaml.safe_load(DOCUMENTED.format(models=ZOO / "models"))
    raw["genome"].update(merge_method="ties", normalize=True)
    config, _ = to_evomerge(raw, tmp_path)
    space = search_spaces.make("layer_weights", num_layers=6, base="base", **config["space"]["options"])
    genome = ModelGenome(EvolMergeConfiguration.model_validate(raw).genome)
    rng = np.random.default_rng(0)
    x = rng.uniform(space.bounds[:, 0], space.bounds[:, 1])
    # mergekit's genotype: (layer group, model, filter set [self_attn, mlp, rest], weight/density)
    modules, models = ["attention", "mlp", "default"], ["math", "lang"]
    genotype = np.zeros((3, 2, 3, 2))
    for i, name in enumerate(space.names()):
        where, module, source, param = name.split(".")
        g = int(where.split("_")[-1].split("-")[0]) // 2
        genotype[g, models.index(source), modules.index(module), ["weight", "density"].index(param)] = x[i]
    theirs = genome.genotype_merge_config(genotype).model_copy(update={"dtype": "float32"})
    run_merge(theirs, str(tmp_path / "mergekit"), MergeOptions(quiet=True))
    sources = {k: str(ZOO / "models" / k) for k in ("base", "math", "lang")}
    ours = Materializer(sources, base="base").materialize(space.decode(x))
    ref = load_checkpoint(tmp_path / "mergekit")
    # the one known difference: tensors after the last layer (final norm, lm_head) take mergekit's last layer
    # group's values, layer_weights' first group's (as the embeddings do in both)
    post = {"model.norm.weight", "lm_head.weight"}
    worst, where = worst_relative_error({k: v for k, v in ours.items() if k not in post},
                                        {k: v for k, v in ref.items() if k not in post})
    assert worst < 1e-5, where


def test_unsupported_genome_options_are_one_line_errors(tmp_path):
    from evomerge.mergekit_evolve import to_evomerge

    base = yaml.safe_load(DOCUMENTED.format(models=ZOO / "models"))
    for change, match in (({"merge_method": "slerp"}, "merge_method 'slerp'"), ({"smooth": True}, "genome.smooth"),
                          ({"filters": ["q_proj"]}, "'q_proj'"), ({"models": ["org/not-here"]}, "'org/not-here'")):
        bad = {**base, "genome": {**base["genome"], **change}}
        with pytest.raises(UserError, match=match) as e:
            to_evomerge(bad, tmp_path)
        assert "\n" not in str(e.value)
    for source, name in (("union", "union"), (str(ZOO / "models" / "lang"), "lang")):  # as mergekit's tokenizer_source
        config, _ = to_evomerge({**base, "genome": {**base["genome"], "tokenizer_source": source}}, tmp_path)
        assert config["tokenizer_source"] == name
    linear = {**base, "genome": {**base["genome"], "merge_method": "linear", "base_model": None}}
    config, _ = to_evomerge(linear, tmp_path)
    assert config["space"]["options"]["sources"] == ["math", "lang"] and config["space"]["options"]["base"] is None
