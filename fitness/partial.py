"""Scoring part of a fitness's examples, as a plan says: what racing and subset + estimate run in the worker
(the engine side, which writes the plans and imputes what was not scored, is evomerge/run/frugal.py).

A fitness that can score any subset of its examples implements `score_examples(handle, indices) ->
ExampleScores`: `TaskFitness` does, and so does a user function that takes `examples=` (a list of indices)
and returns one per-example score per index. The number of examples is learnt from the first full
evaluation (the plans carry it as "total").

A plan is a RacePlan or an AnchorsPlan, written by the engine into `candidate.meta["scoring"]` as JSON
(`to_json`, so a resumed run re-sends it unchanged) and read back by the worker (`plan_from_json`).
Without a plan the fitness's own `evaluate` scores everything. The result's per_example has one entry per
example, NaN where not scored; cost["examples"] counts the scored.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar, Sequence

import numpy as np

from evomerge.records import UserError
from evomerge.fitness.base import FitnessResult, add_cost


@dataclass
class ExampleScores:
    """Scores of some examples: per objective one value per index (NaN where the objective does not cover the
    example, e.g. another task's), `primary` the per-example scores (larger is better), and the cost."""

    values: dict[str, np.ndarray]
    primary: np.ndarray
    cost: dict[str, float] = field(default_factory=dict)


def race_bound(mean: float, n: int, total: int, delta: float, lo: float, hi: float) -> float:
    """Upper confidence bound on the mean of all `total` examples from the mean of `n` drawn without
    replacement: Hoeffding's inequality with Serfling's finite-population factor (1 - (n-1)/N), so the bound
    closes on the true mean as n reaches N; never above what the unscored examples could add at best."""
    if n >= total:
        return mean
    width = (hi - lo) * math.sqrt((1 - (n - 1) / total) * math.log(1 / delta) / (2 * n))
    certain = (mean * n + hi * (total - n)) / total
    return min(mean + width, certain)


def race_checks(total: int, chunk: int) -> int:
    """How many times a race tests its bound (after every chunk but the last): the union bound's divisor."""
    return max(1, math.ceil(total / chunk) - 1)


@dataclass(frozen=True)
class RacePlan:
    """Examples in the fixed order permutation(seed), `chunk` at a time, of `total`; stop once the full-dev mean of
    the per-example scores is, with probability >= 1 - delta, below `threshold` (`race_bound`; scores in `range`)."""

    kind: ClassVar[str] = "race"
    total: int
    seed: int
    chunk: int
    threshold: float | None
    delta: float
    range: tuple[float, float]


@dataclass(frozen=True)
class AnchorsPlan:
    """The anchors `examples` only (of `total`), objectives their `weights`' mean; if that estimate reaches `promote`
    (the best fully scored candidate), the rest too: the best is always scored on everything, so an estimate
    cannot drift unnoticed into the lead. `version`: the anchor set's (the engine imputes by its strata)."""

    kind: ClassVar[str] = "anchors"
    total: int
    version: int
    examples: list[int]
    weights: list[float]
    promote: float | None


ScoringPlan = RacePlan | AnchorsPlan


def to_json(plan: ScoringPlan) -> dict[str, Any]:
    return {"kind": plan.kind, **{k: list(v) if isinstance(v, tuple) else v for k, v in asdict(plan).items()}}


def plan_from_json(data: dict[str, Any]) -> ScoringPlan:
    kinds = {c.kind: c for c in (RacePlan, AnchorsPlan)}
    if data.get("kind") not in kinds:
        raise UserError(f"unknown scoring plan {data.get('kind')!r}")
    fields = {k: v for k, v in data.items() if k != "kind"}
    if "range" in fields:
        fields["range"] = tuple(fields["range"])
    return kinds[data["kind"]](**fields)


def score_plan(fitness: Any, handle: Any, plan: ScoringPlan) -> FitnessResult:
    n = plan.total
    parts: list[tuple[np.ndarray, ExampleScores]] = []

    def score(idx: np.ndarray) -> None:
        parts.append((idx, fitness.score_examples(handle, idx.tolist())))

    if isinstance(plan, RacePlan):
        order = np.random.default_rng(plan.seed).permutation(n)
        delta = plan.delta / race_checks(n, plan.chunk)
        lo, hi = plan.range
        for start in range(0, n, plan.chunk):
            score(order[start:start + plan.chunk])
            done = min(n, start + plan.chunk)
            mean = float(np.mean(np.concatenate([p.primary for _, p in parts])))
            if plan.threshold is not None and race_bound(mean, done, n, delta, lo, hi) < plan.threshold:
                break
        return _result(parts, n, None)
    anchors = np.asarray(plan.examples, dtype=int)
    score(anchors)
    weights = np.asarray(plan.weights, dtype=float)
    estimate = float(np.sum(weights * parts[0][1].primary) / np.sum(weights))
    if plan.promote is None or estimate < plan.promote:
        return _result(parts, n, weights)
    score(np.setdiff1d(np.arange(n), anchors))
    return _result(parts, n, None)


def _result(parts: list[tuple[np.ndarray, ExampleScores]], n: int, weights: np.ndarray | None) -> FitnessResult:
    """Objectives as the (weighted) mean over the scored examples each objective covers."""
    idx = np.concatenate([i for i, _ in parts])
    w = np.ones(len(idx)) if weights is None else weights
    objectives = {}
    for name in parts[0][1].values:
        v = np.concatenate([p.values[name] for _, p in parts])
        ok = ~np.isnan(v)
        objectives[name] = float(np.sum(w[ok] * v[ok]) / np.sum(w[ok])) if ok.any() else math.nan
    per_example = np.full(n, np.nan)
    per_example[idx] = np.concatenate([p.primary for _, p in parts])
    cost: dict[str, float] = {}
    for _, p in parts:
        add_cost(cost, p.cost)
    cost["examples"] = float(len(idx))
    return FitnessResult(objectives=objectives, per_example=per_example.tolist(), cost=cost)


def full_values(scores: ExampleScores) -> dict[str, float]:
    """Objectives over every example scored: each the mean of the examples it covers."""
    return {k: float(np.nanmean(v)) if not np.all(np.isnan(v)) else math.nan for k, v in scores.values.items()}


def check_primary(primary: Sequence[float] | None, indices: Sequence[int], who: str) -> np.ndarray:
    if primary is None or len(primary) != len(indices):
        raise UserError(f"{who} was asked for {len(indices)} examples and returned "
                        f"{'no' if primary is None else len(primary)} per-example scores")
    return np.asarray(primary, dtype=float)
