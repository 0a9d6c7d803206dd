"""Layer-weights space (Sakana's parameter space, mergekit-evolve's genome): for each layer group, each
module group and each source model, a merge `weight` and (for sparsifying methods) a `density`.

Options: `sources` (expert names), `base` (base model name; required except for `linear`), `num_layers`,
`method` (ties, dare_ties, dare_linear, breadcrumbs, breadcrumbs_ties, della, della_linear,
task_arithmetic, linear, and evomerge's own tsv_m, tall_consensus, pcb (its density: the paper's pcb_ratio),
localize_stitch (its density: the paper's sparsity), and the data-aware fisher, regmean and regmean_plus (their
weights: each model's share of the least-squares objective per tensor; regmean_plus takes a calibration pass
through each candidate)), `calibration` (their calibration JSONL,
evomerge/merge/calibration.py; required with them), `granularity` (1 = a group per layer, k = groups of k layers, 0 = one group for
the whole model), `knots` (k >= 2 instead of granularity: each value is a piecewise-linear curve over depth through
k knots at evenly spaced layers, so a 30-layer model is searched in k values per expert rather than 30), `lines`
(LiNeS, Wang et al. 2024: each value is start + slope x l / (L - 1) over the layers l, two values per expert and
parameter, its end clipped to the parameter's range; the slope ranges over +-(the range's width)), `modules` (a subset of the architecture's module groups — attention, mlp, norms, and
for mixtures of experts experts, router... — plus embeddings: each gets its own values; the rest of the
tensors share a default group), `normalize` (sets the recipe's `normalize` when given),
`negative_weights` (weights range over [-weight_max, weight_max] instead of [0, weight_max]),
`weight_max` (1.0), `density_range` ((0.1, 1.0); della's default keeps d ± ε inside (0, 1)), `merge_seed`
(the recipe's seed for the random methods), `initial_weight` and `initial_density` (0.5: Sakana's start),
`architecture` and `tied_embeddings` (filled in from the base checkpoint by `evomerge run`: the family in
evomerge/arch.py whose names the filters use, and whether the head is the input embedding).

Decoding: a value per layer becomes a mergekit gradient list with one entry per layer (exact at every
layer), a single group a scalar; module groups become `{filter, value}` entries (the architecture table's
filters, e.g. Llama's attention: `self_attn`; embeddings: the embedding and head tensors), the default
group the entry without a filter.
Tensors outside the layers take the first layer group's value unless `embeddings` is searched.
Dimensions are ordered layer group, then module, then source, then weight/density: a split point (M2N2)
cuts between layers.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from evomerge import arch
from evomerge.recipe import ModelRef, Recipe
from evomerge.records import UserError
from evomerge.search_spaces.base import SearchSpace, check_layers, check_sources, model_ref

# the methods this space offers: a weight per model (and a density, for a method that trims) per layer group; what
# each needs (a base, a calibration set) and draws (a seed) is the method's own, read from the merge registry
METHODS = ("ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties", "della", "della_linear", "task_arithmetic",
           "linear", "tsv_m", "tall_consensus", "pcb", "localize_stitch", "fisher", "regmean", "regmean_plus")


def _facts(method: str):
    from evomerge.merge import methods  # torch: imported when a space is built, not when the options are listed

    return methods.get(method)


def _data_aware(method: str) -> bool:
    return any(p.name == "calibration" for p in _facts(method).shared_params())
EMBEDDINGS, DEFAULT = "embeddings", "default"


class LayerWeights(SearchSpace):
    def __init__(
        self,
        sources: Sequence[str],
        num_layers: int,
        base: str | None = None,
        method: str = "ties",
        granularity: int = 1,
        knots: int | None = None,
        lines: bool = False,
        modules: Sequence[str] = (),
        normalize: bool | None = None,
        negative_weights: bool = False,
        weight_max: float = 1.0,
        density_range: tuple[float, float] | None = None,
        merge_seed: int = 0,
        initial_weight: float = 0.5,
        initial_density: float = 0.5,
        architecture: str = "llama",
        tied_embeddings: bool = False,
        calibration: str | None = None,
    ) -> None:
        if method not in METHODS:
            raise UserError(f"unknown merge method {method!r} for layer_weights; valid: {', '.join(METHODS)}")
        self.sources = check_sources(sources)
        self.num_layers = check_layers(num_layers)
        facts = _facts(method)
        if base is None and facts.needs_base:
            raise UserError(f"method {method!r} needs a base model: set `base`")
        if _data_aware(method) != (calibration is not None):
            data_aware = ", ".join(m for m in METHODS if _data_aware(m))
            raise UserError(f"layer_weights: `calibration` (a JSONL file) goes with the methods {data_aware}, "
                            "and only with them")
        self.calibration = calibration
        if base in self.sources:
            raise UserError(f"base {base!r} is also listed as a source")
        family = arch.family(architecture)
        # tensor-name substrings per module group, as mergekit's filters use them; the most specific group first
        self.filters = {g: f for g, f in family.groups.items() if g in modules}
        self.filters[EMBEDDINGS] = arch.embedding_filters(family, tied_embeddings)
        unknown = [m for m in modules if m not in self.filters]
        if unknown:
            raise UserError(f"unknown module group {unknown[0]!r} for {family.name}; valid: {', '.join([*family.groups, EMBEDDINGS])}")
        if not isinstance(granularity, int) or granularity < 0:
            raise UserError(f"granularity must be an integer >= 0 (0 = whole model), got {granularity!r}")
        if weight_max <= 0:
            raise UserError(f"weight_max must be > 0, got {weight_max}")
        self.base, self.method, self.normalize, self.merge_seed = base, method, normalize, merge_seed
        lo_d, hi_d = density_range or ((0.16, 0.84) if method.startswith("della") else (0.1, 1.0))
        if not 0 <= lo_d < hi_d <= 1:
            raise UserError(f"density_range must satisfy 0 <= low < high <= 1, got {(lo_d, hi_d)}")
        self.embeddings = EMBEDDINGS in modules
        self.layer_modules = [m for m in self.filters if m != EMBEDDINGS] + [DEFAULT]
        self.params = ["weight", "density"] if facts.sparse else ["weight"]
        self.random = facts.random
        self._depth(granularity, knots, lines)
        n_groups = len(self.groups)
        self.ranges = {"weight": (-weight_max if negative_weights else 0.0, weight_max), "density": (lo_d, hi_d)}
        starts = {"weight": initial_weight, "density": initial_density}
        # slots: (group index or None for embeddings, module, source, param), in genome order
        self._slots: list[tuple[int | None, str, str, str]] = []
        if self.embeddings:
            self._slots += [(None, EMBEDDINGS, s, p) for s in self.sources for p in self.params]
        for g in range(n_groups):
            self._slots += [(g, m, s, p) for m in self.layer_modules for s in self.sources for p in self.params]
        self._names = [self._name(*slot) for slot in self._slots]
        self.bounds = np.array([self._slope_range(p) if g == 1 and self.lines else self.ranges[p] for g, _, _, p in self._slots], dtype=float)
        self._initial = np.clip([0.0 if g == 1 and self.lines else starts[p] for g, _, _, p in self._slots],
                                self.bounds[:, 0], self.bounds[:, 1])
        self._index = {slot: i for i, slot in enumerate(self._slots)}


    def _depth(self, granularity: int, knots: int | None, lines: bool) -> None:
        """The layer groups the genome's values are for: `granularity` layers each, or `knots` points a curve over
        depth passes through (whole layers: decode(encode(r)) == r), or LiNeS' start and slope."""
        n_groups = 1 if granularity == 0 else math.ceil(self.num_layers / granularity)
        size = self.num_layers if granularity == 0 else granularity
        self.groups = [(g * size, min(self.num_layers, (g + 1) * size)) for g in range(n_groups)]
        self.knots: list[int] | None = None
        if knots is not None:
            if not isinstance(knots, int) or not 2 <= knots <= self.num_layers:
                raise UserError(f"knots must be an integer from 2 to num_layers ({self.num_layers}), got {knots!r}")
            self.knots = [round(v) for v in np.linspace(0, self.num_layers - 1, knots)]
            self.groups = [(k, k + 1) for k in self.knots]
        self.lines = bool(lines)
        if self.lines:  # LiNeS: a start at layer 0 and a slope to the last layer, the knots 0 and L-1 re-parametrised
            if knots is not None or self.num_layers < 2:
                raise UserError("lines takes the place of knots and needs num_layers >= 2")
            self.knots, self.groups = [0, self.num_layers - 1], [(0, 1), (1, 2)]
    def _slope_range(self, param: str) -> tuple[float, float]:
        lo, hi = self.ranges[param]
        return lo - hi, hi - lo

    def _name(self, g: int | None, module: str, source: str, param: str) -> str:
        if g is None:
            where = "non_layer"
        elif self.lines:
            where = ("lines_start", "lines_slope")[g]
        elif self.knots is not None:
            where = f"knot_layer_{self.knots[g]}"
        elif len(self.groups) == 1:
            where = "all_layers"
        else:
            lo, hi = self.groups[g]
            where = f"layer_{lo}" if hi - lo == 1 else f"layers_{lo}-{hi - 1}"
        return f"{where}.{module}.{source}.{param}"

    # a module's value over the layers: scalar for one group, else one entry per layer
    def _layer_value(self, x: np.ndarray, module: str, source: str, param: str) -> float | list[float]:
        values = [float(x[self._index[(g, module, source, param)]]) for g in range(len(self.groups))]
        if self.lines:  # LiNeS: start + slope * l / (L - 1); its end kept inside the range keeps every layer inside
            end = float(np.clip(values[0] + values[1], *self.ranges[param]))
            return np.interp(np.arange(self.num_layers), self.knots, [values[0], end]).tolist()
        if self.knots is not None:
            return np.interp(np.arange(self.num_layers), self.knots, values).tolist()
        if len(values) == 1:
            return values[0]
        return [values[g] for g, (lo, hi) in enumerate(self.groups) for _ in range(lo, hi)]

    def decode(self, x: Any) -> Recipe:
        x = self.clip(x)
        models = []
        for s in self.sources:
            params: dict[str, Any] = {}
            for p in self.params:
                if len(self.layer_modules) == 1 and not self.embeddings:
                    params[p] = self._layer_value(x, DEFAULT, s, p)
                    continue
                entries: list[dict[str, Any]] = []
                if self.embeddings:
                    v = float(x[self._index[(None, EMBEDDINGS, s, p)]])
                    entries += [{"filter": f, "value": v} for f in self.filters[EMBEDDINGS]]
                for m in self.layer_modules:
                    v = self._layer_value(x, m, s, p)
                    entries += [{"value": v}] if m == DEFAULT else [{"filter": f, "value": v} for f in self.filters[m]]
                params[p] = entries
            models.append(ModelRef(model=s, parameters=params))
        return Recipe(
            merge_method=self.method,
            models=models,
            base_model=self.base,
            parameters={**({} if self.normalize is None else {"normalize": bool(self.normalize)}),
                        **({} if self.calibration is None else {"calibration": self.calibration})},
            seed=self.merge_seed if self.random else None,
        )

    def encode(self, recipe: Recipe) -> np.ndarray:
        """The genome of a recipe written as decode writes it, or in the simpler forms a mergekit config uses that
        the space holds exactly: one number for every layer, a per-layer list, and a module list whose entry without
        a filter stands for the module groups it does not name."""
        if recipe.merge_method != self.method:
            raise UserError(f"recipe uses {recipe.merge_method!r}, this space searches {self.method!r}")
        held = self.decode(self._initial)  # what every point of the space shares: its base and merge-wide parameters
        if recipe.base_model != held.base_model or recipe.parameters != held.parameters:
            raise UserError(f"recipe merges with base {recipe.base_model!r} and parameters {recipe.parameters or 'none'}; "
                            f"this space's merges: base {held.base_model!r}, parameters {held.parameters or 'none'}")
        x = self._initial.copy()
        for s in self.sources:
            ref = model_ref(recipe, s)
            for p in self.params:
                if p not in ref.parameters:
                    raise UserError(f"recipe: model {s!r} has no {p!r}")
                value = ref.parameters[p]
                by_module = isinstance(value, list) and all(isinstance(e, dict) for e in value)
                entries = {e.get("filter"): e["value"] for e in value} if by_module else {None: value}
                if self.embeddings:
                    v = entries.get(self.filters[EMBEDDINGS][0], entries.get(None))
                    x[self._index[(None, EMBEDDINGS, s, p)]] = float(v) if isinstance(v, (int, float)) else math.nan
                for m in self.layer_modules:
                    key = None if m == DEFAULT else self.filters[m][0]
                    if key not in entries and None not in entries:
                        raise UserError(f"recipe: model {s!r} {p!r} has no entry for module group {m!r}")
                    self._read_layers(x, entries.get(key, entries.get(None)), m, s, p)
        if not np.all(np.isfinite(x)):
            raise UserError("recipe does not fit this layer_weights space (a value is missing)")
        return x

    def _read_layers(self, x: np.ndarray, value: Any, module: str, source: str, param: str) -> None:
        if len(self.groups) > 1 and isinstance(value, (int, float)) and not isinstance(value, bool):
            value = [value] * self.num_layers  # one number for every layer: a flat curve (LiNeS: a zero slope)
        if len(self.groups) == 1:
            if not isinstance(value, (int, float)):
                raise UserError(f"recipe: {source}.{param} should be one number for the whole model, got {value!r}")
            x[self._index[(0, module, source, param)]] = float(value)
            return
        if not isinstance(value, list) or len(value) != self.num_layers:
            raise UserError(f"recipe: {source}.{param} should list {self.num_layers} per-layer values, got {value!r}")
        if self.lines:
            start, end = float(value[0]), float(value[-1])
            slope = end - start
            for _ in range(4):  # the nearby float slope whose sum gives back the end exactly: decode(encode(r)) == r
                if start + slope == end:
                    break
                slope = float(np.nextafter(slope, math.copysign(math.inf, end - (start + slope))))
            x[self._index[(0, module, source, param)]] = start
            x[self._index[(1, module, source, param)]] = slope
            return
        for g, (lo, _) in enumerate(self.groups):
            x[self._index[(g, module, source, param)]] = float(value[lo])
