"""Fitness at a fraction of the cost: the engine's side of racing and subset + estimate.

The planner writes each candidate's scoring plan into `candidate.meta["scoring"]` before the ask is
journalled (fitness/partial.py runs it in the worker), and completes the evaluation that comes back: the
per-example scores it did not measure are imputed, so every optimizer reads a full vector (M2N2's
competition included) whose mean is the estimate the optimizer is told. Its state is a function of the
journal alone, the evaluations in commit order with their candidates' plans: a resumed run rebuilds it
exactly by observing the stored evaluations again, and in-flight candidates are re-sent with their
stored plans.

Scores here are means of the per-example scores (larger is better), which for one task is its first
objective up to sign. A candidate "fully scored" measured every example; only those make the incumbent
and the rows anchors are fitted on.

Racing: every candidate meets the examples in one fixed random order, a chunk at a time, and stops once
the upper confidence bound on its full-dev mean falls below its threshold (Hoeffding-Serfling, the union
bound over the chunk checks: a candidate whose full-dev mean reaches the threshold is stopped with
probability at most 1 - confidence). The threshold is what the candidate must beat to matter:
  - steady state (no `generation` in the candidate's meta: random, M2N2, ...): the best fully scored mean;
  - generational (CMA-ES, NSGA-II put `generation` in meta): the ceil(keep x lambda)-th best mean already
    told in its generation (lambda: the previous generation's size), the candidates the optimizer selects.
A stopped candidate is recorded with its partial mean (cost["examples"] < the dev set) as its objectives and
as its unscored examples' scores. For M2N2 a child below the incumbent may still win a niche, so racing
there trades archive diversity for cost; subset + estimate keeps per-example competition. With several
objectives searched at once (NSGA-II), both judge by the per-example scores' mean: a candidate stopped or
estimated low on it may still have been on the Pareto front by another objective.

Subset + estimate (after tinyBenchmarks' anchor points, Polo et al. 2024, fitted on the run's own history):
the examples are clustered by their scores over the last `window` fully scored candidates (k-means into
`strata` strata) and `anchors` examples drawn within the strata in proportion to their sizes (`fit_anchors`:
stratified sampling, unbiased for any candidate; anchors nearest the centres are not, and missed every
candidate better than the history in a first try). A candidate scores the anchors only; its estimate is the
stratified mean, and each unscored example takes the mean of its stratum's anchors (what M2N2 competes on).
Re-anchoring every `refit_every` new full rows follows the search; the first `warmup` candidates, every
`full_every`-th (by id), and any whose estimate reaches the best are scored in full, so the incumbent is
always measured, never estimated.
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from evomerge.fitness.partial import AnchorsPlan, RacePlan, ScoringPlan, plan_from_json
from evomerge.records import Candidate, Evaluation


@dataclass(frozen=True)
class Anchors:
    examples: list[int]  # the examples scored
    weights: list[float]  # how many examples each stands for (its stratum's size / anchors drawn there)
    stratum: np.ndarray  # per example: its stratum


def _dist2(pts: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """Squared distances (points x centres) without a points x centres x dims temporary."""
    return np.maximum((pts ** 2).sum(1)[:, None] - 2 * pts @ centres.T + (centres ** 2).sum(1)[None], 0.0)


def kmeans(pts: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Labels of k-means (k-means++ start, Lloyd); fewer clusters when there are fewer distinct points."""
    n = len(pts)
    centres = [pts[rng.integers(n)]]
    d = _dist2(pts, centres[0][None])[:, 0]
    for _ in range(min(k, n) - 1):
        if d.sum() <= 0:
            break
        centres.append(pts[rng.choice(n, p=d / d.sum())])
        d = np.minimum(d, _dist2(pts, centres[-1][None])[:, 0])
    c = np.array(centres)
    for _ in range(50):
        label = _dist2(pts, c).argmin(1)
        new = np.array([pts[label == j].mean(0) if np.any(label == j) else c[j] for j in range(len(c))])
        if np.allclose(new, c):
            break
        c = new
    return np.unique(_dist2(pts, c).argmin(1), return_inverse=True)[1]


def fit_anchors(rows: np.ndarray, n_anchors: int, n_strata: int, seed: int) -> Anchors:
    """Stratified anchors: the examples clustered by their scores over `rows` (one per candidate) into
    strata; anchors drawn at random within each, in proportion to its size (at least one each). The
    weighted mean is an unbiased estimate of the full-dev mean for any candidate, also one unlike the history
    (an anchor nearest a cluster centre would not be); the strata cut its variance where history predicts."""
    rng = np.random.default_rng(seed)
    stratum = kmeans(np.asarray(rows, dtype=float).T, min(n_strata, n_anchors), rng)
    sizes = np.bincount(stratum)
    take = np.maximum(1, np.floor(sizes * n_anchors / len(stratum)).astype(int))
    for h in np.argsort(-(sizes * n_anchors / len(stratum) - take), kind="stable"):  # the remainder, largest first
        if take.sum() >= n_anchors:
            break
        take[h] += take[h] < sizes[h]
    take = np.minimum(take, sizes)
    examples, weights = [], []
    for h, (size, m) in enumerate(zip(sizes, take)):
        chosen = np.sort(rng.choice(np.flatnonzero(stratum == h), size=m, replace=False))
        examples += chosen.tolist()
        weights += [float(size / m)] * int(m)
    return Anchors(examples, weights, stratum)


