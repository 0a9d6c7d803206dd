"""Tokenizers that differ (`tokenizer_source: base | union | <model>`), against mergekit 0.1.5: an expert with
ChatML tokens added (its tokenizer, embedding and untied head extended, its own chat template) and one whose
embedding has padding rows past its vocabulary (and one with its tokens renumbered, some missing), on Llama
(untied and tied) and Qwen2, in `evomerge merge` and in a search."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers as T
import yaml

from evomerge.merge.writer import write_checkpoint
from evomerge.recipe import Recipe
from evomerge.records import UserError
from evomerge.zoo.tokenizer import SPECIAL
from tests.arch_fixtures import build_family
from tests.merge_fixtures import load_checkpoint, mergekit_merge, worst_relative_error

FAMILIES = ["llama", "qwen2", "llama-tied"]  # tied: no head stored, the embedding is the head
CHATML = ["<|im_start|>", "<|im_end|>"]
TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
PADDED = 160


def _with_rows(src: Path, out: Path, rows: int, tokenizer: T.PreTrainedTokenizerBase, seed: int) -> None:
    """`src` with its embedding and head resized to `rows` (new rows random, not zero), saved with `tokenizer`."""
    model = T.AutoModelForCausalLM.from_pretrained(src).eval()
    old = model.get_input_embeddings().weight.shape[0]
    model.resize_token_embeddings(rows, mean_resizing=False)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for w in {id(m.weight): m.weight for m in (model.get_input_embeddings(), model.get_output_embeddings())}.values():
            w[min(old, rows - 2):] = torch.randn(w[min(old, rows - 2):].shape, generator=gen) * 0.05
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _remapped(src: Path, out: Path, seed: int) -> None:
    """`src` with its tokens renumbered (the ordinary ones in reverse), three of them dropped and ChatML added;
    its embedding and head rows moved with their tokens (ChatML's random)."""
    model = T.AutoModelForCausalLM.from_pretrained(src).eval()
    data = json.loads((src / "tokenizer.json").read_text())
    old = data["model"]["vocab"]
    specials = [t for t in old if old[t] < len(SPECIAL)]
    kept = [t for t in sorted(old, key=old.get) if t not in specials][:-3][::-1]
    data["model"]["vocab"] = {t: i for i, t in enumerate([*specials, *kept])}
    out.mkdir(parents=True)
    (out / "tokenizer.json").write_text(json.dumps(data))
    (out / "tokenizer_config.json").write_text((src / "tokenizer_config.json").read_text())
    tok = T.AutoTokenizer.from_pretrained(out)
    tok.add_special_tokens({"additional_special_tokens": CHATML})
    order = torch.tensor([old[t] for t in [*specials, *kept]])
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        stored = {id(m.weight): m.weight for m in (model.get_input_embeddings(), model.get_output_embeddings())}.values()
        rows = [torch.cat([w[order], torch.randn(len(CHATML), w.shape[1], generator=gen) * 0.05]) for w in stored]
        model.resize_token_embeddings(len(tok), mean_resizing=False)
        for w, r in zip({id(m.weight): m.weight for m in (model.get_input_embeddings(), model.get_output_embeddings())}.values(), rows):
            w.copy_(r)
    model.save_pretrained(out)
    tok.save_pretrained(out)


@pytest.fixture(scope="module")
def vocab_models(family_models, tmp_path_factory):
    """Per family: base (char tokenizer, 128 rows: padded already), chat (expert a plus ChatML tokens, rows =
    its vocabulary, its own chat template), padded (expert b, same tokenizer, 160 rows) and remapped (expert b
    with tokens renumbered, three missing, ChatML added): every filler rule of mergekit's is taken (ChatML
    from one model or the mean of two, a token some lack from the base or the mean of the rest)."""
    root = tmp_path_factory.mktemp("vocab")
    built: dict = {}

    def get(family: str) -> dict[str, Path]:
        if family not in built:
            name, tied = family.removesuffix("-tied"), family.endswith("-tied")
            paths = build_family(name, root / family / "models", tie=True) if tied else family_models(family)
            chat_tok = T.AutoTokenizer.from_pretrained(paths["a"])
            chat_tok.add_special_tokens({"additional_special_tokens": CHATML})
            chat_tok.chat_template = TEMPLATE
            out = {"base": paths["base"], **{k: root / family / k for k in ("chat", "padded", "remapped")}}
            _with_rows(paths["a"], out["chat"], len(chat_tok), chat_tok, 1)
            _with_rows(paths["b"], out["padded"], PADDED, T.AutoTokenizer.from_pretrained(paths["b"]), 2)
            _remapped(paths["b"], out["remapped"], 3)
            built[family] = out
        return built[family]

    return get


def _config(method: str, tokenizer_source: str, experts: tuple[str, ...] = ("chat", "padded")) -> dict:
    models = [{"model": m, "parameters": {"weight": 0.6 - 0.1 * i, "density": 0.7}} for i, m in enumerate(experts)]
    if method.startswith("linear"):
        models = [{"model": "base", "parameters": {"weight": 0.3}},
                  *({"model": m["model"], "parameters": {"weight": m["parameters"]["weight"]}} for m in models)]
        # without a base_model (linear-nobase: a token some model lacks takes the mean of the others' rows, not the
        # base's), mergekit takes the "base" tokenizer from a set of the models (any): only a model as source is defined
        base = {} if method == "linear-nobase" else {"base_model": "base"}
        return {"merge_method": "linear", **base, "models": models, "tokenizer_source": tokenizer_source}
    return {"merge_method": method, "base_model": "base", "models": models, "parameters": {"normalize": False},
            "tokenizer_source": tokenizer_source}


def _assert_tokenizers_equal(ours: Path, ref: Path, settings: bool = True) -> None:
    """Same vocabulary; and (`settings`) the same chat template, special tokens and tokenization."""
    a, b = T.AutoTokenizer.from_pretrained(ours), T.AutoTokenizer.from_pretrained(ref)
    assert a.get_vocab() == b.get_vocab()
    if not settings:
        return
    assert a.chat_template == b.chat_template
    assert a.all_special_tokens == b.all_special_tokens
    text = "<|im_start|>user\nab c<|im_end|>\n"
    assert a(text).input_ids == b(text).input_ids


def _vocab_size(path: Path) -> int:
    return T.AutoConfig.from_pretrained(path).get_text_config().vocab_size


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("source,method,experts", [
    ("base", "ties", ("chat", "padded")), ("union", "ties", ("chat", "padded")), ("chat", "ties", ("chat", "padded")),
    ("union", "linear", ("chat", "padded")), ("union", "ties", ("chat", "remapped")), ("remapped", "linear", ("chat", "remapped")),
    ("chat", "linear", ("chat", "remapped")), ("chat", "linear-nobase", ("chat", "remapped")),
])
def test_merge_equals_mergekit(family, source, method, experts, vocab_models, tmp_path):
    paths = vocab_models(family)
    cfg = _config(method, source, experts)
    mk = {**cfg, "tokenizer_source": str(paths[source]) if source in paths else source}
    ref = mergekit_merge(mk, paths, tmp_path / "mk")
    ours = write_checkpoint(Recipe.from_dict(cfg), {k: str(v) for k, v in paths.items()}, tmp_path / "ours",
                            tie_order="mergekit")
    err, where = worst_relative_error(load_checkpoint(ours), ref)
    assert err < 1e-6, f"{err:.2e} at {where}"
    rows = len(T.AutoTokenizer.from_pretrained(tmp_path / "mk").get_vocab())
    assert _vocab_size(ours) == _vocab_size(tmp_path / "mk") == rows
    _assert_tokenizers_equal(ours, tmp_path / "mk")
    assert (T.AutoTokenizer.from_pretrained(ours).chat_template == TEMPLATE) == (source == "chat")
    model = T.AutoModelForCausalLM.from_pretrained(ours)  # loads at its vocabulary and runs
    assert model(torch.tensor([[1, 5, rows - 1]])).logits.shape[-1] == rows


def test_merge_cli_reads_a_mergekit_yaml_with_union(vocab_models, tmp_path):
    """`evomerge merge` on the mergekit YAML: the same weights as mergekit."""
    from evomerge.merge.command import run_merge

    paths = vocab_models("llama")
    cfg = {**_config("ties", "union"), "base_model": str(paths["base"])}
    for m in cfg["models"]:
        m["model"] = str(paths[m["model"]])
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(cfg))
    run_merge(str(tmp_path / "m.yaml"), str(tmp_path / "ours"), tie_order="mergekit")
    ref = mergekit_merge(cfg, {}, tmp_path / "mk")
    assert worst_relative_error(load_checkpoint(tmp_path / "ours"), ref)[0] < 1e-6


def test_tokenizer_source_naming_no_model_is_one_line_and_writes_nothing(vocab_models, tmp_path):
    paths = {k: str(v) for k, v in vocab_models("llama").items()}
    with pytest.raises(UserError, match="tokenizer_source 'nobody' names no model") as e:
        write_checkpoint(Recipe.from_dict(_config("ties", "nobody")), paths, tmp_path / "out")
    assert "\n" not in str(e.value)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(UserError, match="tokenizers differ between 'base' and 'chat'.*tokenizer_source"):
        write_checkpoint(Recipe.from_dict({k: v for k, v in _config("ties", "base").items() if k != "tokenizer_source"}),
                         paths, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("family", FAMILIES)
def test_search_exports_what_mergekit_makes_of_its_config(family, vocab_models, tmp_path):
    """A run with tokenizer_source union scores aligned merges; its exported best equals mergekit 0.1.5's run of
    the exported mergekit config and scores as recorded with the union tokenizer."""
    from evomerge import open_run
    from evomerge.run.assemble import open_engine
    from evomerge.config import load_config
    from evomerge.results.export import export_run
    from evomerge.fitness.hf import HFHandle
    from evomerge.fitness.suite import TaskFitness

    # mergekit takes the "base" tokenizer of a config without base_model (the space's) from a set of the models:
    # any of them. Sources numbering their common tokens alike make its union the same whichever it takes.
    paths = {k: v for k, v in vocab_models(family).items() if k != "remapped"}
    task = {"name": "t", "path": "task.jsonl", "metrics": ["loss"]}
    (tmp_path / "task.jsonl").write_text("".join(json.dumps({"prompt": f"<|im_start|>{i}+{i}=", "reference": str(2 * i)}) + "\n"
                                                 for i in range(3)))
    cfg = {"sources": {k: str(v) for k, v in paths.items()}, "base": "base", "tokenizer_source": "union",
           "space": {"name": "layer_swap"}, "optimizer": {"name": "random"},
           "fitness": {"tasks": [task], "handle": {"batch_size": 4}}, "budget": {"evaluations": 2}, "seed": 1}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    engine = open_engine(load_config(tmp_path / "run.yaml"), tmp_path / "run", resume=False)
    assert engine.run() == "budget: evaluations"
    engine.store.close()
    run = open_run(tmp_path / "run")
    assert list(run.frame().status) == ["ok"] * 2, [e.error for e in run.store.evaluations()]
    best = run.best("loss/t")
    assert run.recipe(int(best["id"])).tokenizer_source == "union"
    (out,) = export_run(tmp_path / "run", tmp_path / "best", fmt="hf", best="loss/t")
    (mk_yaml,) = export_run(tmp_path / "run", tmp_path / "best.yml", fmt="mergekit", best="loss/t")
    ref = mergekit_merge(yaml.safe_load(mk_yaml.read_text()), {}, tmp_path / "mk")
    err, where = worst_relative_error(load_checkpoint(out), ref)
    assert err < 1e-6, f"{err:.2e} at {where}"
    _assert_tokenizers_equal(out, tmp_path / "mk", settings=False)  # mergekit's special tokens: any model's (above)
    rescored = TaskFitness.from_config([task], base_dir=tmp_path).evaluate(HFHandle(out)).objectives["loss/t"]
    assert rescored == pytest.approx(best["loss/t"], rel=1e-6)


@pytest.mark.parametrize("change,needle", [
    ({"tokenizer_source": "nobody"}, "tokenizer_source 'nobody' names no source"),
    ({"tokenizer_source": "union", "fitness": {"tasks": [{"name": "t", "path": "t.jsonl"}], "backend": "vllm"}},
     "tokenizer_source needs fitness.backend hf"),
])
def test_run_config_refuses_what_it_cannot_align(vocab_models, tmp_path, change, needle):
    from evomerge.config import load_config

    cfg = {"sources": {k: str(v) for k, v in vocab_models("llama").items()}, "base": "base",
           "space": {"name": "layer_swap"}, "fitness": {"tasks": [{"name": "t", "path": "t.jsonl"}]},
           "budget": {"evaluations": 1}, **change}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(UserError, match=needle) as e:
        load_config(tmp_path / "run.yaml")
    assert "\n" not in str(e.value)


def test_one_materializer_fills_rows_as_each_recipe_needs(vocab_models, tmp_path):
    """A search's materializer, opened once, merges recipes with and without a base_model (mergekit's filler
    rows differ: the base's row or the mean) as a fresh merge of each does."""
    from evomerge.merge import Materializer

    paths = {k: str(v) for k, v in vocab_models("llama").items()}
    mat = Materializer(paths, base="base", tokenizer_source="chat")
    recipes = [Recipe.from_dict(_config(m, "chat", ("chat", "remapped"))) for m in ("linear-nobase", "ties", "linear-nobase")]
    for i, recipe in enumerate(recipes):
        fresh = load_checkpoint(write_checkpoint(recipe, paths, tmp_path / str(i), tie_order="index"))
        ours = mat.materialize(recipe)
        assert all(torch.equal(ours[k], fresh[k]) for k in fresh), i
    with pytest.raises(UserError, match="tokenizer_source 'union' is not the one the sources were opened with"):
        mat.materialize(Recipe.from_dict(_config("ties", "union")))
