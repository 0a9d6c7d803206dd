"""Trims of a task vector, as mergekit 0.1.5 defines them, turned into cheap per-element rules.

A `Keep` says which entries survive, without materialising a mask: all; none; a magnitude band
(thresholds read from the task vector's sorted magnitudes, minus the few tied entries that torch's sort,
which mergekit uses, ordered out); or a random draw (DARE, DELLA) from counter-based bits keyed by
(seed, tensor, model). `factor` is the rescale that restores the L1 norm when `rescale` is on.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from evomerge.merge import rng
from evomerge.merge.vectors import TaskVector
from evomerge.records import UserError

_EPS = 1e-7  # mergekit's tolerance below which a norm is not rescaled
_NO_DROP = torch.empty(0, dtype=torch.int64)


@dataclass
class Keep:
    kind: str  # "all" | "none" | "band" | "random" | "della"
    lo: float = 0.0  # band: lo <= |x| <= hi, except the indices in drop
    hi: float = math.inf
    drop: torch.Tensor = _NO_DROP  # sorted flat indices
    key: int = 0  # random, della: the entry's random stream
    p: float = 1.0  # random: keep probability
    p_lo: float = 0.0  # della: keep probability p_lo + p_span * rank
    p_span: float = 0.0
    rank: torch.Tensor | None = None  # della: flat row rank in [0, 1]
    factor: float = 1.0

    def mask(self, x: torch.Tensor, start: int) -> torch.Tensor:
        """The keep mask of the flat chunk `x` that starts at flat position `start` (torch path)."""
        if self.kind == "all":
            return torch.ones_like(x, dtype=torch.bool)
        if self.kind == "none":
            return torch.zeros_like(x, dtype=torch.bool)
        if self.kind == "band":
            a = x.abs()
            m = (a >= self.lo) & (a <= self.hi)
            if self.drop.numel():
                d = self.drop.to(x.device)
                d = d[(d >= start) & (d < start + x.numel())]
                m[d - start] = False
            return m
        u = rng.draws(self.key, start, x.numel(), x.device)
        if self.kind == "random":
            return u < rng.threshold(self.p)
        rank = self.rank[start : start + x.numel()].double()
        return u.double() * 2.0**-32 < self.p_lo + self.p_span * rank


def magnitude(vec: TaskVector, density: float) -> Keep:
    """TIES' trim: keep the top max(1, int(density * n)) entries by magnitude."""
    if density >= 1:
        return Keep("all")
    n = vec.numel
    if density <= 0 or n == 0:
        return Keep("none")
    k = max(1, int(density * n))
    lo = vec.magnitude_at_rank(k - 1)
    drop = _NO_DROP
    if vec.tie_at(k):  # equal magnitudes straddle the cut: keep those torch's sort put first
        drop = vec.order(descending=True)[k : vec.count_at_least(lo)].long().sort().values
    return Keep("band", lo=lo, drop=drop)


def magnitude_outliers(vec: TaskVector, density: float, gamma: float) -> Keep:
    """Breadcrumbs' trim: drop the top int(gamma * n) entries, then the smallest, keeping int(density * n)."""
    if density >= 1:
        return Keep("all")
    n = vec.numel
    target, top = int(density * n), int(gamma * n)
    if target <= 0:
        return Keep("none")
    first = max(0, n - target - top)  # keep ascending positions [first, last)
    last = first + target
    lo, hi = vec.magnitude_at_rank(n - 1 - first), vec.magnitude_at_rank(n - last)
    below = n - vec.count_at_least(lo)  # ascending position of the first entry equal to lo
    above = n - vec.count_above(hi)  # ascending position after the last entry equal to hi
    drop = _NO_DROP
    if below < first or above > last:
        order = vec.order(descending=False)
        drop = torch.cat([order[below:first], order[last:above]]).long().sort().values
    return Keep("band", lo=lo, hi=hi, drop=drop)


def bernoulli(density: float, key: int) -> Keep:
    """DARE's trim: keep each entry with probability `density`."""
    if density >= 1:
        return Keep("all")
    if rng.threshold(density) == 0:  # below 2**-32
        return Keep("none")
    return Keep("random", key=key, p=density)


def della(vec: TaskVector, density: float, epsilon: float, key: int) -> Keep:
    """DELLA's MagPrune: keep probability (density - eps) + 2 eps * (rank of |x| in its row, in [0, 1])."""
    if density >= 1:
        return Keep("all")
    if density <= 0:
        return Keep("none")
    if density + epsilon >= 1 or density - epsilon <= 0:
        raise UserError(f"della needs 0 < density ± epsilon < 1, got density {density:g} and epsilon {epsilon:g}")
    return Keep("della", key=key, p_lo=density - epsilon, p_span=2 * epsilon, rank=vec.row_rank().reshape(-1))


def rescale(keep: Keep, vec: TaskVector) -> Keep:
    """Scale the kept entries so their L1 norm equals the whole vector's (mergekit's `rescale`)."""
    if keep.kind in ("all", "none"):
        return keep
    from evomerge.merge import gta

    after = gta.kept_l1(vec.delta.reshape(-1), keep)
    before = vec.l1()
    if before >= _EPS and after >= _EPS:
        keep.factor = before / after
    return keep
