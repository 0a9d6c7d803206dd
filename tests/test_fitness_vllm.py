"""The vLLM handle against HF transformers, on the real vLLM (its CPU build in .venv-vllm).

One engine serves every test of the session (starting one takes 20 s to a minute on a busy CPU). The
weights each test pushes are built by the real materializer and compared with a plain transformers
model holding the same merged state dict. Run: `.venv-vllm/bin/python -m pytest tests/test_fitness_vllm.py`
(scripts/setup-vllm builds that environment); elsewhere these tests are skipped.
"""
from __future__ import annotations

import importlib.util

import pytest
import torch

from evomerge.recipe import ModelRef, Recipe
from evomerge.records import UserError
from fitness.handle import Sampling, encode_prompt

needs_vllm = pytest.mark.skipif(
    importlib.util.find_spec("vllm") is None,
    reason="vllm is not installed in this environment; build .venv-vllm with scripts/setup-vllm and run there",
)

# Longer than two KV blocks (32 tokens each, one token per character): a prefix cache that survived a
# weight push would serve the previous candidate's KV for these prompts and break the HF comparison.
PROMPTS = [
    "The quick brown fox jumps over the lazy dog while the cat sleeps in the warm afternoon sun.",
    "In 1969 the first humans walked on the Moon; decades later robots explore the surface of Mars.",
    "def add(a, b): return a + b  # a tiny function that adds two numbers and returns the result",
]
NEW_TOKENS = 12

CANDIDATES = [
    Recipe(merge_method="task_arithmetic", base_model="base",
           models=[ModelRef("a", {"weight": 1.0}), ModelRef("b", {"weight": 0.4})]),
    Recipe(merge_method="ties", base_model="base",
           models=[ModelRef("a", {"weight": 0.3, "density": 0.5}), ModelRef("b", {"weight": 1.0, "density": 0.7})]),
]


@pytest.fixture(scope="session")
def vllm_models(tmp_path_factory):
    """A tiny Llama the CPU attention accepts (head_dim 32) and two experts far enough from it that
    different merges decode differently."""
    from evomerge.zoo.random_models import random_expert, random_llama
    from evomerge.zoo.tokenizer import char_tokenizer

    root = tmp_path_factory.mktemp("vllm_tiny")
    base = random_llama(root / "base", seed=0, hidden=128, heads=4, layers=2, intermediate=256,
                        vocab=len(char_tokenizer()), positions=256)
    return {"base": base, "a": random_expert(base, root / "a", seed=1, scale=0.5),
            "b": random_expert(base, root / "b", seed=2, scale=0.5)}


@pytest.fixture(scope="session")
def materializer(vllm_models):
    from evomerge.merge import Materializer

    return Materializer(vllm_models, base="base")


@pytest.fixture(scope="session")
def engine(vllm_models, materializer):
    from fitness.vllm_handle import VLLMHandle

    handle = VLLMHandle(vllm_models["base"], materializer, dtype="float32", max_model_len=256, block_size=32)
    yield handle
    handle.close()


