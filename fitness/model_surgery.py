"""What the HF handle does to a live transformers model, by the architecture table (evomerge/arch.py): which
tensor of the model each checkpoint tensor fills (a view into a fused expert tensor), a tied head given its own
weights, the list of decoder layers."""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from evomerge.arch import Family, lookup, memory_name
from evomerge.records import UserError


def module_targets(model: Any, names: Iterable[str], f: Family | None = None) -> dict[str, Any]:
    """Checkpoint tensor name -> the tensor of `model` (a view for a fused expert) that from_pretrained
    fills from it, for every name in `names`, which must cover every parameter of the model. The model's
    head is left out while it is its input embedding (tied): see `untie_head`."""
    f = f or lookup(model.config)
    own = dict(model.named_parameters(remove_duplicate=False))
    own.update(dict(model.named_buffers(remove_duplicate=False)))
    out: dict[str, Any] = {}
    covered: dict[str, int] = {}
    for n in names:
        if n == f.head and is_tied(model):
            continue
        target, e, rule = memory_name(f, n)
        t = own.get(target)
        if t is None or (rule is not None and e >= t.shape[0]):
            raise UserError(f"the {f.name} model has no tensor {target!r}{'' if rule is None else f' expert {e}'} for checkpoint tensor {n!r}")
        if rule is not None:
            t = t[e] if rule.parts == 1 else t[e].chunk(rule.parts, 0)[rule.part]
        out[n] = t
        covered[target] = covered.get(target, 0) + t.numel()
    for name, p in model.named_parameters():
        if covered.get(name, 0) != p.numel():  # e.g. a model deeper than the recipe: old weights would stay
            raise UserError(f"the recipe does not produce all of the model's parameter {name!r} (check the model's depth)")
    return out


def is_tied(model: Any) -> bool:
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    return head is not None and embedding is not None and head.weight is embedding.weight


def untie_head(model: Any) -> None:
    """Give a tied model its own head (a copy of the embedding): transformers loads a stored head that
    differs from the embedding untied, whatever the config says, so a merge producing one needs it."""
    head = model.get_output_embeddings()
    head.weight = type(head.weight)(head.weight.detach().clone(), requires_grad=head.weight.requires_grad)


def layer_list(model: Any, f: Family | None = None) -> Any:
    """The model's nn.ModuleList of decoder layers."""
    f = f or lookup(model.config)
    obj = model
    path = f.modules or next((p for p in ("model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers")
                              if _has_path(model, p)), "")
    for part in path.split("."):
        obj = getattr(obj, part, None)
    if obj is None:
        raise UserError(f"cannot find the decoder layer list of {type(model).__name__} (architecture {f.name})")
    return obj


def _has_path(obj: Any, path: str) -> bool:
    for part in path.split("."):
        obj = getattr(obj, part, None)
    return obj is not None
