"""mergekit-style parameter values resolved for one tensor.

A value is a scalar; a list of scalars, a "gradient" interpolated over the layers at position
t = layer / (num_layers - 1); or a list of `{filter, value}` entries matched against the tensor name
(first match wins; no filter or "*" matches everything). Settings are looked up in scopes from the most
to the least specific (a model's own parameters, then the slice's, then the recipe's); a scope whose
filters match nothing passes the question on. The arithmetic mirrors mergekit 0.1.5 exactly, so that a
density interpolated here truncates to the same element count there.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from evomerge.records import UserError

_MISSING = object()


@dataclass(frozen=True)
class Interval:
    """The values a numeric parameter may take (always finite: NaN and infinities are refused)."""

    low: float = -math.inf
    high: float = math.inf
    open_low: bool = False  # low itself excluded

    def __contains__(self, x: float) -> bool:
        return math.isfinite(x) and (x > self.low if self.open_low else x >= self.low) and x <= self.high

    def __str__(self) -> str:
        if self.high == math.inf:
            return "a finite number" if self.low == -math.inf else f"{'>' if self.open_low else '>='} {self.low:g}"
        return f"in {'(' if self.open_low else '['}{self.low:g}, {self.high:g}]"


FINITE = Interval()
UNIT = Interval(0.0, 1.0)  # densities, fractions, interpolation factors
NON_NEGATIVE = Interval(0.0)
POSITIVE = Interval(0.0, open_low=True)


@dataclass(frozen=True)
class ParamSpec:
    """A merge method's parameter: its type, default, whether each input model has its own value, and
    for numbers the values it may take."""

    name: str
    type: type
    default: Any = _MISSING
    per_model: bool = False  # one value per input model (else one value shared by the tensor)
    base_too: bool = False  # per-model parameters the base model also takes (linear's weight)
    bounds: Interval = FINITE  # for float and int parameters

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
            if self.type is float and isinstance(value, bool):
                raise ValueError(value)
            typed = self.type(value)
        except (TypeError, ValueError, OverflowError):
            raise UserError(f"parameter {self.name!r} for {where} must be {self.type.__name__}, got {value!r}") from None
        if self.type in (float, int) and typed not in self.bounds:
            raise UserError(f"parameter {self.name!r} for {where} must be {self.bounds}, got {value!r}")
        return typed


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


def values(setting: Any) -> Iterable[Any]:
    """Every value a setting holds: its scalars, gradient points and filtered entries' values (malformed
    entries are left to `evaluate`, which names what is wrong with them)."""
    if isinstance(setting, dict):
        setting = [setting]
    if not isinstance(setting, list):
        yield setting
        return
    for e in setting:
        if not isinstance(e, dict):
            yield e
        elif "value" in e:
            yield from values(e["value"])
