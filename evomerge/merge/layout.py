"""Where a tensor sits in a decoder: which layer it belongs to, or whether it comes before or after them.

Transformers checkpoints name layer tensors `<prefix>.<i>.<rest>` (`model.layers.3.mlp.up_proj.weight`,
`transformer.h.3.attn...`). Tensors outside the layers are "pre" (embeddings, before the stack) or
"post" (final norm, LM head). This is all the architecture knowledge merging needs.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

_LAYER = re.compile(r"^(?P<prefix>(?:.*\.)?(?:layers|h|blocks|layer))\.(?P<index>\d+)\.(?P<rest>.+)$")
_PRE = ("embed", "wte", "wpe")


@dataclass(frozen=True)
class LayerName:
    prefix: str
    index: int
    rest: str

    def at(self, index: int) -> str:
        return f"{self.prefix}.{index}.{self.rest}"


def layer_of(name: str) -> LayerName | None:
    m = _LAYER.match(name)
    return LayerName(m["prefix"], int(m["index"]), m["rest"]) if m else None


def is_pre(name: str) -> bool:
    return any(p in name for p in _PRE)


def num_layers(names: list[str]) -> int:
    idx = [ln.index for ln in map(layer_of, names) if ln is not None]
    return max(idx) + 1 if idx else 0


def layer_position(index: int, count: int) -> float:
    """mergekit's gradient position of layer `index` among `count` layers."""
    return index / (count - 1) if count > 1 else 1.0


# Projections whose output is added to the residual stream (Llama/Mistral/Qwen, GPT-2, GPT-NeoX, OPT...).
_RESIDUAL_OUTPUTS = ("o_proj", "down_proj", "out_proj", "c_proj", "dense_4h_to_h", "fc2", "attention.dense")


def writes_residual(rest: str) -> bool:
    """Whether a layer tensor (name after `layers.<i>.`) belongs to a projection that writes the residual stream."""
    return any(f"{p}." in rest for p in _RESIDUAL_OUTPUTS)
