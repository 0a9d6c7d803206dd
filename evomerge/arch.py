"""The architecture table: everything evomerge knows about a decoder family, in one place.

Names are CHECKPOINT names (as the safetensors files store them); `renames` and `fused` say how
transformers 5 lays those tensors out in memory. Readers: the merge plan and writer (layer prefixes,
pre/post tensors, residual writers, depth-indexed config fields), the search spaces (module groups, the
depth key), the HF handle (the layer list, in-memory targets). A checkpoint of an architecture missing
here is read by name patterns, with a one-time warning.

`Layout` reads the table for one family: which layer a tensor name belongs to, pre/post tensors, where a
data-flow scale folds. Plain data and plain functions, no torch import: this module is ground floor, every
other may read it.
"""
from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from evomerge.records import UserError

LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class Fused:
    """Experts stored one tensor each in the checkpoint but stacked in memory: a (renamed) checkpoint name
    matching `pattern` (groups `pre` and `e`) is part `part` of `parts` (along dim 0 of one expert's
    slice, as transformers' Concatenate(dim=1) builds it) of `<pre>.<target>[e]`. The stacked tensor is
    also what mergekit 0.1.5 merges (its definitions name the in-memory tensors): see `stacks`."""

    pattern: str
    target: str
    part: int = 0
    parts: int = 1


@dataclass(frozen=True)
class Family:
    name: str
    architectures: tuple[str, ...]  # config.json `architectures` values
    layers: str  # checkpoint prefix of the layer stack: `<layers>.<i>.<rest>`
    modules: str  # attribute path of the layer list in the loaded model
    pre: tuple[str, ...]  # tensors before the stack (embeddings)
    post: tuple[str, ...]  # after it (final norm, head)
    head: str  # the output embedding, absent from the checkpoint when tied to pre[0]
    groups: Mapping[str, tuple[str, ...]]  # module group -> name fragments (mergekit `filter`s), most specific first
    residual: tuple[str, ...]  # regexes over a layer tensor's rest: projections whose output is added to the residual
    post_norms: tuple[str, ...] = ()  # norms that renormalize those outputs before the add (Gemma: x * (1 + w))
    depth_key: str = "num_hidden_layers"  # as config.json spells it
    depth_fields: tuple[str, ...] = ()  # config fields indexed by layer (see `resize_config`)
    layer_index_flags: tuple[str, ...] = ()  # config flags that make a layer's computation depend on its index
    renames: tuple[tuple[str, str], ...] = ()  # checkpoint -> memory name substitutions (regex, replacement)
    fused: tuple[Fused, ...] = ()
    moe: bool = False
    text_config: str = ""  # the sub-config holding the decoder's settings (multimodal models), "" = top level
    outside_prefixes: tuple[str, ...] = ()  # other modules outside the stack (a vision tower), as filters

    @property
    def tensors_outside(self) -> tuple[str, ...]:
        return self.pre + self.post


_NORMS = ("input_layernorm", "post_attention_layernorm")
_LLAMA = Family(
    name="llama", architectures=("LlamaForCausalLM",), layers="model.layers", modules="model.layers",
    pre=("model.embed_tokens.weight",), post=("model.norm.weight", "lm_head.weight"), head="lm_head.weight",
    groups={"attention": ("self_attn",), "mlp": ("mlp",), "norms": _NORMS},
    residual=(r"self_attn\.o_proj\.", r"mlp\.down_proj\."),
)
_QWEN_FIELDS = ("layer_types", "max_window_layers")
_GEMMA = dict(
    groups={"attention": ("self_attn",), "mlp": ("mlp",),
            "norms": (*_NORMS, "pre_feedforward_layernorm", "post_feedforward_layernorm")},
    post_norms=(r"post_attention_layernorm\.", r"post_feedforward_layernorm\."),
    depth_fields=("layer_types",),
)

