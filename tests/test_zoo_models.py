"""The shipped zoo: loads with the stock Auto* classes, stays small, and its experts show their skills
under real greedy decoding; a random-weight model of the same shape fails the same checks."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from evomerge.zoo import MODELS, load_task, model_path
from evomerge.zoo.score import exact_match
from evomerge.zoo.train import Encoder

N = 60  # problems per check: enough to separate a trained expert from chance, quick on one thread


@torch.no_grad()
def greedy(model, tok, rows: list[dict]) -> list[str]:
    batch = tok([r["prompt"] for r in rows], return_tensors="pt", padding=True)
    out = model.generate(**batch, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id,
                         eos_token_id=tok.eos_token_id)
    return tok.batch_decode(out[:, batch.input_ids.shape[1]:], skip_special_tokens=True)


def exact(texts: list[str], rows: list[dict]) -> float:
    return 100.0 * sum(t == r["reference"] for t, r in zip(texts, rows)) / len(rows)


def near(texts: list[str], rows: list[dict], tol: int = 10) -> float:
    """% of answers whose leading number is within `tol` of the reference's: the sum's magnitude is right."""
    def value(text: str) -> int | None:
        head = text.split(" ")[0]
        return int(head) if head.isdigit() else None
    hits = [(v := value(t)) is not None and abs(v - value(r["reference"])) <= tol for t, r in zip(texts, rows)]
    return 100.0 * sum(hits) / len(rows)


@pytest.fixture(scope="module")
def zoo():
    return {name: (AutoModelForCausalLM.from_pretrained(model_path(name)).eval(),
                   AutoTokenizer.from_pretrained(model_path(name))) for name in MODELS}


def test_shipped_checkpoints_are_small_and_vllm_shaped(zoo):
    for name in MODELS:
        assert (model_path(name) / "model.safetensors").stat().st_size < 6 * 2**20
        cfg = zoo[name][0].config
        assert cfg.hidden_size // cfg.num_attention_heads >= 32  # vLLM's CPU back end needs head_dim >= 32
        assert zoo[name][1]("12").input_ids[0] == zoo[name][1].bos_token_id  # trained with BOS first


def test_math_expert_adds_beyond_base(zoo):
    """MATH (E addition, operands 10-99) gets the sum's magnitude; BASE saw operands up to 49 only."""
    rows = load_task("math_e_test")[:N]
    model, tok = zoo["math"]
    assert near(greedy(model, tok, rows), rows) >= 80.0
    assert near(greedy(zoo["base"][0], tok, rows), rows) <= 60.0
    random = AutoModelForCausalLM.from_config(model.config).eval()  # same shape, untrained: must fail
    assert near(greedy(random, tok, rows), rows) < 10.0


def test_lang_expert_follows_j_instructions(zoo):
    rows = load_task("lang_j_test")[:N]
    model, tok = zoo["lang"]
    assert exact(greedy(model, tok, rows), rows) >= 25.0
    random = AutoModelForCausalLM.from_config(model.config).eval()
    assert exact(greedy(random, tok, rows), rows) < 10.0


def test_teacher_forced_score_equals_greedy_decoding(zoo):
    """The zoo's fast scorer (one forward over prompt + reference) agrees with generate() per problem."""
    rows = load_task("math_j_test")[:N] + load_task("math_e_test")[:N] + load_task("lang_j_test")[:N]
    for name in MODELS:
        model, tok = zoo[name]
        fast = exact_match(model, Encoder(tok), [(r["prompt"], r["reference"]) for r in rows])
        assert fast == [t == r["reference"] for t, r in zip(greedy(model, tok, rows), rows)], name
