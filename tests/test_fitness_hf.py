"""The HF handle on real tiny Llamas, each result checked against an independent path: plain
`model.generate` / a plain forward, one example at a time, on a separately loaded model."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from evomerge.merge import Materializer
from evomerge.recipe import ModelRef, Recipe
from evomerge.records import UserError
from evomerge.fitness.handle import ModelHandle, Sampling
from evomerge.fitness.hf import HFHandle
from evomerge.fitness.suite import TaskFitness

PROMPTS = ["what is 12 plus 30? answer ", "hi", "copy 11 22? answer ", "abc d", "before 50?", "x"]
RECIPE = Recipe(merge_method="task_arithmetic", base_model="base",
                models=[ModelRef("a", {"weight": 3.0}), ModelRef("b", {"weight": 3.0})])


@pytest.fixture(scope="module")
def handle(tiny_models):
    return HFHandle(tiny_models["base"], Materializer(dict(tiny_models)), batch_size=4)


@pytest.fixture(scope="module")
def reference_model(tiny_models):
    return AutoModelForCausalLM.from_pretrained(tiny_models["base"]).eval()


def plain_greedy_ids(model, tok, prompt: str, n: int) -> list[int]:
    ids = tok(prompt, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    return out[0, ids.shape[1]:].tolist()


@torch.no_grad()
def plain_scores(model, tok, prompt: str, cont: str) -> tuple[list[float], list[bool]]:
    ctx = tok(prompt).input_ids
    ids = ctx + tok(cont, add_special_tokens=False).input_ids
    logits = model(torch.tensor([ids])).logits[0, len(ctx) - 1:-1]
    target = torch.tensor(ids[len(ctx):], dtype=torch.long)
    lp = torch.log_softmax(logits, -1)[torch.arange(len(target)), target]
    return lp.tolist(), (logits.argmax(-1) == target).tolist()


def base_weights(handle, tiny_models):
    handle.load_state_dict(AutoModelForCausalLM.from_pretrained(tiny_models["base"]).state_dict())


def test_is_a_model_handle(handle):
    assert isinstance(handle, ModelHandle)


def test_batched_left_padded_generation_equals_one_at_a_time(handle, reference_model, tiny_models):
    base_weights(handle, tiny_models)
    tok = handle.tokenizer
    got = handle.generate(PROMPTS, Sampling(max_new_tokens=7))
    want = [tok.decode(plain_greedy_ids(reference_model, tok, p, 7), skip_special_tokens=True) for p in PROMPTS]
    assert got == want and len(set(got)) > 1
    cut = handle.generate(PROMPTS, Sampling(max_new_tokens=7, stop=[want[0][2]]))
    assert cut[0] == want[0][: want[0].index(want[0][2])]


def test_teacher_forced_scores_equal_a_plain_forward(handle, reference_model, tiny_models):
    base_weights(handle, tiny_models)
    tok = handle.tokenizer
    pairs = [(p, c) for p, c in zip(PROMPTS, ["42", "hello there", "11 22", "", "49", "zz"])]
    scores = handle.score(pairs)
    for (p, c), s in zip(pairs, scores):
        lp, greedy = plain_scores(reference_model, tok, p, c)
        assert s.logprobs == pytest.approx(lp, abs=1e-4) and s.greedy == greedy
    # the model's own greedy continuation is, token by token, the argmax; with EOS appended the EOS is scored too
    more = PROMPTS + ["hello", "zz top", "12 34", "q", "the cat", "9"]
    own = [plain_greedy_ids(reference_model, tok, p, 4) for p in more]
    # (random weights also emit special tokens and ids past the tokenizer's vocabulary: text cannot say those)
    plain = [(p, tok.decode(ids)) for p, ids in zip(more, own)
             if not set(ids) & set(tok.all_special_ids) and max(ids) < len(tok)]
    assert len(plain) >= 3
    assert all(s.exact for s in handle.score(plain))
    assert [len(s.logprobs) for s in handle.score(plain, eos=True)] == [len(c) + 1 for _, c in plain]


def test_set_recipe_writes_in_place_and_equals_the_merged_model(handle, tiny_models):
    params_before = {n: p.data_ptr() for n, p in handle.model.named_parameters()}
    module = handle.model
    handle.set_recipe(RECIPE)
    assert handle.model is module and params_before == {n: p.data_ptr() for n, p in handle.model.named_parameters()}
    fresh = LlamaForCausalLM(handle.model.config).eval()
    fresh.load_state_dict(Materializer(dict(tiny_models)).materialize(RECIPE))
    tok = handle.tokenizer
    got = handle.generate(PROMPTS, Sampling(max_new_tokens=6))
    assert got == [tok.decode(plain_greedy_ids(fresh, tok, p, 6), skip_special_tokens=True) for p in PROMPTS]
    merged = handle.score([(PROMPTS[0], "42")])[0].logprobs
    assert merged == pytest.approx(plain_scores(fresh, tok, PROMPTS[0], "42")[0], abs=1e-4)
    base_weights(handle, tiny_models)
    base = handle.score([(PROMPTS[0], "42")])[0].logprobs
    assert max(abs(x - y) for x, y in zip(base, merged)) > 1e-3  # the recipe mattered


def test_task_fitness_objectives_and_per_example(handle, reference_model, tiny_models, tmp_path):
    base_weights(handle, tiny_models)
    tok = handle.tokenizer
    rows, want_em, want_tf, lengths = [], [], [], []
    for i, p in enumerate(PROMPTS):
        ids = plain_greedy_ids(reference_model, tok, p, 5)
        out = tok.decode(ids, skip_special_tokens=True)
        ref = out if i % 2 == 0 else out + "!"
        rows.append({"prompt": p, "reference": ref})
        want_em.append(float(out.strip() == ref.strip()))
        lengths.append(len(out))
        ref_ids = tok(ref, add_special_tokens=False).input_ids
        full = plain_greedy_ids(reference_model, tok, p, len(ref_ids) + 1)
        want_tf.append(float(full == ref_ids + [tok.eos_token_id]))
    f = tmp_path / "t.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    fit = TaskFitness.from_config([{"name": "t", "path": str(f), "max_new_tokens": 5,
                                    "metrics": ["exact_match", "length", "teacher_exact", "token_accuracy", "loss"]}])
    assert [(o.name, o.direction) for o in fit.objectives] == [
        ("acc/t", "max"), ("len/t", "min"), ("acc_tf/t", "max"), ("tok_acc/t", "max"), ("loss/t", "min")]
    res = fit.evaluate(handle)
    assert res.per_example == want_em and res.objectives["acc/t"] == pytest.approx(sum(want_em) / len(want_em))
    assert 0 < res.objectives["acc/t"] < 1
    assert res.objectives["len/t"] == pytest.approx(sum(lengths) / len(lengths))
    assert res.objectives["acc_tf/t"] == pytest.approx(sum(want_tf) / len(want_tf))
    losses = [-sum(plain_scores(reference_model, tok, r["prompt"], r["reference"])[0]) / len(r["reference"]) for r in rows]
    assert res.objectives["loss/t"] == pytest.approx(sum(losses) / len(losses), abs=1e-4)
    assert 0 < res.objectives["tok_acc/t"] <= 1


def test_multiple_choice_by_loglikelihood(handle, reference_model, tiny_models, tmp_path):
    base_weights(handle, tiny_models)
    tok = handle.tokenizer
    choices = ["12", "ab", "zz"]
    rows, want = [], []
    for i, p in enumerate(PROMPTS):
        lls = [sum(plain_scores(reference_model, tok, p, c)[0]) for c in choices]
        ref = choices[i % 3]
        rows.append({"prompt": p, "reference": ref, "choices": choices})
        want.append(float(lls.index(max(lls)) == i % 3))
    f = tmp_path / "mc.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    res = TaskFitness.from_config([{"name": "mc", "path": str(f), "metrics": ["choice"]}]).evaluate(handle)
    assert res.per_example == want


def test_chat_template(handle, tiny_models, tmp_path):
    base_weights(handle, tiny_models)
    f = tmp_path / "c.jsonl"
    f.write_text(json.dumps({"prompt": "hi", "reference": "x"}) + "\n")
    fit = TaskFitness.from_config([{"name": "c", "path": str(f), "template": "chat", "system": "S"}])
    with pytest.raises(UserError, match="has no chat template; use template: plain") as e:
        fit.evaluate(handle)
    assert "\n" not in str(e.value)
    handle.tokenizer.chat_template = "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}[assistant]"
    try:
        five = Sampling(max_new_tokens=5)
        chat = handle.generate([[{"role": "system", "content": "S"}, {"role": "user", "content": "hi"}]], five)
        assert chat == handle.generate(["[system]S[user]hi[assistant]"], five)
        assert fit.evaluate(handle).objectives["acc/c"] in (0.0, 1.0)
    finally:
        handle.tokenizer.chat_template = None


def test_bad_state_dict_is_a_one_line_error(handle):
    sd = dict(handle.state_dict())
    sd["model.norm.weight"] = torch.ones(3)
    with pytest.raises(UserError, match="does not fit"):
        handle.load_state_dict(sd)


def test_any_subset_of_the_examples_scores_as_in_the_full_evaluation(handle, tiny_models, tmp_path):
    """Racing and anchors score subsets across tasks: the same values as the full evaluation, per example."""
    import numpy as np

    from dataclasses import replace

    from evomerge.fitness.partial import AnchorsPlan, RacePlan, plan_from_json, score_plan, to_json

    base_weights(handle, tiny_models)
    tok = handle.tokenizer
    files = []
    for name, prompts in (("one", PROMPTS), ("two", PROMPTS[::-1] + ["q"])):
        f = tmp_path / f"{name}.jsonl"
        f.write_text("".join(json.dumps({"prompt": p, "reference": tok.decode(tok(p).input_ids[1:3])}) + "\n"
                             for p in prompts))
        files.append({"name": name, "path": str(f), "metrics": ["token_accuracy", "loss"]})
    fit = TaskFitness.from_config(files)
    full = fit.evaluate(handle)
    n = fit.example_count()
    assert n == 13 and len(full.per_example) == n
    idx = [12, 0, 7, 3, 9]
    part = fit.score_examples(handle, idx)
    assert part.primary.tolist() == pytest.approx([full.per_example[i] for i in idx], abs=1e-6)
    assert np.isnan(part.values["tok_acc/one"][[0, 2, 4]]).all() and not np.isnan(part.values["tok_acc/one"][[1, 3]]).any()
    # a race it cannot win stops after its first chunk, told the mean of what it scored
    race = score_plan(fit, handle, RacePlan(total=n, seed=0, chunk=4, threshold=2.0, delta=0.05, range=(0, 1)))
    assert race.cost["examples"] == 4 and sum(not np.isnan(v) for v in race.per_example) == 4
    assert race.per_example == pytest.approx([full.per_example[i] if not np.isnan(v) else v
                                              for i, v in enumerate(race.per_example)], abs=1e-6, nan_ok=True)
    # anchors: their weighted mean; promoted (estimate >= promote): everything, as the full evaluation
    plan = AnchorsPlan(total=n, version=0, examples=[1, 8], weights=[6.0, 7.0], promote=None)
    assert plan_from_json(to_json(plan)) == plan  # as journalled in the candidate's meta and read back by the worker
    est = score_plan(fit, handle, plan)
    want = (6 * full.per_example[1] + 7 * full.per_example[8]) / 13
    assert est.cost["examples"] == 2
    assert np.nansum(np.array([6, 7]) * np.array(est.per_example)[[1, 8]]) / 13 == pytest.approx(want, abs=1e-6)
    promoted = score_plan(fit, handle, replace(plan, promote=-1.0))
    assert promoted.cost["examples"] == n
    assert promoted.objectives == pytest.approx(full.objectives, abs=1e-6)
