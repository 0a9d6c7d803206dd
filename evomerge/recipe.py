"""A merge recipe: plain data saying how one model is built from source models.

The schema is mergekit's merge configuration (`merge_method`, `base_model`, `models` with per-model
`parameters`, global `parameters`, passthrough `slices`, `dtype`, `out_dtype`, `tokenizer_source`), so a recipe that
mergekit can express exports to its YAML unchanged, and extended by:

- `path`: a data-flow model (Sakana's data-flow space): the forward pass runs the listed
  (model, layer) steps in order, each multiplying the hidden state it receives by `scale`;
- nested recipes: a model entry may itself be a recipe, whose merged result is used as that source
  (e.g. a parameter-space merge that becomes model A of a data-flow path); such an entry carries a
  `name`, which path steps use to refer to it.

Parameter values follow mergekit: a scalar; a list of numbers interpolated over the layers (a
"gradient"); or a list of `{filter: substring, value: ...}` entries matched against tensor names, the
first match winning and an entry without `filter` acting as the default.

Ground floor: no torch import.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Union

import yaml

from evomerge.records import UserError

ParamValue = Union[float, int, bool, str, list[Any]]


def _mapping(v: Any, what: str) -> dict:
    if v is not None and not isinstance(v, dict):
        raise UserError(f"{what} must be a mapping, got {v!r}")
    return dict(v or {})


def _listing(v: Any, what: str) -> list:
    if v is not None and not isinstance(v, list):
        raise UserError(f"{what} must be a list, got {v!r}")
    return v or []


@dataclass
class ModelRef:
    """One source in a recipe: a model name (or path), or a nested recipe, with its own parameters."""

    model: Union[str, "Recipe"]
    parameters: dict[str, ParamValue] = field(default_factory=dict)
    name: str | None = None  # how path steps refer to this entry; needed when `model` is a nested recipe

    @property
    def label(self) -> str | None:
        """The name path steps use for this entry: its `name`, else the model name itself."""
        return self.name if self.name is not None else (self.model if isinstance(self.model, str) else None)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"model": self.model.to_dict() if isinstance(self.model, Recipe) else self.model}
        if self.parameters:
            d["parameters"] = dict(self.parameters)
        if self.name is not None:
            d["name"] = self.name
        return d

    @classmethod
    def from_dict(cls, d: Any) -> ModelRef:
        if isinstance(d, str):
            return cls(model=d)
        if not isinstance(d, dict) or "model" not in d:
            raise UserError(f"a model entry needs a 'model' key, got {d!r}")
        model = d["model"]
        if isinstance(model, dict):
            model = Recipe.from_dict(model)
        elif not isinstance(model, str):
            raise UserError(f"a model entry's 'model' is a model name or a recipe, got {model!r}")
        return cls(model=model, parameters=_mapping(d.get("parameters"), "a model entry's parameters"),
                   name=None if d.get("name") is None else str(d["name"]))


@dataclass
class PathStep:
    """One step of a data-flow path: run `layer` of `model` on the hidden state times `scale`."""

    model: str
    layer: int
    scale: float = 1.0

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "layer": self.layer, "scale": self.scale}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PathStep:
        try:
            return cls(model=str(d["model"]), layer=int(d["layer"]), scale=float(d.get("scale", 1.0)))
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"a path step needs model, layer and optional scale, got {d!r}") from e


_FIELDS = ("merge_method", "models", "base_model", "parameters", "slices", "path", "dtype", "out_dtype", "tokenizer_source", "seed")


@dataclass
class Recipe:
    merge_method: str
    models: list[ModelRef] = field(default_factory=list)
    base_model: Union[str, "Recipe", None] = None
    parameters: dict[str, ParamValue] = field(default_factory=dict)
    slices: list[dict[str, Any]] | None = None  # mergekit's passthrough slices, kept as given
    path: list[PathStep] | None = None
    dtype: str | None = None  # mergekit's: the dtype the sources are loaded and merged in
    out_dtype: str | None = None  # the dtype written (default: dtype, else the sources')
    tokenizer_source: str | None = None
    seed: int | None = None  # for the random merge methods (DARE, DELLA)

    def source_names(self) -> list[str]:
        """Every plain model name this recipe reads, nested recipes included, base first, no repeats."""
        names: list[str] = []

        def add(m: Union[str, Recipe, None]) -> None:
            if isinstance(m, Recipe):
                for n in m.source_names():
                    add(n)
            elif m is not None and m not in names:
                names.append(m)

        add(self.base_model)
        for ref in self.models:
            add(ref.model)
        nested = {ref.name for ref in self.models if isinstance(ref.model, Recipe)}
        for step in self.path or []:
            if step.model not in nested:  # a step into a nested recipe reads that recipe's sources, added above
                add(step.model)
        for s in self.slices or []:
            for src in s.get("sources", []):
                add(src.get("model"))
        return names

    def renamed(self, names: dict[str, str]) -> Recipe:
        """This recipe with its plain model names replaced as `names` maps them (nested recipes too); path steps
        follow the entries they name."""
        own = {ref.name for ref in self.models if ref.name is not None}

        def sub(m: Any) -> Any:
            return m.renamed(names) if isinstance(m, Recipe) else names.get(m, m) if isinstance(m, str) else m

        slices = None if self.slices is None else [
            {**s, "sources": [{**src, "model": sub(src.get("model"))} if isinstance(src, dict) else src for src in s["sources"]]}
            if isinstance(s, dict) and isinstance(s.get("sources"), list) else s for s in self.slices]
        return replace(
            self, base_model=sub(self.base_model), slices=slices,
            models=[ModelRef(sub(r.model), dict(r.parameters), r.name) for r in self.models],
            path=None if self.path is None else [PathStep(s.model if s.model in own else sub(s.model), s.layer, s.scale) for s in self.path],
            tokenizer_source=self.tokenizer_source if self.tokenizer_source in (None, "base", "union") else sub(self.tokenizer_source),
        )

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"merge_method": self.merge_method}
        if self.base_model is not None:
            d["base_model"] = self.base_model.to_dict() if isinstance(self.base_model, Recipe) else self.base_model
        if self.models:
            d["models"] = [m.to_dict() for m in self.models]
        if self.parameters:
            d["parameters"] = dict(self.parameters)
        if self.slices is not None:
            d["slices"] = self.slices
        if self.path is not None:
            d["path"] = [s.to_dict() for s in self.path]
        for key in ("dtype", "out_dtype", "tokenizer_source", "seed"):
            if getattr(self, key) is not None:
                d[key] = getattr(self, key)
        return d

    @classmethod
    def from_dict(cls, d: Any) -> Recipe:
        if not isinstance(d, dict):
            raise UserError(f"a recipe is a mapping, got {type(d).__name__}")
        unknown = sorted(set(d) - set(_FIELDS))
        if unknown:
            raise UserError(f"unknown recipe key {unknown[0]!r}; valid keys: {', '.join(_FIELDS)}")
        if "merge_method" not in d:
            raise UserError("a recipe needs 'merge_method'")
        base = d.get("base_model")
        return cls(
            merge_method=str(d["merge_method"]),
            models=[ModelRef.from_dict(m) for m in _listing(d.get("models"), "a recipe's models")],
            base_model=Recipe.from_dict(base) if isinstance(base, dict) else base,
            parameters=_mapping(d.get("parameters"), "a recipe's parameters"),
            slices=d.get("slices"),
            path=[PathStep.from_dict(s) for s in d["path"]] if d.get("path") is not None else None,
            dtype=d.get("dtype"),
            out_dtype=d.get("out_dtype"),
            tokenizer_source=d.get("tokenizer_source"),
            seed=None if d.get("seed") is None else int(d["seed"]),
        )

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_yaml(cls, text: str) -> Recipe:
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise UserError(f"recipe is not valid YAML: {str(e).splitlines()[0]}") from e
        return cls.from_dict(data)

    @classmethod
    def load(cls, path: str | Path) -> Recipe:
        return cls.from_dict(read_yaml_mapping(path, "recipe"))


def read_yaml_mapping(path: str | Path, what: str) -> dict[str, Any]:
    """The mapping a YAML file holds. A missing file, invalid YAML or any other top-level value is a
    one-line UserError naming `what` (e.g. "config") and the file."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{what} file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise UserError(f"{what} {p} is not valid YAML: {str(e).splitlines()[0]}") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{what} {p} is not UTF-8 text (byte {e.start}: {e.object[e.start:e.start + 1]!r})") from None
    if not isinstance(data, dict):
        raise UserError(f"{what} {p}: expected a mapping at the top level, got {type(data).__name__}")
    return data
