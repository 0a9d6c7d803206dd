"""Trims of a task vector, as mergekit 0.1.5 defines them, turned into cheap per-element rules.

A `Keep` says which entries survive, without materialising a mask: all; none; a magnitude band (its
thresholds found exactly from the task vector's summary and one selection pass); or a random draw (DARE,
DELLA) from counter-based bits keyed by (seed, tensor, model). `factor` is the rescale that restores the
L1 norm when `rescale` is on.

Equal magnitudes at a threshold (common in low-precision deltas) need a rule for which of them a trim to
exactly k entries keeps. `tie_order="index"` keeps the lowest flat indices first, in the trim's order
(largest first for TIES, smallest first for breadcrumbs' band): exact, cheap, the same on every device.
`tie_order="mergekit"` keeps the ones torch's (unstable) sort puts first, as mergekit does, by sorting the
whole delta when, and only when, a tie straddles the threshold: mergekit's own cost, for replays that
must match it bit for bit.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from evomerge.merge import rng
from evomerge.merge.vectors import TaskVector

EPS = 1e-7  # mergekit's tolerance below which a norm is not rescaled
_NO_DROP = np.zeros(0, np.int64)
_ALL = (0, 1 << 62)  # flat-index range of the tied entries kept at a bound
_NONE = (1, 0)
TIE_ORDERS = ("index", "mergekit")


@dataclass(eq=False)  # hashed by identity: a merge's shared statistics are keyed by the Keep they are for
class Keep:
    kind: str  # "all" | "none" | "band" | "random" | "della"
    lo: float = 0.0  # band: lo < |x| < hi, plus the tied entries at lo / hi whose index is in its range,
    hi: float = math.inf  # minus the flat indices in drop (sorted)
    lo_range: tuple[int, int] = _ALL
    hi_range: tuple[int, int] = _NONE
    drop: np.ndarray = field(default_factory=lambda: _NO_DROP)
    key: int = 0  # random, della: the entry's random stream
    p: float = 1.0  # random: keep probability
    p_lo: float = 0.0  # della: keep probability p_lo + p_span * rank
    p_span: float = 0.0
    rank: torch.Tensor | None = None  # della: row ranks in [0, 1] of the entries from flat index rank_start on
    rank_start: int = 0
    factor: float = 1.0

    def mask(self, x: torch.Tensor, start: int) -> torch.Tensor:
        """The keep mask of the flat delta chunk `x` that starts at flat position `start` (torch path)."""
        if self.kind == "all":
            return torch.ones_like(x, dtype=torch.bool)
        if self.kind == "none":
            return torch.zeros_like(x, dtype=torch.bool)
        if self.kind == "band":
            a = x.abs()
            i = torch.arange(start, start + x.numel(), device=x.device)
            m = (a > self.lo) & (a < self.hi)
            for value, (first, last) in ((self.lo, self.lo_range), (self.hi, self.hi_range)):
                m |= (a == value) & (i >= first) & (i <= last)
            if self.drop.size:
                d = torch.from_numpy(self.drop).to(x.device)
                d = d[(d >= start) & (d < start + x.numel())]
                m[d - start] = False
            return m
        u = rng.draws(self.key, start, x.numel(), x.device)
        if self.kind == "random":
            return u < rng.threshold(self.p)
        rank = self.rank[start - self.rank_start : start - self.rank_start + x.numel()].to(x.device).double()
        return u.double() * 2.0**-32 < self.p_lo + self.p_span * rank


def magnitude(vec: TaskVector, density: float, tie_order: str = "index") -> Keep:
    """TIES' trim: keep the top max(1, int(density * n)) entries by magnitude."""
    if density >= 1:
        return Keep("all")
    n = vec.numel
    if density <= 0 or n == 0:
        return Keep("none")
    k = max(1, int(density * n))
    cut = vec.cut(k - 1)
    keep_tied = k - cut.larger  # of the entries equal to the threshold, this many are kept
    if keep_tied == cut.equal:
        return Keep("band", lo=cut.value)
    if tie_order == "index":
        return Keep("band", lo=cut.value, lo_range=(0, vec.nth_equal(cut.value, keep_tied)))
    order = torch.argsort(vec.delta.reshape(-1).abs(), descending=True)
    return Keep("band", lo=cut.value, drop=_sorted(order[k : cut.larger + cut.equal]))


