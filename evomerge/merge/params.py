"""mergekit-style parameter values resolved for one tensor.

A value is a scalar; a list of scalars, a "gradient" interpolated over the layers at position
t = layer / (num_layers - 1); or a list of `{filter, value}` entries matched against the tensor name
(first match wins; no filter or "*" matches everything). Settings are looked up in scopes from the most
to the least specific (a model's own parameters, then the slice's, then the recipe's); a scope whose
filters match nothing passes the question on. The arithmetic mirrors mergekit 0.1.5 exactly, so that a
density interpolated here truncates to the same element count there.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from evomerge.records import UserError

_MISSING = object()


@dataclass(frozen=True)
class ParamSpec:
    """A merge method's parameter: its type, default, and whether each input model has its own value."""

    name: str
    type: type
    default: Any = _MISSING
    per_model: bool = False  # one value per input model (else one value shared by the tensor)
    base_too: bool = False  # per-model parameters the base model also takes (linear's weight)

    @property
    def required(self) -> bool:
        return self.default is _MISSING

    def validate(self, value: Any, where: str) -> Any:
        if value is None and self.default is None:
            return None
        try:
            if self.type is bool:
                if isinstance(value, str):
                    if value.lower() not in ("true", "false"):
                        raise ValueError(value)
                    return value.lower() == "true"
                return bool(value)
            if self.type is float:
                if isinstance(value, bool):
                    raise ValueError(value)
                return float(value)
            return self.type(value)
        except (TypeError, ValueError):
            raise UserError(f"parameter {self.name!r} for {where} must be {self.type.__name__}, got {value!r}") from None


def evaluate(setting: Any, tensor_name: str, t: float, spec: ParamSpec, where: str) -> Any:
    """One setting's value for a tensor at layer position t, or None when its filters match nothing."""
    if isinstance(setting, dict):
        setting = [setting]
    if isinstance(setting, (bool, int, float, str)):
        return spec.validate(setting, where)
    if not isinstance(setting, list):
        raise UserError(f"parameter {spec.name!r} for {where}: unexpected value {setting!r}")
    if not setting:
        return None
    if all(isinstance(e, (bool, int, float, str)) for e in setting):
        values = [spec.validate(e, where) for e in setting]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            return values[int(t * (len(values) - 1))]
        scaled = t * (len(values) - 1)
        i0 = int(scaled)
        i1 = min(len(values) - 1, i0 + 1)
        frac = scaled - i0
        return spec.validate((1 - frac) * values[i0] + frac * values[i1], where)
    for cond in setting:
        if not isinstance(cond, dict) or "value" not in cond:
            raise UserError(f"parameter {spec.name!r} for {where}: a list entry needs 'value' (and optional 'filter'), got {cond!r}")
        f = cond.get("filter")
        if f is None or f == "*" or (tensor_name and f in tensor_name):
            return evaluate(cond["value"], tensor_name, t, spec, where)
    return None


def resolve(spec: ParamSpec, scopes: Iterable[Mapping[str, Any] | None], tensor_name: str, t: float, where: str) -> Any:
    """The value of `spec` for a tensor: the first scope that yields one, else the default."""
    for scope in scopes:
        if scope and spec.name in scope:
            value = evaluate(scope[spec.name], tensor_name, t, spec, where)
            if value is not None:
                return value
    if spec.required:
        raise UserError(f"missing required parameter {spec.name!r} for {where}")
    return spec.default


def unknown_parameters(given: Iterable[str], specs: Iterable[ParamSpec]) -> list[str]:
    known = {s.name for s in specs}
    return sorted(set(given) - known)
