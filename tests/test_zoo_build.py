"""`evomerge zoo build`: held-out problems stay out of training, the build is deterministic, and a
tiny-budget build through the real CLI writes loadable checkpoints and the task files."""
from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from evomerge.zoo import MODELS, TASKS, load_task, tasks
from evomerge.zoo.build import tokenizer
from evomerge.zoo.train import Encoder, new_model, train


def test_held_out_problems_never_in_training():
    held_out = {p + r for split in tasks.eval_splits().values() for p, r in split}
    for name, mix in tasks.MIXES.items():
        draw = tasks.sampler(mix(), seed=0)
        seen = {p + r for p, r in (draw() for _ in range(20000))}
        assert not seen & held_out, name
    # Not vacuous: the MATH mix does pose thousands of distinct sums with the held-out template.
    draw = tasks.sampler(tasks.math_mix(), seed=0)
    math_seen = {p for p, _ in (draw() for _ in range(20000))}
    assert len(math_seen) > 4000


def test_dev_and_test_splits_are_disjoint_and_sized():
    splits = tasks.eval_splits()
    for task in ("math_j", "math_e", "lang_j"):
        dev, test = splits[f"{task}_dev"], splits[f"{task}_test"]
        assert (len(dev), len(test)) == (200, 400)
        assert not {p for p, _ in dev} & {p for p, _ in test}
    # The target is posed and answered in J: no E letter anywhere, the J marker ends every answer.
    assert all(not any("a" <= c <= "z" for c in p + r) and r.endswith(" ОЦ") for p, r in splits["math_j_test"])


def test_training_is_deterministic():
    enc = Encoder(tokenizer())
    states = []
    for _ in range(2):
        model = new_model(5)
        train(model, tasks.sampler(tasks.base_mix(), 5), enc, steps=3, lr=1e-3, warmup=1, seed=5, batch=4)
        states.append(model.state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_only_the_reference_is_learnt_when_there_is_one():
    enc = Encoder(tokenizer())
    prompt, ref = tasks.in_lang(tasks.MATH["plus"](12, 34), "J")
    ids, labels = enc.example((prompt, ref)), enc.labels((prompt, ref))
    assert len(labels) == len(ids)
    learnt = [i for i, label in enumerate(labels) if label != -100]
    assert learnt == list(range(1 + len(prompt), len(ids)))  # the reference's chars, then EOS
    assert [ids[i] for i in learnt] == [*enc.ids(ref), enc.eos]
    text = tasks.generic("E")(random.Random(0))
    assert enc.labels(text) == enc.example(text)  # plain text is learnt whole


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "evomerge.cli", "zoo", "build", *args],
                          capture_output=True, text=True, env=env, timeout=600)


def test_tiny_build_writes_loadable_zoo(tmp_path):
    out = tmp_path / "zoo"
    done = _cli(str(out), "--scale", "0.004", "--math-tries", "1")
    assert done.returncode == 0, done.stderr
    assert "zoo built in" in done.stdout
    report = json.loads((out / "build.json").read_text())
    assert report["arch"]["hidden_size"] // report["arch"]["num_attention_heads"] >= 32
    assert report["stages"]["base"]["steps"] == 10
    for name in MODELS:
        tok = AutoTokenizer.from_pretrained(out / "models" / name)
        model = AutoModelForCausalLM.from_pretrained(out / "models" / name)
        ids = tok("АИФБ ПХ 12 ЗНТХ 34? ФЩХАЖЧ ", return_tensors="pt").input_ids
        assert ids[0, 0].item() == tok.bos_token_id  # the models were trained with BOS first
        assert model(ids).logits.shape == (1, ids.shape[1], model.config.vocab_size)
    for task in TASKS:
        rows = load_task(task, out)
        assert len(rows) == (200 if task.endswith("dev") else 400)
        assert set(rows[0]) == {"prompt", "reference"}
    assert not list(out.glob(".zoo-build-*"))  # the scratch dir was moved in and removed
    assert report["zoo_seed"] == 0 and report["stages"]["base"]["seed"] == 1
    # what the weights depend on beside the seeds, and the bytes themselves, so another machine's build can be told
    for name in MODELS:
        weights = (out / "models" / name / "model.safetensors").read_bytes()
        assert report["weights_sha256"][name] == hashlib.sha256(weights).hexdigest()
    assert report["built_on"]["cpu_model"] and report["built_on"]["torch"] == torch.__version__


def test_another_zoo_seed_trains_other_models_on_the_same_held_out_splits(tmp_path):
    done = _cli(str(tmp_path / "zoo1"), "--scale", "0.004", "--math-tries", "1", "--seed", "1")
    assert done.returncode == 0, done.stderr
    report = json.loads((tmp_path / "zoo1" / "build.json").read_text())
    assert report["zoo_seed"] == 1
    assert [report["stages"][s]["seed"] for s in ("base", "math", "lang")] == [1001, 1002, 1003]
    for task in TASKS:  # the held-out problems do not move with the training seed
        assert load_task(task, tmp_path / "zoo1") == load_task(task)


@pytest.mark.parametrize("option, value", [("--scale", "0"), ("--seed", "-1")])
def test_bad_scale_or_seed_is_a_one_line_error(tmp_path, option, value):
    done = _cli(str(tmp_path / "zoo"), option, value)
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and option in done.stderr
    assert not (tmp_path / "zoo").exists()


def test_bad_base_is_a_one_line_error(tmp_path):
    done = _cli(str(tmp_path / "zoo"), "--base", str(tmp_path / "nowhere"))
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "--base" in done.stderr
