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

from dataclasses import replace

import numpy as np
import torch

from evomerge.merge import rng
from evomerge.merge.passes import ANY_INDEX, Keep, row_rank
from evomerge.merge.vectors import TaskVector

EPS = 1e-7  # mergekit's tolerance below which a norm is not rescaled
TIE_ORDERS = ("index", "mergekit")
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
        return Keep("band", lo=lo_cut.value, hi=hi_cut.value, hi_range=ANY_INDEX)
    if tie_order == "index":  # ascending order, lower index first among equals: group rank r is the (r+1)th
        lo_range = (vec.nth_equal(lo_cut.value, first - lo_start + 1),
                    vec.nth_equal(lo_cut.value, min(last, n - lo_cut.larger) - lo_start))
        hi_start = n - hi_cut.larger - hi_cut.equal
        hi_range = lo_range if hi_cut.value == lo_cut.value else (0, vec.nth_equal(hi_cut.value, last - hi_start))
        return Keep("band", lo=lo_cut.value, hi=hi_cut.value, lo_range=lo_range, hi_range=hi_range)
    order = torch.sort(vec.delta.reshape(-1).abs(), descending=False).indices
    drop = _sorted(torch.cat([order[lo_start:first], order[last:hi_end]]))
    return Keep("band", lo=lo_cut.value, hi=hi_cut.value, hi_range=ANY_INDEX, drop=drop)


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