def _generation(meta: dict[str, Any]) -> tuple[int, int] | None:
    return None if "generation" not in meta else (int(meta.get("restart", 0)), int(meta["generation"]))


class Planner:
    """Plans candidates' scoring and completes their evaluations; `racing` / `subset` are the config's
    RacingConfig / SubsetConfig (one of them)."""

    def __init__(self, *, racing: Any = None, subset: Any = None, seed: int = 0):
        self.racing, self.subset, self.seed = racing, subset, int(seed)
        self.reset()

    def reset(self) -> None:
        self.total: int | None = None  # examples in the dev set, learnt from the first full evaluation
        self.best: float | None = None  # best fully scored mean
        self._told: dict[tuple[int, int], list[float]] = {}  # generation -> means told
        self._size: dict[tuple[int, int], int] = {}  # generation -> evaluations told
        self._rows: deque[np.ndarray] = deque(maxlen=self.subset.window if self.subset else 1)
        self._full = 0
        self.anchors: dict[int, Anchors] = {}  # version (full rows seen when fitted) -> anchors
        self.version: int | None = None

    # ---- plans -------------------------------------------------------------------------------------
    def plan(self, cand: Candidate) -> ScoringPlan | None:
        """The scoring plan for `cand`, or None: score everything."""
        if self.total is None:
            return None
        if self.racing is not None:
            r = self.racing
            threshold = self._threshold(cand.meta)
            if threshold is None:
                return None
            return RacePlan(self.total, self.seed, r.chunk, threshold, 1 - r.confidence, tuple(r.range))
        if self.subset is not None and self.version is not None and cand.id % self.subset.full_every:
            a = self.anchors[self.version]
            return AnchorsPlan(self.total, self.version, a.examples, a.weights, self.best)
        return None

    def _threshold(self, meta: dict[str, Any]) -> float | None:
        gen = _generation(meta)
        if gen is None:
            return self.best
        size = self._size.get((gen[0], gen[1] - 1))
        told = sorted(self._told.get(gen, []), reverse=True)
        k = math.ceil(self.racing.keep * size) if size else None
        return told[k - 1] if k is not None and len(told) >= k else None

    # ---- results -----------------------------------------------------------------------------------
    def complete(self, meta: dict[str, Any], ev: Evaluation) -> Evaluation:
        """The evaluation with its unscored examples imputed (the stored and told form)."""
        if not meta.get("scoring") or ev.per_example is None or not ev.ok:
            return ev
        plan = plan_from_json(meta["scoring"])
        pe = np.asarray(ev.per_example, dtype=float)
        missing = np.isnan(pe)
        if not missing.any():
            return ev
        if isinstance(plan, RacePlan):
            pe[missing] = np.nanmean(pe)
        else:
            a = self.anchors[plan.version]  # an unscored example: the mean of its stratum's anchors
            ex = np.asarray(a.examples)
            means = np.bincount(a.stratum[ex], weights=pe[ex]) / np.maximum(1, np.bincount(a.stratum[ex]))
            pe[missing] = means[a.stratum[missing]]
        return replace(ev, per_example=pe.tolist())

    def observe(self, meta: dict[str, Any], ev: Evaluation) -> None:
        """Learn from a recorded (completed) evaluation; called in commit order, live and on resume."""
        gen = _generation(meta)
        if gen is not None:
            self._size[gen] = self._size.get(gen, 0) + 1
        if not ev.ok or ev.per_example is None:
            return
        pe = np.asarray(ev.per_example, dtype=float)
        mean = float(pe.mean())
        if gen is not None:
            self._told.setdefault(gen, []).append(mean)
        if ev.cost.get("examples", len(pe)) < len(pe):
            return
        self.total = len(pe) if self.total is None else self.total
        self.best = mean if self.best is None else max(self.best, mean)
        if self.subset is None:
            return
        self._rows.append(pe)
        self._full += 1
        s = self.subset
        if self._full >= s.warmup and (self._full - s.warmup) % s.refit_every == 0:
            self.anchors[self._full] = fit_anchors(np.array(self._rows), s.anchors, s.strata, self.seed + self._full)
            self.version = self._full


def scoring_summary(evaluations: list[Evaluation], metas: dict[int, dict[str, Any]]) -> dict[str, float]:
    """Examples scored, and how many evaluations a race stopped or anchors estimated (status, report)."""
    out = {"examples": 0.0, "stopped": 0, "estimated": 0}
    for e in evaluations:
        scored = e.cost.get("examples")
        out["examples"] += scored or 0.0
        stored = metas.get(e.candidate_id, {}).get("scoring")
        plan = plan_from_json(stored) if stored else None
        if plan and scored is not None and scored < plan.total:
            out["stopped" if isinstance(plan, RacePlan) else "estimated"] += 1
    return out
