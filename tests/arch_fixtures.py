"""Tiny random checkpoints of every family in the architecture table (transformers `from_config`): a base
and two experts (base plus a random delta), each a checkpoint directory with the char tokenizer."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import transformers as T
from safetensors.torch import load_file, save_file

from evomerge.zoo.tokenizer import save_char_tokenizer

LAYERS = 4
_IDS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
_COMMON = dict(vocab_size=128, hidden_size=32, num_attention_heads=2, num_key_value_heads=1, intermediate_size=48,
               num_hidden_layers=LAYERS, max_position_embeddings=128, **_IDS)


def config(family: str) -> T.PretrainedConfig:
    """A tiny config per family; Qwen2/3 and Gemma get both sliding and full layers, so a reordered stack
    must carry `layer_types` along; Qwen2-MoE has a dense layer (`mlp_only_layers`)."""
    mixed = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]
    return {
        "llama": lambda: T.LlamaConfig(**_COMMON),
        "mistral": lambda: T.MistralConfig(**_COMMON, sliding_window=64),
        "qwen2": lambda: T.Qwen2Config(**_COMMON, use_sliding_window=True, sliding_window=8, max_window_layers=2),
        "qwen3": lambda: T.Qwen3Config(**_COMMON, head_dim=16, use_sliding_window=True, sliding_window=8, layer_types=mixed),
        "gemma2": lambda: T.Gemma2Config(**_COMMON, head_dim=16, sliding_window=8, layer_types=mixed),
        "gemma3_text": lambda: T.Gemma3TextConfig(**_COMMON, head_dim=16, sliding_window=8, layer_types=mixed),
        "gemma3": lambda: T.Gemma3Config(  # multimodal: the decoder's settings live in text_config
            text_config=T.Gemma3TextConfig(**_COMMON, head_dim=16, sliding_window=8, layer_types=mixed).to_dict(),
            vision_config=T.SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                               num_attention_heads=2, image_size=28, patch_size=14).to_dict(),
            mm_tokens_per_image=4, boi_token_index=125, eoi_token_index=126, image_token_index=127, **_IDS),
        "phi3": lambda: T.Phi3Config(**_COMMON),
        "gpt2": lambda: T.GPT2Config(vocab_size=128, n_embd=32, n_layer=LAYERS, n_head=2, n_positions=128, **_IDS),
        "gpt_neox": lambda: T.GPTNeoXConfig(vocab_size=128, hidden_size=32, num_attention_heads=2, intermediate_size=48,
                                            num_hidden_layers=LAYERS, max_position_embeddings=128, **_IDS),
        "mixtral": lambda: T.MixtralConfig(**_COMMON, num_local_experts=3, num_experts_per_tok=2),
        "qwen2_moe": lambda: T.Qwen2MoeConfig(**_COMMON, num_experts=3, num_experts_per_tok=2, moe_intermediate_size=16,
                                              shared_expert_intermediate_size=24, mlp_only_layers=[2]),
    }[family]()


def build_family(family: str, root: Path, *, tie: bool | None = None,
                 cfg: T.PretrainedConfig | None = None) -> dict[str, Path]:
    """base, a, b checkpoints of `family` under root (optionally forcing tie_word_embeddings), from `cfg`
    if given (e.g. `config(family)` resized for another back end)."""
    cfg = cfg or config(family)
    if tie is not None:
        cfg.tie_word_embeddings = tie
    torch.manual_seed(0)
    base = T.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():  # some families start norms at 0 or 1 exactly: give every tensor some spread
        for p in base.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    paths = {"base": root / "base"}
    base.save_pretrained(paths["base"])
    save_char_tokenizer(paths["base"])
    for i, name in enumerate(("a", "b"), start=1):
        gen = torch.Generator().manual_seed(i)
        expert = T.AutoModelForCausalLM.from_pretrained(paths["base"]).eval()
        with torch.no_grad():
            for p in expert.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * 0.05 * p.std().clamp_min(1e-3))
        paths[name] = root / name
        expert.save_pretrained(paths[name])
        save_char_tokenizer(paths[name])
    return paths


def flip_tying(src: Path, dst: Path, family: str) -> Path:
    """A copy of checkpoint `src` at `dst` with the opposite tie_word_embeddings: a tied copy drops its
    head (transformers then reads the embedding as the head); an untied one stores its embedding plus
    noise as the head."""
    from evomerge import arch

    f = arch.family(family)
    shutil.copytree(src, dst)
    sd = load_file(dst / "model.safetensors")
    cfg = json.loads((dst / "config.json").read_text())
    cfg["tie_word_embeddings"] = not cfg["tie_word_embeddings"]
    if cfg["tie_word_embeddings"]:
        del sd[f.head]
    else:
        sd[f.head] = sd[f.pre[0]] + 0.05 * torch.randn_like(sd[f.pre[0]])
    save_file(sd, dst / "model.safetensors", metadata={"format": "pt"})
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst
