"""Random Llama-shaped checkpoints stored in bf16 at benchmark sizes, base + 3 "experts", and the candidate
recipes the scale benchmarks merge (shared by benchmarks/scale.py and benchmarks/scale_run.py).

Weights are drawn with torch directly per tensor and written as safetensors shards (with an index when there
is more than one), config.json and the zoo's tokenizer, so HF, mergekit and evomerge all load them. An expert
is the base plus N(0, (0.01 * std)^2) per tensor (std of that base tensor; 0.01 for constant tensors such as
norms), so magnitude trims have real work to do. A finished checkpoint has a `.complete` marker and is reused.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import LlamaConfig

ROOT = Path(__file__).resolve().parent.parent
ZOO_BASE = ROOT / "evomerge" / "zoo" / "models" / "base"
EXPERTS = ("a", "b", "c")
SHARD_BYTES = 1 << 30

# Llama shapes (head_dim 64, grouped KV heads, untied 32k vocab). "1b" is Llama-3.2-1B's width/depth/MLP.
SIZES: dict[str, dict[str, int]] = {
    "tiny": dict(hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, vocab=256),
    "0.2b": dict(hidden=1024, intermediate=4096, layers=10, heads=16, kv_heads=8, vocab=32000),
    "1b": dict(hidden=2048, intermediate=8192, layers=16, heads=32, kv_heads=8, vocab=32000),
}


def config(size: str) -> LlamaConfig:
    s = SIZES[size]
    return LlamaConfig(
        architectures=["LlamaForCausalLM"], hidden_size=s["hidden"], intermediate_size=s["intermediate"],
        num_hidden_layers=s["layers"], num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"],
        vocab_size=s["vocab"], max_position_embeddings=256, tie_word_embeddings=False, dtype="bfloat16",
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )


def shapes(cfg: LlamaConfig) -> dict[str, tuple[int, ...]]:
    h, i, kv = cfg.hidden_size, cfg.intermediate_size, cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads)
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (cfg.vocab_size, h)}
    for n in range(cfg.num_hidden_layers):
        p = f"model.layers.{n}."
        out |= {p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kv, h),
                p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, h),
                p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h), p + "mlp.down_proj.weight": (h, i),
                p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,)}
    return out | {"model.norm.weight": (h,), "lm_head.weight": (cfg.vocab_size, h)}


def parameters(size: str) -> int:
    return sum(torch.Size(s).numel() for s in shapes(config(size)).values())


def checkpoints(size: str, cache: str | Path) -> dict[str, str]:
    """{"base": dir, "a": dir, "b": dir, "c": dir}, built under `cache`/`size` unless already there."""
    root = Path(cache) / size
    cfg = config(size)
    dirs = {"base": root / "base", **{e: root / e for e in EXPERTS}}
    if not (dirs["base"] / ".complete").is_file():
        _write(dirs["base"], cfg, _base_tensor, seed=0)
    for k, e in enumerate(EXPERTS, start=1):
        if not (dirs[e] / ".complete").is_file():
            with _Reader(dirs["base"]) as base:
                _write(dirs[e], cfg, lambda name, shape, gen: _expert_tensor(base.get(name), gen), seed=k)
    return {k: str(v) for k, v in dirs.items()}


def _base_tensor(name: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    if len(shape) == 1:  # RMSNorm scales
        return torch.ones(shape, dtype=torch.bfloat16)
    return (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)


def _expert_tensor(base: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    b = base.float()
    std = b.std().item() if b.numel() > 1 else 0.0
    return (b + torch.randn(b.shape, generator=gen) * (0.01 * std if std > 0 else 0.01)).to(torch.bfloat16)


class _Reader:
    """The base checkpoint's tensors by name, across its shards."""

    def __init__(self, path: Path):
        files = sorted(path.glob("*.safetensors"))
        self._files = [safe_open(str(f), framework="pt") for f in files]
        self._where = {n: f for f in self._files for n in f.keys()}

    def get(self, name: str) -> torch.Tensor:
        return self._where[name].get_tensor(name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._files.clear()


def _write(out: Path, cfg: LlamaConfig, make, *, seed: int) -> None:
    """Shards of at most SHARD_BYTES, written as they fill (one shard in memory at a time)."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    gen = torch.Generator().manual_seed(seed)
    all_shapes = shapes(cfg)
    groups: list[list[str]] = [[]]
    size = 0
    for name, shape in all_shapes.items():
        nbytes = torch.Size(shape).numel() * 2
        if groups[-1] and size + nbytes > SHARD_BYTES:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    weight_map = {}
    for k, names in enumerate(groups, start=1):
        file = "model.safetensors" if len(groups) == 1 else f"model-{k:05d}-of-{len(groups):05d}.safetensors"
        save_file({n: make(n, all_shapes[n], gen).contiguous() for n in names}, str(out / file), metadata={"format": "pt"})
        weight_map |= {n: file for n in names}
    if len(groups) > 1:
        total = sum(torch.Size(s).numel() * 2 for s in all_shapes.values())
        (out / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    cfg.save_pretrained(out)
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(ZOO_BASE / f, out / f)
    (out / ".complete").touch()


def candidate(method: str, i: int) -> dict:
    """Candidate `i`: 3 experts, per-layer weight and density gradients that differ between candidates."""
    d = 0.05 * i
    return {"merge_method": method, "base_model": "base", "seed": i, "models": [
        {"model": "a", "parameters": {"weight": [0.2 + d, 0.9 - d, 0.5], "density": [0.3 + d, 0.7]}},
        {"model": "b", "parameters": {"weight": [1.0 - d, 0.3], "density": [0.8, 0.4 + d, 0.6]}},
        {"model": "c", "parameters": {"weight": [0.4, 0.6 + d, 0.2], "density": [0.5, 0.5 - d]}}]}