def magnitude_outliers(vec: TaskVector, density: float, gamma: float, tie_order: str = "index") -> Keep:
    """Breadcrumbs' trim: drop the top int(gamma * n) entries, then the smallest, keeping int(density * n)."""
    if density >= 1:
        return Keep("all")
    n = vec.numel
    target, top = int(density * n), int(gamma * n)
    if target <= 0:
        return Keep("none")
    first = max(0, n - target - top)  # keep ascending positions [first, last)
    last = first + target
    lo_cut, hi_cut = vec.cuts([n - 1 - first, n - last])
    lo_start = n - lo_cut.larger - lo_cut.equal  # ascending position of the first entry equal to lo
    hi_end = n - hi_cut.larger  # ascending position after the last entry equal to hi
    if lo_start == first and hi_end == last:
        return Keep("band", lo=lo_cut.value, hi=hi_cut.value, hi_range=_ALL)
    if tie_order == "index":  # ascending order, lower index first among equals: group rank r is the (r+1)th
        lo_range = (vec.nth_equal(lo_cut.value, first - lo_start + 1),
                    vec.nth_equal(lo_cut.value, min(last, n - lo_cut.larger) - lo_start))
        hi_start = n - hi_cut.larger - hi_cut.equal
        hi_range = lo_range if hi_cut.value == lo_cut.value else (0, vec.nth_equal(hi_cut.value, last - hi_start))
        return Keep("band", lo=lo_cut.value, hi=hi_cut.value, lo_range=lo_range, hi_range=hi_range)
    order = torch.sort(vec.delta.reshape(-1).abs(), descending=False).indices
    drop = _sorted(torch.cat([order[lo_start:first], order[last:hi_end]]))
    return Keep("band", lo=lo_cut.value, hi=hi_cut.value, hi_range=_ALL, drop=drop)


def _sorted(index: torch.Tensor) -> np.ndarray:
    return index.sort().values.numpy().astype(np.int64)


def bernoulli(density: float, key: int) -> Keep:
    """DARE's trim: keep each entry with probability `density`."""
    if density >= 1:
        return Keep("all")
    if rng.threshold(density) == 0:  # below 2**-32
        return Keep("none")
    return Keep("random", key=key, p=density)


def della(density: float, epsilon: float, key: int) -> Keep:
    """DELLA's MagPrune: keep probability (density - eps) + 2 eps * (rank of |x| in its row, in [0, 1]).
    The ranks are not stored: `ranked` gives them for the rows being merged (methods.py merges DELLA by
    pieces of whole rows, so no full-size rank array exists). Between 0 and 1, density ± epsilon must stay
    inside (0, 1) (methods.py checks it, naming the model)."""
    if density >= 1:
        return Keep("all")
    if density <= 0:
        return Keep("none")
    return Keep("della", key=key, p_lo=density - epsilon, p_span=2 * epsilon)


def ranked(keep: Keep, base: torch.Tensor, model: torch.Tensor, start: int, cols: int) -> Keep:
    """A DELLA keep with the row ranks of the flat piece `base`/`model` of whole rows starting at `start`."""
    if keep.kind != "della":
        return keep
    return replace(keep, rank=row_rank((model.float() - base.float()).reshape(-1, cols)).reshape(-1), rank_start=start)


def rescale(keep: Keep, vec: TaskVector) -> Keep:
    """Scale the kept entries so their L1 norm equals the whole vector's (mergekit's `rescale`)."""
    if keep.kind in ("all", "none"):
        return keep
    return rescaled(keep, *vec.kept_l1(keep))  # the whole L1 too: a random trim needs no summary


def rescaled(keep: Keep, kept: float, whole: float) -> Keep:
    """`keep` with the rescale factor whole / kept (L1 norms), unless either is negligible."""
    return replace(keep, factor=whole / kept) if whole >= EPS and kept >= EPS else keep


def row_rank(delta: torch.Tensor) -> torch.Tensor:
    """Each entry's magnitude rank within its row, normalised to [0, 1]; a 1-d tensor is one row."""
    d = delta if delta.dim() >= 2 else delta.reshape(1, -1)
    d = d.reshape(d.shape[0], -1)
    ranks = d.abs().argsort(dim=1).argsort(dim=1).to(torch.float32)
    cols = d.shape[1]
    return ranks / (cols - 1) if cols > 1 else ranks


def stacked_rank(siblings: list[tuple[torch.Tensor, torch.Tensor]], shape: torch.Size, part: int,
                 piece: int = 1 << 22) -> torch.Tensor:
    """DELLA's ranks of part `part` (flat, in [0, 1]) of one expert's slice of a stacked tensor, whose
    `siblings` (flat base, model pairs of `shape`) are stacked along rows: mergekit ranks a stacked
    [experts, rows, cols] tensor along dim 1, so each column of the slice is ranked over all its parts'
    rows. Computed in pieces of about `piece` entries of whole columns, each column made a contiguous row
    (sorting along contiguous memory is several times faster)."""
    rows = shape[0] if len(shape) else 1
    cols = math.prod(shape[1:]) if len(shape) > 1 else 1
    span = rows * len(siblings)
    out = torch.empty(rows, cols)
    step = max(1, piece // span)
    for c in range(0, cols, step):
        d = torch.cat([(m.reshape(rows, cols)[:, c : c + step].float() - b.reshape(rows, cols)[:, c : c + step].float()).T
                       for b, m in siblings], dim=1)
        r = d.abs().argsort(dim=1).argsort(dim=1).to(torch.float32)
        out[:, c : c + step] = (r / (span - 1) if span > 1 else r)[:, part * rows : (part + 1) * rows].T
    return out.reshape(-1)