FAMILIES: dict[str, Family] = {f.name: f for f in (
    _LLAMA,
    dataclasses.replace(_LLAMA, name="mistral", architectures=("MistralForCausalLM",)),
    dataclasses.replace(_LLAMA, name="qwen2", architectures=("Qwen2ForCausalLM",), depth_fields=_QWEN_FIELDS),
    dataclasses.replace(_LLAMA, name="qwen3", architectures=("Qwen3ForCausalLM",), depth_fields=_QWEN_FIELDS),
    dataclasses.replace(_LLAMA, name="gemma2", architectures=("Gemma2ForCausalLM",), **_GEMMA),
    dataclasses.replace(_LLAMA, name="gemma3_text", architectures=("Gemma3ForCausalLM",), **_GEMMA),
    dataclasses.replace(
        _LLAMA, name="gemma3", architectures=("Gemma3ForConditionalGeneration",), **_GEMMA,
        layers="language_model.model.layers", modules="model.language_model.layers", text_config="text_config",
        pre=("language_model.model.embed_tokens.weight",), head="language_model.lm_head.weight",
        post=("language_model.model.norm.weight", "language_model.lm_head.weight"),
        outside_prefixes=("vision_tower.", "multi_modal_projector."),
        renames=((r"^language_model\.model\.", "model.language_model."), (r"^language_model\.lm_head\.", "lm_head."),
                 (r"^vision_tower\.", "model.vision_tower."), (r"^multi_modal_projector\.", "model.multi_modal_projector.")),
    ),
    dataclasses.replace(_LLAMA, name="phi3", architectures=("Phi3ForCausalLM",)),
    Family(
        name="gpt2", architectures=("GPT2LMHeadModel",), layers="transformer.h", modules="transformer.h",
        pre=("transformer.wte.weight", "transformer.wpe.weight"),
        post=("transformer.ln_f.weight", "transformer.ln_f.bias", "lm_head.weight"), head="lm_head.weight",
        groups={"attention": ("attn.",), "mlp": ("mlp.",), "norms": ("ln_1.", "ln_2.")},
        residual=(r"attn\.c_proj\.", r"mlp\.c_proj\."), depth_key="n_layer",
        layer_index_flags=("scale_attn_by_inverse_layer_idx",),
    ),
    Family(
        name="gpt_neox", architectures=("GPTNeoXForCausalLM",), layers="gpt_neox.layers", modules="gpt_neox.layers",
        pre=("gpt_neox.embed_in.weight",),
        post=("gpt_neox.final_layer_norm.weight", "gpt_neox.final_layer_norm.bias", "embed_out.weight"),
        head="embed_out.weight",
        groups={"attention": ("attention.",), "mlp": ("mlp.",), "norms": _NORMS},
        residual=(r"attention\.dense\.", r"mlp\.dense_4h_to_h\."),
        renames=((r"^embed_out\.", "lm_head."),),
    ),
    dataclasses.replace(
        _LLAMA, name="mixtral", architectures=("MixtralForCausalLM",), moe=True,
        groups={"attention": ("self_attn",), "experts": ("block_sparse_moe.experts.",),
                "router": ("block_sparse_moe.gate.",), "mlp": ("block_sparse_moe.",), "norms": _NORMS},
        residual=(r"self_attn\.o_proj\.", r"block_sparse_moe\.experts\.\d+\.w2\."),
        renames=((r"\.block_sparse_moe\.", ".mlp."),),
        fused=(
            Fused(r"(?P<pre>.+)\.mlp\.experts\.(?P<e>\d+)\.w1\.weight", "mlp.experts.gate_up_proj", 0, 2),
            Fused(r"(?P<pre>.+)\.mlp\.experts\.(?P<e>\d+)\.w3\.weight", "mlp.experts.gate_up_proj", 1, 2),
            Fused(r"(?P<pre>.+)\.mlp\.experts\.(?P<e>\d+)\.w2\.weight", "mlp.experts.down_proj"),
        ),
    ),
    dataclasses.replace(
        _LLAMA, name="qwen2_moe", architectures=("Qwen2MoeForCausalLM",), moe=True,
        groups={"attention": ("self_attn",), "experts": ("mlp.experts.",), "shared_expert": ("mlp.shared_expert",),
                "router": ("mlp.gate.",), "mlp": ("mlp.",), "norms": _NORMS},
        residual=(r"self_attn\.o_proj\.", r"mlp\.(experts\.\d+\.|shared_expert\.)?down_proj\."),
        depth_fields=(*_QWEN_FIELDS, "mlp_only_layers"),
        fused=(
            Fused(r"(?P<pre>.+)\.mlp\.experts\.(?P<e>\d+)\.gate_proj\.weight", "mlp.experts.gate_up_proj", 0, 2),
            Fused(r"(?P<pre>.+)\.mlp\.experts\.(?P<e>\d+)\.up_proj\.weight", "mlp.experts.gate_up_proj", 1, 2),
            Fused(r"(?P<pre>.+)\.mlp\.experts\.(?P<e>\d+)\.down_proj\.weight", "mlp.experts.down_proj"),
        ),
    ),
)}

