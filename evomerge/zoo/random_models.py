"""Random tiny Llama checkpoints and 'experts' (base plus a random delta), for tests and benchmarks."""
from __future__ import annotations

from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from evomerge.zoo.tokenizer import save_char_tokenizer


def llama_config(
    *, hidden: int = 64, layers: int = 4, heads: int = 2, kv_heads: int | None = None, intermediate: int = 128,
    vocab: int = 128, positions: int = 256, tie: bool = False,
) -> LlamaConfig:
    return LlamaConfig(
        hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv_heads or heads, intermediate_size=intermediate, vocab_size=vocab,
        max_position_embeddings=positions, tie_word_embeddings=tie, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )


def random_llama(out: str | Path, *, seed: int = 0, dtype: torch.dtype = torch.float32, **config) -> Path:
    """Write a randomly initialised Llama checkpoint (safetensors, config, char tokenizer) to `out`."""
    out = Path(out)
    torch.manual_seed(seed)
    cfg = llama_config(**config)
    model = LlamaForCausalLM(cfg).to(dtype)
    model.save_pretrained(out, safe_serialization=True)
    tok = save_char_tokenizer(out)
    assert len(tok) <= cfg.vocab_size, "vocab too small for the char tokenizer"
    return out


def random_expert(base: str | Path, out: str | Path, *, seed: int, scale: float = 0.02) -> Path:
    """Write `base` plus a Gaussian delta of relative size `scale` per tensor: a stand-in fine-tune."""
    out = Path(out)
    model = LlamaForCausalLM.from_pretrained(base)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.dtype) * scale * p.float().std().clamp_min(1e-3).to(p.dtype))
    model.save_pretrained(out, safe_serialization=True)
    save_char_tokenizer(out)
    return out
