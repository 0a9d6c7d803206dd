"""LoRA adapters as experts: a PEFT adapter directory reads as the full model PEFT itself makes of the base
(`merge_and_unload`), merges like a full fine-tune, and bad adapters fail with one line."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from evomerge.merge import Materializer
from evomerge.merge.sources import lora_delta, open_sources
from evomerge.recipe import ModelRef, Recipe
from evomerge.records import UserError

peft = pytest.importorskip("peft")


def peft_adapter(base_dir, out, **lora):
    """Save a real PEFT LoRA adapter of `base_dir` with random factors (B starts at zero in PEFT) and
    return the merged state dict PEFT computes for it."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base_dir))
    pm = peft.get_peft_model(model, peft.LoraConfig(**lora))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n or "modules_to_save" in n:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    pm.save_pretrained(str(out))
    return {k: v.clone() for k, v in pm.merge_and_unload().state_dict().items()}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    from evomerge.zoo.random_models import random_llama

    return random_llama(tmp_path_factory.mktemp("lora") / "base", seed=0)


@pytest.mark.parametrize("lora", [
    dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], alpha_pattern={"v_proj": 16}),
    dict(r=2, lora_alpha=4, target_modules=["embed_tokens", "down_proj"], use_rslora=True, modules_to_save=["lm_head"]),
])
def test_adapter_reads_as_peft_merged_model(base, tmp_path, lora):
    want = peft_adapter(base, tmp_path / "lora", **lora)
    got = open_sources({"base": base, "lora": tmp_path / "lora"})["lora"]
    assert sorted(got.names()) == sorted(want)
    changed = 0
    for name, w in want.items():
        torch.testing.assert_close(got.get(name), w, rtol=0, atol=1e-6, msg=name)
        changed += not torch.equal(w, open_sources({"base": base})["base"].get(name))
    assert changed >= 2  # the adapter changed the model, so the comparison means something


def test_fan_in_fan_out_adapter_of_gpt2(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=64, n_positions=32)).save_pretrained(tmp_path / "base")
    want = peft_adapter(tmp_path / "base", tmp_path / "lora", r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True)
    got = open_sources({"base": tmp_path / "base", "lora": tmp_path / "lora"})["lora"]
    name = "transformer.h.1.attn.c_attn.weight"
    torch.testing.assert_close(got.get(name), want[name], rtol=0, atol=1e-6)


def test_delta_is_scaled_b_times_a_on_base_names(base, tmp_path):
    """A hand-built adapter (the file layout alone, no PEFT): the expert minus the base is (alpha/r) B @ A."""
    from safetensors.torch import save_file

    a, b = torch.randn(3, 64), torch.randn(64, 3)
    (tmp_path / "hand").mkdir()
    save_file({"base_model.model.model.layers.1.self_attn.o_proj.lora_A.weight": a,
               "base_model.model.model.layers.1.self_attn.o_proj.lora_B.weight": b}, tmp_path / "hand" / "adapter_model.safetensors")
    (tmp_path / "hand" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 3, "lora_alpha": 6}))
    src = open_sources({"base": base, "hand": tmp_path / "hand"})
    name = "model.layers.1.self_attn.o_proj.weight"
    torch.testing.assert_close(src["hand"].get(name) - src["base"].get(name), 2.0 * b @ a, rtol=1e-5, atol=1e-5)
    assert torch.equal(lora_delta(a, b, 2.0), 2.0 * b @ a)
    assert torch.equal(src["hand"].get("model.layers.1.mlp.up_proj.weight"), src["base"].get("model.layers.1.mlp.up_proj.weight"))


def test_merge_with_a_lora_expert_equals_the_same_merge_of_its_peft_merged_model(base, tmp_path):
    """task arithmetic and TIES over the adapter give what they give over PEFT's merged checkpoint;
    `evomerge merge`'s writer accepts the adapter too."""
    from transformers import AutoModelForCausalLM

    from evomerge.merge.writer import write_checkpoint

    merged = peft_adapter(base, tmp_path / "lora", r=4, lora_alpha=8, target_modules=["q_proj", "up_proj"])
    full = tmp_path / "full"
    m = AutoModelForCausalLM.from_pretrained(str(base))
    m.load_state_dict(merged)
    m.save_pretrained(full)
    recipes = [Recipe(merge_method="task_arithmetic", base_model="base", models=[ModelRef("x", {"weight": 0.7})]),
               Recipe(merge_method="ties", base_model="base", models=[ModelRef("x", {"weight": 1.0, "density": 0.5})])]
    via_lora = Materializer({"base": base, "x": tmp_path / "lora"}, base="base")
    via_full = Materializer({"base": base, "x": full}, base="base")
    for r in recipes:
        a, b = via_lora.materialize(r), via_full.materialize(r)
        for n in a:
            torch.testing.assert_close(a[n], b[n], rtol=0, atol=1e-6, msg=n)
    out = write_checkpoint(recipes[0], {"base": str(base), "x": str(tmp_path / "lora")}, tmp_path / "out")
    from safetensors.torch import load_file

    written = load_file(out / "model.safetensors")
    want = via_full.materialize(recipes[0])
    assert (out / "tokenizer.json").is_file()
    for n in want:
        torch.testing.assert_close(written[n], want[n], rtol=0, atol=1e-6, msg=n)


def test_bad_adapters_fail_with_one_line(base, tmp_path):
    peft_adapter(base, tmp_path / "good", r=2, lora_alpha=4, target_modules=["q_proj"])

    def variant(name, config=None, drop=None):
        d = tmp_path / name
        shutil.copytree(tmp_path / "good", d)
        cfg = json.loads((d / "adapter_config.json").read_text())
        (d / "adapter_config.json").write_text(json.dumps({**cfg, **(config or {})}))
        if drop:
            from safetensors.torch import load_file, save_file

            t = load_file(d / "adapter_model.safetensors")
            save_file({k: v for k, v in t.items() if drop not in k}, d / "adapter_model.safetensors")
        return d

    cases = {
        "DoRA adapters are not supported": variant("dora", {"use_dora": True}),
        "is a IA3 adapter": variant("ia3", {"peft_type": "IA3"}),
        "has only one of its two LoRA factors": variant("half", drop="layers.0.self_attn.q_proj.lora_B"),
    }
    for message, d in cases.items():
        with pytest.raises(UserError, match=message) as e:
            Materializer({"base": base, "x": d}, base="base")
        assert "\n" not in str(e.value)
    for named in ("x", None):  # the base, named or by default the first source, must be a full checkpoint
        with pytest.raises(UserError, match="needs a full base checkpoint"):
            open_sources({"x": tmp_path / "good", "base": base}, base=named)
    (tmp_path / "good" / "adapter_model.safetensors").unlink()
    with pytest.raises(UserError, match="no adapter_model.safetensors"):
        open_sources({"base": base, "x": tmp_path / "good"})