# Unknown architectures: today's name patterns (Llama-, GPT-2-, NeoX- and OPT-style names).
GENERIC = Family(
    name="generic", architectures=(), layers="", modules="", pre=(), post=(), head="lm_head.weight",
    groups={"attention": ("self_attn", "attn.", "attention."), "mlp": ("mlp",), "norms": ("layernorm", "ln_")},
    residual=(r".*(o_proj|down_proj|out_proj|c_proj|dense_4h_to_h|fc2|attention\.dense)\.",),
)
_BY_ARCH = {a: f for f in FAMILIES.values() for a in f.architectures}
_warned: set[str] = set()


def family(name: str) -> Family:
    """A family by its table name (search-space option `architecture`)."""
    if name == GENERIC.name:
        return GENERIC
    if name not in FAMILIES:
        raise UserError(f"unknown architecture {name!r}; known: {', '.join(FAMILIES)}")
    return FAMILIES[name]


def lookup(config: Mapping[str, Any] | Any | None, names: Iterable[str] = ()) -> Family:
    """The family of a checkpoint from its config (a config.json dict or a transformers config); without an
    `architectures` entry (state-dict sources), from its tensor names. Unknown: GENERIC, warned once."""
    archs = (config.get("architectures") if isinstance(config, Mapping) else getattr(config, "architectures", None)) or []
    for a in archs:
        if a in _BY_ARCH:
            return _BY_ARCH[a]
    if not archs:
        names = list(names)
        for f in FAMILIES.values():
            if f.pre[0] in names and any(n.startswith(f.layers + ".0.") for n in names) and _signature(f, names):
                return f
    key = "/".join(archs) or "(no architectures in config)"
    if key not in _warned:
        _warned.add(key)
        LOG.warning("architecture %s is not in evomerge's table (%s): reading tensors by name patterns", key, ", ".join(_BY_ARCH))
    return GENERIC


def _signature(f: Family, names: list[str]) -> bool:
    """Whether layer 0's tensors look like `f`'s: all its residual writers, and post-norms iff it has them."""
    rests = [n[len(f.layers) + 3:] for n in names if n.startswith(f.layers + ".0.")]
    found = lambda pattern: any(re.match(pattern, r) for r in rests)  # noqa: E731
    return all(map(found, f.residual)) and found(r"post_feedforward_layernorm\.") == bool(f.post_norms)


# --- names: where a checkpoint tensor sits (layer i, or before/after the stack) -------------------------------

# name patterns for architectures missing from the table
_GENERIC_LAYER = re.compile(r"^(?P<prefix>(?:.*\.)?(?:layers|h|blocks|layer))\.(?P<index>\d+)\.(?P<rest>.+)$")
_GENERIC_PRE = ("embed_tokens", "embed_in", "wte", "wpe")


@dataclass(frozen=True)
class LayerName:
    prefix: str
    index: int
    rest: str

    def at(self, index: int) -> str:
        return f"{self.prefix}.{index}.{self.rest}"


class Layout:
    def __init__(self, family: Family):
        self.family = family
        self._layer = (re.compile(rf"^(?P<prefix>{re.escape(family.layers)})\.(?P<index>\d+)\.(?P<rest>.+)$")
                       if family.layers else _GENERIC_LAYER)
        self._residual = [re.compile(p) for p in family.residual]
        self._post_norms = [re.compile(p) for p in family.post_norms]

    def layer_of(self, name: str) -> LayerName | None:
        m = self._layer.match(name)
        return LayerName(m["prefix"], int(m["index"]), m["rest"]) if m else None

    def is_pre(self, name: str) -> bool:
        if self.family.layers:
            return name in self.family.pre
        return any(p in name for p in _GENERIC_PRE)

    def layers(self, names: Iterable[str]) -> dict[int, list[LayerName]]:
        """Each layer's tensors, by index (layers may differ: a dense layer among MoE ones)."""
        out: dict[int, list[LayerName]] = {}
        for ln in map(self.layer_of, names):
            if ln is not None:
                out.setdefault(ln.index, []).append(ln)
        return out

    def num_layers(self, names: Iterable[str]) -> int:
        idx = [ln.index for ln in map(self.layer_of, names) if ln is not None]
        return max(idx) + 1 if idx else 0

    def fold_scope(self, rest: str, scale: float) -> dict[str, float] | None:
        """The passthrough parameters that make layer tensor `rest` write `1/scale` times as much into the
        residual stream (None: the tensor is unchanged). Where post-norms renormalize each write (Gemma:
        normalize(y) * (1 + w)), no projection's weight scales it, but the norm's factor does: 1 + w
        becomes (1 + w) / scale, i.e. w * (1/scale) + (1/scale - 1)."""
        if scale == 1.0:
            return None
        c = 1.0 / scale
        if self._post_norms:
            return {"scale": c, "offset": c - 1.0} if any(p.match(rest) for p in self._post_norms) else None
        return {"scale": c} if any(p.match(rest) for p in self._residual) else None

    def source_layers(self, planned: Iterable[Any]) -> list[int]:
        """For a plan (evomerge.merge.plan.Planned items), the source layer index of each output layer."""
        out: dict[int, int] = {}
        for p in planned:
            ln = self.layer_of(p.name)
            if ln is not None and ln.index not in out:
                src = self.layer_of(p.inputs[0].tensor)
                out[ln.index] = src.index if src is not None else ln.index
        return [out[k] for k in range(len(out))]


def layout_for(config: Mapping[str, Any] | Any | None, names: Iterable[str] = ()) -> Layout:
    return Layout(lookup(config, names))


# --- depth: the config of a model whose output layer k is source layer src[k] -------------------------------

def get_path(cfg: Mapping[str, Any] | Any, key: str) -> Any:
    return cfg.get(key) if isinstance(cfg, Mapping) else getattr(cfg, key, None)


def text_config(f: Family, cfg: Mapping[str, Any] | Any) -> Mapping[str, Any] | Any:
    """The (sub-)config holding the decoder's depth and depth-indexed fields (a config.json dict or object)."""
    return get_path(cfg, f.text_config) if f.text_config else cfg


def apply_config(f: Family, cfg: dict[str, Any] | Any, fields: Mapping[str, Any]) -> None:
    """Set `resize_config`'s fields in `cfg` (a dict, changed in place, or a transformers config)."""
    sub = text_config(f, cfg)
    for key, value in fields.items():
        if isinstance(sub, dict):
            sub[key] = value
        else:
            setattr(sub, key, value)


def depth_key(f: Family, cfg: Mapping[str, Any] | Any) -> str:
    """The config key holding the number of layers (for an unknown family: the usual spellings)."""
    if f is not GENERIC:
        return f.depth_key
    return next((k for k in ("num_hidden_layers", "n_layer", "num_layers") if get_path(cfg, k) is not None), "num_hidden_layers")


def depth(f: Family, cfg: Mapping[str, Any] | Any) -> int | None:
    cfg = text_config(f, cfg)
    n = get_path(cfg, depth_key(f, cfg))
    return None if n is None else int(n)


def resize_config(f: Family, cfg: Mapping[str, Any] | Any, src: list[int]) -> dict[str, Any]:
    """The depth key and every depth-indexed field of `cfg` for a stack whose layer k is `cfg`'s layer
    src[k]: per-layer lists (`layer_types`) follow their layers; `mlp_only_layers` (with
    `decoder_sparse_step`, Qwen2-MoE) lists the new positions of dense layers; `max_window_layers` (Qwen2:
    layers from this index on slide; transformers and vLLM read `layer_types`, written alongside, which
    holds any order) becomes the number of leading full-attention layers. Returns only the fields to set
    (in the family's `text_config`: see `apply_config`)."""
    old = depth(f, cfg)
    cfg = text_config(f, cfg)
    out: dict[str, Any] = {depth_key(f, cfg): len(src)}
    if old is None:
        return out
    for key in f.depth_fields:
        value = get_path(cfg, key)
        if value is None:
            continue
        if key == "layer_types":
            if len(value) != old:
                raise UserError(f"config: {key} has {len(value)} entries for {old} layers")
            out[key] = [value[s] for s in src]
        elif key == "mlp_only_layers":
            step = int(get_path(cfg, "decoder_sparse_step") or 1)
            dense = {s for s in range(old) if s in set(value) or (s + 1) % step != 0}
            out[key] = [k for k, s in enumerate(src) if s in dense]
            out["decoder_sparse_step"] = 1  # the dense layers are listed explicitly now
        elif key == "max_window_layers":
            full = [s < value for s in src]
            out[key] = max(int(value), len(src)) if all(full) else full.index(False)
        else:
            raise AssertionError(f"no resize rule for {key}")
    return out


def check_reorderable(f: Family, cfg: Mapping[str, Any] | Any) -> None:
    """Refuse layer orders a family cannot compute faithfully (a layer whose math depends on its index)."""
    for flag in f.layer_index_flags:
        if get_path(text_config(f, cfg), flag):
            raise UserError(f"{f.name}: {flag} is set, so a layer computes differently at another depth; "
                            "data-flow paths cannot be scored faithfully")


# --- filters --------------------------------------------------------------------------------------------------

def outside_filters(f: Family, tied: bool) -> tuple[str, ...]:
    """Filters naming each tensor outside the layers (the head only when it is stored, i.e. not tied)."""
    if f is GENERIC:
        return ("embed_tokens", "norm", *(() if tied else (f.head,)))
    return tuple(n for n in f.tensors_outside if not (tied and n == f.head)) + f.outside_prefixes


def embedding_filters(f: Family, tied: bool) -> tuple[str, ...]:
    """Filters naming the input embeddings and (unless tied) the head."""
    return (*(f.pre or ("embed_tokens",)), *(() if tied else (f.head,)))


# --- in-memory layout ---------------------------------------------------------------------------------------

def memory_name(f: Family, name: str) -> tuple[str, int | None, Fused | None]:
    """Where transformers keeps checkpoint tensor `name`: (parameter name, expert index, fused rule)."""
    for pattern, repl in f.renames:
        name = re.sub(pattern, repl, name)
    for rule in f.fused:
        m = re.fullmatch(rule.pattern, name)
        if m:
            return f"{m['pre']}.{rule.target}", int(m["e"]), rule
    return name, None, None


@dataclass(frozen=True)
class StackedTensor:
    """Checkpoint tensors that are one tensor in memory, `name`, and to mergekit: `members` in its flat
    order (expert by expert; an expert's `parts` consecutive members are its slice, stacked along rows)."""

    name: str
    members: tuple[str, ...]
    parts: int


def stacks(f: Family, names: Iterable[str]) -> dict[str, StackedTensor]:
    """Checkpoint name -> its stack, for every name `f.fused` stacks. A method reading a whole tensor (a
    trim's ranking, a rescale's norm) reads a stack whole, as mergekit does."""
    found: dict[str, dict[tuple[int, int], str]] = {}
    parts: dict[str, int] = {}
    for n in names:
        target, e, rule = memory_name(f, n)
        if rule is not None:
            found.setdefault(target, {})[(e, rule.part)] = n
            parts[target] = rule.parts
    out: dict[str, StackedTensor] = {}
    for target, members in found.items():
        experts = {e for e, _ in members}
        if len(members) != len(experts) * parts[target]:
            raise UserError(f"{target}: the checkpoint stores {len(members)} parts for {len(experts)} experts of {parts[target]} parts")
        stack = StackedTensor(target, tuple(members[k] for k in sorted(members)), parts[target])
        out.update(dict.fromkeys(stack.members, stack))
    return out


# --- documentation --------------------------------------------------------------------------------------------

def markdown_table() -> str:
    """The README's supported-architectures table."""
    rows = ["| Family | `architectures` | Layers | Depth fields | Module groups | Data-flow scale goes into | Load-time layout |",
            "|---|---|---|---|---|---|---|"]
    for f in FAMILIES.values():
        fields = ", ".join(f"`{f.text_config + '.' if f.text_config else ''}{k}`" for k in (f.depth_key, *f.depth_fields))
        fold = "post-norms (their 1 + w)" if f.post_norms else "residual writers"
        layout = "; ".join(filter(None, [
            ", ".join(f"`{p.strip('^').replace(chr(92), '')}`→`{r}`" for p, r in f.renames),
            "experts stacked" if f.fused else ""])) or "as stored"
        rows.append(f"| {f.name} | {', '.join(f.architectures)} | `{f.layers}` | {fields} | {', '.join(f.groups)} | {fold} | {layout} |")
    return "\n".join(rows)