@pytest.fixture(scope="session")
def hf(vllm_models):
    """A plain transformers model; `hf(weights)` loads a state dict into it and returns it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(vllm_models["base"], dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(vllm_models["base"])

    def load(weights):
        model.load_state_dict(weights, strict=True)
        return model

    load.tokenizer = tok
    return load


def hf_greedy(model, tok, prompts, n):
    out = []
    for p in prompts:
        ids = torch.tensor([encode_prompt(tok, p)])
        with torch.no_grad():
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                                 pad_token_id=tok.pad_token_id)
        out.append(gen[0, ids.shape[1]:].tolist())
    return out


@needs_vllm
@pytest.mark.vllm
def test_weight_push_matches_hf_greedy_without_restart(engine, materializer, hf, vllm_models):
    (pid, pushes), = engine.identity()
    llm = engine.llm
    from safetensors.torch import load_file

    base_weights = load_file(str(vllm_models["base"] / "model.safetensors"))
    before = engine.generate_ids(PROMPTS, max_new_tokens=NEW_TOKENS)  # also fills the prefix cache
    assert before == hf_greedy(hf(base_weights), hf.tokenizer, PROMPTS, NEW_TOKENS)

    outputs = []
    for recipe in CANDIDATES:
        engine.set_recipe(recipe)
        got = engine.generate_ids(PROMPTS, max_new_tokens=NEW_TOKENS)
        want = hf_greedy(hf(materializer.materialize(recipe)), hf.tokenizer, PROMPTS, NEW_TOKENS)
        assert got == want, f"vLLM and HF disagree after pushing {recipe.merge_method}"
        outputs.append(got)
    # The pushes changed what the engine says, each time...
    assert before != outputs[0] != outputs[1]
    # ...inside the same engine: same LLM object, same worker process, two more pushes.
    assert engine.llm is llm
    assert engine.identity() == [(pid, pushes + len(CANDIDATES))]
    assert engine.recipe is CANDIDATES[-1] and engine.timings["swap"] > 0


@needs_vllm
@pytest.mark.vllm
def test_score_matches_hf_log_probabilities(engine, materializer, hf):
    recipe = CANDIDATES[0]
    engine.set_recipe(recipe)
    model, tok = hf(materializer.materialize(recipe)), hf.tokenizer
    pairs = [(PROMPTS[0][:40], PROMPTS[0][40:80]), ("Answer: ", "42")]
    engine.generate(PROMPTS[:1], Sampling(max_new_tokens=1))  # cached KV for the first pair's first blocks
    got = engine.score(pairs, eos=True)
    for (prompt, cont), scores in zip(pairs, got):
        p = encode_prompt(tok, prompt)
        c = tok(cont, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([p + c])).logits[0].float(), -1)
        rows = logp[len(p) - 1 : len(p) + len(c) - 1]
        want = rows[torch.arange(len(c)), torch.tensor(c)]
        assert len(scores.logprobs) == len(c)
        assert torch.allclose(torch.tensor(scores.logprobs), want, atol=1e-3)
        assert scores.greedy == (rows.argmax(-1) == torch.tensor(c)).tolist()


@needs_vllm
@pytest.mark.vllm
def test_generate_follows_the_task_sampling_settings(engine):
    engine.set_recipe(CANDIDATES[1])
    greedy = engine.generate(PROMPTS, Sampling(max_new_tokens=NEW_TOKENS))
    assert greedy == [engine.tokenizer.decode(ids, skip_special_tokens=True)
                      for ids in engine.generate_ids(PROMPTS, max_new_tokens=NEW_TOKENS)]
    # A stop string ends the completion where it first appears, and is not part of it.
    text = max(greedy, key=len)
    stop = text[len(text) // 2]
    cut = Sampling(max_new_tokens=NEW_TOKENS, stop=[stop])
    assert engine.generate([PROMPTS[greedy.index(text)]], cut) == [text[: text.index(stop)]]
    # Sampling: a seed reproduces, another seed (on a random model's flat distribution) does not.
    sample = dict(max_new_tokens=NEW_TOKENS, temperature=1.0, top_p=1.0)
    first = engine.generate(PROMPTS, Sampling(seed=7, **sample))
    assert engine.generate(PROMPTS, Sampling(seed=7, **sample)) == first
    assert engine.generate(PROMPTS, Sampling(seed=8, **sample)) != first


@needs_vllm
@pytest.mark.vllm
def test_a_state_dict_that_does_not_fit_is_refused_before_any_push(engine, materializer):
    weights = materializer.materialize(CANDIDATES[0])
    before = engine.identity()
    name = next(iter(weights))
    with pytest.raises(UserError, match="lacks 1 tensors"):
        engine.load_state_dict({k: v for k, v in weights.items() if k != name})
    with pytest.raises(UserError, match="does not fit"):
        engine.load_state_dict({**weights, name: weights[name][:1]})
    assert engine.identity() == before


def test_vllm_handle_imports_without_vllm_and_refuses_a_non_model(tmp_path):
    """The module (and so the worker extension vLLM resolves by name) imports anywhere; a directory
    without a config is a one-line UserError before any engine starts."""
    from fitness.vllm_handle import WORKER_EXTENSION, VLLMHandle, WeightPushExtension

    assert WORKER_EXTENSION == f"{WeightPushExtension.__module__}.{WeightPushExtension.__qualname__}"
    with pytest.raises(UserError, match="no config.json"):
        VLLMHandle(tmp_path)
